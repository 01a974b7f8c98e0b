/* Compiled CPU kernels of boltzgen (boltzgen/native.py builds this file on first use and loads
 * it with ctypes; the callers fall back to their torch evaluation where it cannot).
 *
 * rqs.h: the rational-quadratic spline of boltzgen.flows.splines.DomainSpline (forward,
 * inverse and the analytic backward of its _FusedSpline); pairs.h: the pair terms of
 * boltzgen.energy.TorchEnergy (Coulomb + Lennard-Jones, OBC generalised Born) with their
 * gradient; bonded.h: its bonds, angles and torsions. Each kernel runs over lanes of LANES batch rows (spline) or configurations
 * (energy), so every step is a loop over lanes that the compiler turns into SIMD instructions;
 * exp/log/log1p/tanh are glibc's vector math library (libmvec) variants. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAXK 32   /* most spline bins; splines.py uses the torch path beyond */
#define LANES 16  /* batch rows or configurations per SIMD step */

extern float expf(float) __attribute__((simd("notinbranch")));
extern float logf(float) __attribute__((simd("notinbranch")));
extern float log1pf(float) __attribute__((simd("notinbranch")));
extern float tanhf(float) __attribute__((simd("notinbranch")));
extern float sinf(float) __attribute__((simd("notinbranch")));
extern float cosf(float) __attribute__((simd("notinbranch")));
extern float atan2f(float, float) __attribute__((simd("notinbranch")));
extern double exp(double) __attribute__((simd("notinbranch")));
extern double log(double) __attribute__((simd("notinbranch")));
extern double log1p(double) __attribute__((simd("notinbranch")));
extern double tanh(double) __attribute__((simd("notinbranch")));
extern double sin(double) __attribute__((simd("notinbranch")));
extern double cos(double) __attribute__((simd("notinbranch")));
extern double atan2(double, double) __attribute__((simd("notinbranch")));

int boltzgen_kernels_abi(void) { return 3; }

/* shared by the headers: name##_f32 / name##_f64, a loop over the lanes that becomes SIMD
 * instructions, and lane-major position arrays [N][3][LANES] */
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)
#define LOOP _Pragma("omp simd") for (int l = 0; l < LANES; l++)
#define AT(A, i, k) (A + ((i) * 3 + (k)) * LANES)
#define ROW(A, i) (A + (i) * LANES)

#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG logf
#define LOG1P log1pf
#define TANH tanhf
#define SIN sinf
#define COS cosf
#define ATAN2 atan2f
#define SQRT sqrtf
#define FLOOR floorf
#include "lanes.h"
#include "rqs.h"
#include "pairs.h"
#include "bonded.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG
#undef LOG1P
#undef TANH
#undef SIN
#undef COS
#undef ATAN2
#undef SQRT
#undef FLOOR

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG log
#define LOG1P log1p
#define TANH tanh
#define SIN sin
#define COS cos
#define ATAN2 atan2
#define SQRT sqrt
#define FLOOR floor
#include "lanes.h"
#include "rqs.h"
#include "pairs.h"
#include "bonded.h"
