/* Bonded terms of TorchEnergy (harmonic bonds and angles, periodic torsions) for LANES
 * configurations at a time; included twice by kernels.c (REAL = float, double). The maths is
 * that of boltzgen/energy/torch_energy.py (_bond_from_vectors, _angle_from_vectors,
 * _torsion_from_vectors). Each function writes its energy (B,) and adds its gradient to grad
 * (B, N, 3) unless grad is NULL. */
#define BCAT2(a, b) a##_##b
#define BCAT(a, b) BCAT2(a, b)
#define BFN(name) BCAT(name, SUFFIX)
#define BLOOP _Pragma("omp simd") for (int l = 0; l < LANES; l++)
#define BAT(A, i, k) (A + ((i) * 3 + (k)) * LANES)

/* positions of configurations b0 .. b0 + LANES - 1 (the last repeated) as [N][3][LANES] */
static void BFN(load_x)(REAL *X, const REAL *x, int64_t B, int64_t N, int64_t b0) {
    for (int64_t i = 0; i < N; i++)
        for (int k = 0; k < 3; k++)
            for (int l = 0; l < LANES; l++) {
                int64_t b = b0 + l < B ? b0 + l : B - 1;
                BAT(X, i, k)[l] = x[(b * N + i) * 3 + k];
            }
}

static void BFN(store_grad)(const REAL *G, REAL *grad, int64_t B, int64_t N, int64_t b0) {
    const int64_t nl = B - b0 < LANES ? B - b0 : LANES;
    for (int64_t l = 0; l < nl; l++)
        for (int64_t i = 0; i < N; i++)
            for (int k = 0; k < 3; k++) grad[((b0 + l) * N + i) * 3 + k] += BAT(G, i, k)[l];
}

/* kind 0: bonds (idx (n, 2): minus, plus; p0 = r0, p1 = k); kind 1: angles (idx (n, 3), the
 * middle atom the vertex; p0 = theta0, p1 = k); kind 2: torsions over unique quads (idx
 * (n, 4)), with n_terms terms (quad index, periodicity p2, phase p0, k p1). */
int BFN(bonded_eval)(int64_t B, int64_t N, const REAL *x, int kind, int64_t n,
                     const int64_t *idx, int64_t n_terms, const int64_t *quad,
                     const REAL *p0, const REAL *p1, const REAL *p2, REAL *energy, REAL *grad) {
    REAL *work = (REAL *)malloc(sizeof(REAL) * (size_t)(6 * N * LANES + 2 * n * LANES));
    if (!work) return -2;
    REAL *X = work, *G = work + 3 * N * LANES;
    REAL *phi = G + 3 * N * LANES, *dphi = phi + n * LANES; /* torsions: per unique quad */
    const REAL tiny = sizeof(REAL) == 4 ? (REAL)1.17549435e-38f : (REAL)2.2250738585072014e-308;
    for (int64_t b0 = 0; b0 < B; b0 += LANES) {
        BFN(load_x)(X, x, B, N, b0);
        if (grad)
            for (int64_t q = 0; q < 3 * N * LANES; q++) G[q] = 0;
        REAL e[LANES];
        BLOOP { e[l] = 0; }
        if (kind == 0) {
            for (int64_t t = 0; t < n; t++) {
                const int64_t i = idx[2 * t], j = idx[2 * t + 1];
                const REAL r0 = p0[t], kb = p1[t];
                const REAL *xi0 = BAT(X, i, 0), *xi1 = BAT(X, i, 1), *xi2 = BAT(X, i, 2);
                const REAL *xj0 = BAT(X, j, 0), *xj1 = BAT(X, j, 1), *xj2 = BAT(X, j, 2);
                REAL *gi0 = BAT(G, i, 0), *gi1 = BAT(G, i, 1), *gi2 = BAT(G, i, 2);
                REAL *gj0 = BAT(G, j, 0), *gj1 = BAT(G, j, 1), *gj2 = BAT(G, j, 2);
                BLOOP {
                    REAL d0 = xj0[l] - xi0[l], d1 = xj1[l] - xi1[l], d2 = xj2[l] - xi2[l];
                    REAL r = SQRT(d0 * d0 + d1 * d1 + d2 * d2);
                    REAL k_dr = kb * (r - r0);
                    e[l] += (REAL)0.5 * k_dr * (r - r0);
                    if (grad) {
                        REAL s = k_dr / r;
                        gj0[l] += s * d0; gj1[l] += s * d1; gj2[l] += s * d2;
                        gi0[l] -= s * d0; gi1[l] -= s * d1; gi2[l] -= s * d2;
                    }
                }
            }
        } else if (kind == 1) {
            for (int64_t t = 0; t < n; t++) {
                const int64_t i = idx[3 * t], j = idx[3 * t + 1], k = idx[3 * t + 2];
                const REAL th0 = p0[t], ka = p1[t];
                const REAL *xi0 = BAT(X, i, 0), *xi1 = BAT(X, i, 1), *xi2 = BAT(X, i, 2);
                const REAL *xj0 = BAT(X, j, 0), *xj1 = BAT(X, j, 1), *xj2 = BAT(X, j, 2);
                const REAL *xk0 = BAT(X, k, 0), *xk1 = BAT(X, k, 1), *xk2 = BAT(X, k, 2);
                REAL *gi0 = BAT(G, i, 0), *gi1 = BAT(G, i, 1), *gi2 = BAT(G, i, 2);
                REAL *gj0 = BAT(G, j, 0), *gj1 = BAT(G, j, 1), *gj2 = BAT(G, j, 2);
                REAL *gk0 = BAT(G, k, 0), *gk1 = BAT(G, k, 1), *gk2 = BAT(G, k, 2);
                BLOOP {
                    REAL a0 = xi0[l] - xj0[l], a1 = xi1[l] - xj1[l], a2 = xi2[l] - xj2[l];
                    REAL b0_ = xk0[l] - xj0[l], b1 = xk1[l] - xj1[l], b2 = xk2[l] - xj2[l];
                    REAL ab = a0 * b0_ + a1 * b1 + a2 * b2;
                    REAL c0 = a1 * b2 - a2 * b1, c1 = a2 * b0_ - a0 * b2, c2 = a0 * b1 - a1 * b0_;
                    REAL cn = SQRT(c0 * c0 + c1 * c1 + c2 * c2);
                    REAL dth = ATAN2(cn, ab) - th0;
                    e[l] += (REAL)0.5 * ka * dth * dth;
                    if (grad) {
                        REAL s = -(ka * dth) / (cn > tiny ? cn : tiny);
                        REAL fa = ab / (a0 * a0 + a1 * a1 + a2 * a2);
                        REAL fb = ab / (b0_ * b0_ + b1 * b1 + b2 * b2);
                        REAL ga0 = s * (b0_ - fa * a0), ga1 = s * (b1 - fa * a1);
                        REAL ga2 = s * (b2 - fa * a2);
                        REAL gb0 = s * (a0 - fb * b0_), gb1 = s * (a1 - fb * b1);
                        REAL gb2 = s * (a2 - fb * b2);
                        gi0[l] += ga0; gi1[l] += ga1; gi2[l] += ga2;
                        gk0[l] += gb0; gk1[l] += gb1; gk2[l] += gb2;
                        gj0[l] -= ga0 + gb0; gj1[l] -= ga1 + gb1; gj2[l] -= ga2 + gb2;
                    }
                }
            }
        } else {
            /* dihedral of each unique quad (IUPAC sign, as OpenMM): f = x0 - x1, g = x1 - x2,
             * h = x3 - x2, a = f x g, b = h x g, phi = atan2(-|g| f.b, a.b) */
            for (int64_t t = 0; t < n; t++) {
                const int64_t q0 = idx[4 * t], q1 = idx[4 * t + 1], q2 = idx[4 * t + 2];
                const int64_t q3 = idx[4 * t + 3];
                REAL *ph = phi + t * LANES, *dp = dphi + t * LANES;
                BLOOP {
                    REAL f0 = BAT(X, q0, 0)[l] - BAT(X, q1, 0)[l];
                    REAL f1 = BAT(X, q0, 1)[l] - BAT(X, q1, 1)[l];
                    REAL f2 = BAT(X, q0, 2)[l] - BAT(X, q1, 2)[l];
                    REAL g0 = BAT(X, q1, 0)[l] - BAT(X, q2, 0)[l];
                    REAL g1 = BAT(X, q1, 1)[l] - BAT(X, q2, 1)[l];
                    REAL g2 = BAT(X, q1, 2)[l] - BAT(X, q2, 2)[l];
                    REAL h0 = BAT(X, q3, 0)[l] - BAT(X, q2, 0)[l];
                    REAL h1 = BAT(X, q3, 1)[l] - BAT(X, q2, 1)[l];
                    REAL h2 = BAT(X, q3, 2)[l] - BAT(X, q2, 2)[l];
                    REAL a0 = f1 * g2 - f2 * g1, a1 = f2 * g0 - f0 * g2, a2 = f0 * g1 - f1 * g0;
                    REAL c0 = h1 * g2 - h2 * g1, c1 = h2 * g0 - h0 * g2, c2 = h0 * g1 - h1 * g0;
                    REAL gn = SQRT(g0 * g0 + g1 * g1 + g2 * g2);
                    ph[l] = ATAN2(-gn * (f0 * c0 + f1 * c1 + f2 * c2),
                                  a0 * c0 + a1 * c1 + a2 * c2);
                    dp[l] = 0;
                }
            }
            for (int64_t t = 0; t < n_terms; t++) {
                const REAL *ph = phi + quad[t] * LANES;
                REAL *dp = dphi + quad[t] * LANES;
                const REAL per = p2[t], phase = p0[t], kt = p1[t];
                /* two loops: one with cos and one with sin, or the compiler merges them
                 * into a scalar sincos call */
                BLOOP { e[l] += kt * (1 + COS(per * ph[l] - phase)); }
                if (grad) BLOOP { dp[l] -= kt * per * SIN(per * ph[l] - phase); }
            }
            if (grad) {
                for (int64_t t = 0; t < n; t++) {
                    const int64_t q0 = idx[4 * t], q1 = idx[4 * t + 1], q2 = idx[4 * t + 2];
                    const int64_t q3 = idx[4 * t + 3];
                    const REAL *dp = dphi + t * LANES;
                    BLOOP {
                        REAL f0 = BAT(X, q0, 0)[l] - BAT(X, q1, 0)[l];
                        REAL f1 = BAT(X, q0, 1)[l] - BAT(X, q1, 1)[l];
                        REAL f2 = BAT(X, q0, 2)[l] - BAT(X, q1, 2)[l];
                        REAL g0 = BAT(X, q1, 0)[l] - BAT(X, q2, 0)[l];
                        REAL g1 = BAT(X, q1, 1)[l] - BAT(X, q2, 1)[l];
                        REAL g2 = BAT(X, q1, 2)[l] - BAT(X, q2, 2)[l];
                        REAL h0 = BAT(X, q3, 0)[l] - BAT(X, q2, 0)[l];
                        REAL h1 = BAT(X, q3, 1)[l] - BAT(X, q2, 1)[l];
                        REAL h2 = BAT(X, q3, 2)[l] - BAT(X, q2, 2)[l];
                        REAL a0 = f1 * g2 - f2 * g1, a1 = f2 * g0 - f0 * g2;
                        REAL a2 = f0 * g1 - f1 * g0;
                        REAL c0 = h1 * g2 - h2 * g1, c1 = h2 * g0 - h0 * g2;
                        REAL c2 = h0 * g1 - h1 * g0;
                        REAL gsq = g0 * g0 + g1 * g1 + g2 * g2, gn = SQRT(gsq);
                        REAL s0 = dp[l] * gn / (a0 * a0 + a1 * a1 + a2 * a2);
                        REAL s3 = dp[l] * gn / (c0 * c0 + c1 * c1 + c2 * c2);
                        REAL fg = (f0 * g0 + f1 * g1 + f2 * g2) / gsq;
                        REAL hg = (h0 * g0 + h1 * g1 + h2 * g2) / gsq;
                        REAL sa0 = s0 * a0, sa1 = s0 * a1, sa2 = s0 * a2;
                        REAL sb0 = s3 * c0, sb1 = s3 * c1, sb2 = s3 * c2;
                        /* dE/df = -sa, dE/dg = fg sa - hg sb, dE/dh = sb */
                        REAL dg0 = fg * sa0 - hg * sb0, dg1 = fg * sa1 - hg * sb1;
                        REAL dg2 = fg * sa2 - hg * sb2;
                        BAT(G, q0, 0)[l] -= sa0; BAT(G, q0, 1)[l] -= sa1; BAT(G, q0, 2)[l] -= sa2;
                        BAT(G, q1, 0)[l] += sa0 + dg0; BAT(G, q1, 1)[l] += sa1 + dg1;
                        BAT(G, q1, 2)[l] += sa2 + dg2;
                        BAT(G, q2, 0)[l] -= dg0 + sb0; BAT(G, q2, 1)[l] -= dg1 + sb1;
                        BAT(G, q2, 2)[l] -= dg2 + sb2;
                        BAT(G, q3, 0)[l] += sb0; BAT(G, q3, 1)[l] += sb1; BAT(G, q3, 2)[l] += sb2;
                    }
                }
            }
        }
        const int64_t nl = B - b0 < LANES ? B - b0 : LANES;
        for (int64_t l = 0; l < nl; l++) energy[b0 + l] = e[l];
        if (grad) BFN(store_grad)(G, grad, B, N, b0);
    }
    free(work);
    return 0;
}
#undef BAT
