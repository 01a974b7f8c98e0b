/* Compiled CPU kernels of boltzgen (boltzgen/native.py builds this file on first use and loads
 * it with ctypes; the callers fall back to their torch evaluation where it cannot).
 *
 * rqs.h: the rational-quadratic spline of boltzgen.flows.splines.DomainSpline (forward,
 * inverse and the analytic backward of its _FusedSpline); pairs.h: the pair terms of
 * boltzgen.energy.TorchEnergy (Coulomb + Lennard-Jones, OBC generalised Born) with their
 * gradient; bonded.h: its bonds, angles and torsions; zmatrix.h: the internal -> Cartesian map of
 * boltzgen.coordinates.InternalCoordinates with its log-det and backward. Each kernel runs over lanes of LANES batch rows (spline) or configurations
 * (energy), so every step is a loop over lanes that the compiler turns into SIMD instructions;
 * exp/log/log1p/tanh are glibc's vector math library (libmvec) variants. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAXK 32   /* most spline bins; splines.py uses the torch path beyond */
#define LANES 16  /* batch rows or configurations per SIMD step */

/* sin and cos are const here and not builtins (native.py's flags), so that a sin and a cos of
 * one argument stay two SIMD calls instead of one scalar sincos */
extern float expf(float) __attribute__((simd("notinbranch")));
extern float logf(float) __attribute__((simd("notinbranch")));
extern float log1pf(float) __attribute__((simd("notinbranch")));
extern float tanhf(float) __attribute__((simd("notinbranch")));
extern float sinf(float) __attribute__((simd("notinbranch"), const));
extern float cosf(float) __attribute__((simd("notinbranch"), const));
extern float atan2f(float, float) __attribute__((simd("notinbranch")));
extern double exp(double) __attribute__((simd("notinbranch")));
extern double log(double) __attribute__((simd("notinbranch")));
extern double log1p(double) __attribute__((simd("notinbranch")));
extern double tanh(double) __attribute__((simd("notinbranch")));
extern double sin(double) __attribute__((simd("notinbranch"), const));
extern double cos(double) __attribute__((simd("notinbranch"), const));
extern double atan2(double, double) __attribute__((simd("notinbranch")));

int boltzgen_kernels_abi(void) { return 5; }

/* exp of a float for the spline kernels, inlined (no call, no register spills around it):
 * Cody-Waite reduction by ln 2 and the degree-6 polynomial of Cephes' expf (relative error
 * ~1.2e-7, as libm's); arguments clamped to [-87, 88], so the result is a normal float
 * (exp(-87) = 1.6e-38, where torch gives a denormal or 0: the splines only add or invert it). */
static inline float bg_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = __builtin_fmaf(n, -0.693359375f, x);
    r = __builtin_fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = __builtin_fmaf(p, r, 1.3981999507e-3f);
    p = __builtin_fmaf(p, r, 8.3334519073e-3f);
    p = __builtin_fmaf(p, r, 4.1665795894e-2f);
    p = __builtin_fmaf(p, r, 1.6666665459e-1f);
    p = __builtin_fmaf(p, r, 5.0000001201e-1f);
    p = __builtin_fmaf(p, r * r, r) + 1.0f;
    union { int32_t i; float f; } scale = {((int32_t)n + 127) << 23};
    return p * scale.f;
}

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
#define EXPS bg_expf
#define LOG logf
#define LOG1P log1pf
#define TANH tanhf
#define SIN sinf
#define COS cosf
#define ATAN2 atan2f
#define SQRT sqrtf
#define FLOOR floorf
#define FABS fabsf
#include "lanes.h"
#include "rqs.h"
#include "pairs.h"
#include "bonded.h"
#include "zmatrix.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef EXPS
#undef LOG
#undef LOG1P
#undef TANH
#undef SIN
#undef COS
#undef ATAN2
#undef SQRT
#undef FLOOR
#undef FABS

#define REAL double
#define SUFFIX f64
#define EXP exp
#define EXPS exp
#define LOG log
#define LOG1P log1p
#define TANH tanh
#define SIN sin
#define COS cos
#define ATAN2 atan2
#define SQRT sqrt
#define FLOOR floor
#define FABS fabs
#include "lanes.h"
#include "rqs.h"
#include "pairs.h"
#include "bonded.h"
#include "zmatrix.h"
