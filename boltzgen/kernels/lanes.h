/* Positions and gradients of LANES configurations at a time, lane-major [N][3][LANES]; shared
 * by pairs.h and bonded.h, included twice by kernels.c (REAL = float, double). */

/* positions of configurations b0 .. b0 + LANES - 1 (the last repeated) of x (B, N, 3) */
static void FN(load_x)(REAL *X, const REAL *x, int64_t B, int64_t N, int64_t b0) {
    for (int64_t i = 0; i < N; i++)
        for (int k = 0; k < 3; k++)
            for (int l = 0; l < LANES; l++) {
                int64_t b = b0 + l < B ? b0 + l : B - 1;
                AT(X, i, k)[l] = x[(b * N + i) * 3 + k];
            }
}

/* add the lanes' gradient G to grad (B, N, 3) */
static void FN(add_grad)(const REAL *G, REAL *grad, int64_t B, int64_t N, int64_t b0) {
    const int64_t nl = B - b0 < LANES ? B - b0 : LANES;
    for (int64_t l = 0; l < nl; l++)
        for (int64_t i = 0; i < N; i++)
            for (int k = 0; k < 3; k++) grad[((b0 + l) * N + i) * 3 + k] += AT(G, i, k)[l];
}
