/* Compiled CPU kernels of boltzgen's rational-quadratic spline (boltzgen/flows/native.py builds
 * this file on first use and loads it with ctypes; boltzgen.flows.splines falls back to its
 * torch evaluation where it cannot).
 *
 * Each kernel walks one spline dimension at a time over lanes of LANES batch rows, so every
 * step is a loop over lanes that the compiler turns into SIMD instructions; exp/log/log1p are
 * glibc's vector math library (libmvec) variants. The maths is the reference composition of
 * splines.py (rqs_knots, then rqs_forward or rqs_inverse, with the domain rules of
 * DomainSpline) and, for the gradient, the analytic backward of its _FusedSpline. */
#include <math.h>
#include <stdint.h>

#define MAXK 32   /* most spline bins; splines.py uses the torch path beyond */
#define LANES 16  /* batch rows per SIMD step */

extern float expf(float) __attribute__((simd("notinbranch")));
extern float logf(float) __attribute__((simd("notinbranch")));
extern float log1pf(float) __attribute__((simd("notinbranch")));
extern double exp(double) __attribute__((simd("notinbranch")));
extern double log(double) __attribute__((simd("notinbranch")));
extern double log1p(double) __attribute__((simd("notinbranch")));

int rqs_abi_version(void) { return 1; }

#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG logf
#define LOG1P log1pf
#define SQRT sqrtf
#define FLOOR floorf
#include "rqs_kernel.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG
#undef LOG1P
#undef SQRT
#undef FLOOR

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG log
#define LOG1P log1p
#define SQRT sqrt
#define FLOOR floor
#include "rqs_kernel.h"
