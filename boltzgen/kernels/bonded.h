/* Bonded terms of TorchEnergy (harmonic bonds and angles, periodic torsions) for LANES
 * configurations at a time; included twice by kernels.c (REAL = float, double). The maths is
 * that of boltzgen/energy/torch_energy.py (_bond_from_vectors, _angle_from_vectors,
 * _torsion_from_vectors). Each function writes its energy (B,) and adds its gradient to grad
 * (B, N, 3) unless grad is NULL. */
/* kind 0: bonds (idx (n, 2): minus, plus; p0 = r0, p1 = k); kind 1: angles (idx (n, 3), the
 * middle atom the vertex; p0 = theta0, p1 = k); kind 2: torsions over unique quads (idx
 * (n, 4)), with n_terms terms (quad index, periodicity p2, phase p0, k p1). */
int FN(bonded_eval)(int64_t B, int64_t N, const REAL *x, int kind, int64_t n,
                     const int64_t *idx, int64_t n_terms, const int64_t *quad,
                     const REAL *p0, const REAL *p1, const REAL *p2, REAL *energy, REAL *grad) {
    /* torsions: per unique quad the dihedral, dE/dphi and the vectors its gradient needs */
    const int64_t per_quad = kind == 2 ? 11 : 0;
    REAL *work = (REAL *)malloc(sizeof(REAL) * (size_t)((6 * N + per_quad * n) * LANES));
    if (!work) return -2;
    REAL *X = work, *G = work + 3 * N * LANES;
    REAL *phi = G + 3 * N * LANES, *dphi = phi + n * LANES, *tv = dphi + n * LANES;
#define TV(t, k) (tv + ((t) * 9 + (k)) * LANES)
    const REAL tiny = sizeof(REAL) == 4 ? (REAL)1.17549435e-38f : (REAL)2.2250738585072014e-308;
    for (int64_t b0 = 0; b0 < B; b0 += LANES) {
        FN(load_x)(X, x, B, N, b0);
        /* bonds and angles accumulate their gradient into G whether or not it is asked for:
         * a store under a condition inside a lane loop becomes a masked store (microcoded on
         * AMD CPUs), dearer than the gradient itself */
        for (int64_t q = 0; q < 3 * N * LANES; q++) G[q] = 0;
        REAL e[LANES];
        LOOP { e[l] = 0; }
        if (kind == 0) {
            for (int64_t t = 0; t < n; t++) {
                const int64_t i = idx[2 * t], j = idx[2 * t + 1];
                const REAL r0 = p0[t], kb = p1[t];
                const REAL *xi0 = AT(X, i, 0), *xi1 = AT(X, i, 1), *xi2 = AT(X, i, 2);
                const REAL *xj0 = AT(X, j, 0), *xj1 = AT(X, j, 1), *xj2 = AT(X, j, 2);
                REAL *gi0 = AT(G, i, 0), *gi1 = AT(G, i, 1), *gi2 = AT(G, i, 2);
                REAL *gj0 = AT(G, j, 0), *gj1 = AT(G, j, 1), *gj2 = AT(G, j, 2);
                LOOP {
                    REAL d0 = xj0[l] - xi0[l], d1 = xj1[l] - xi1[l], d2 = xj2[l] - xi2[l];
                    REAL r = SQRT(d0 * d0 + d1 * d1 + d2 * d2);
                    REAL k_dr = kb * (r - r0);
                    e[l] += (REAL)0.5 * k_dr * (r - r0);
                    REAL s = k_dr / r;
                    gj0[l] += s * d0; gj1[l] += s * d1; gj2[l] += s * d2;
                    gi0[l] -= s * d0; gi1[l] -= s * d1; gi2[l] -= s * d2;
                }
            }
        } else if (kind == 1) {
            for (int64_t t = 0; t < n; t++) {
                const int64_t i = idx[3 * t], j = idx[3 * t + 1], k = idx[3 * t + 2];
                const REAL th0 = p0[t], ka = p1[t];
                const REAL *xi0 = AT(X, i, 0), *xi1 = AT(X, i, 1), *xi2 = AT(X, i, 2);
                const REAL *xj0 = AT(X, j, 0), *xj1 = AT(X, j, 1), *xj2 = AT(X, j, 2);
                const REAL *xk0 = AT(X, k, 0), *xk1 = AT(X, k, 1), *xk2 = AT(X, k, 2);
                REAL *gi0 = AT(G, i, 0), *gi1 = AT(G, i, 1), *gi2 = AT(G, i, 2);
                REAL *gj0 = AT(G, j, 0), *gj1 = AT(G, j, 1), *gj2 = AT(G, j, 2);
                REAL *gk0 = AT(G, k, 0), *gk1 = AT(G, k, 1), *gk2 = AT(G, k, 2);
                LOOP {
                    REAL a0 = xi0[l] - xj0[l], a1 = xi1[l] - xj1[l], a2 = xi2[l] - xj2[l];
                    REAL b0_ = xk0[l] - xj0[l], b1 = xk1[l] - xj1[l], b2 = xk2[l] - xj2[l];
                    REAL ab = a0 * b0_ + a1 * b1 + a2 * b2;
                    REAL c0 = a1 * b2 - a2 * b1, c1 = a2 * b0_ - a0 * b2, c2 = a0 * b1 - a1 * b0_;
                    REAL cn = SQRT(c0 * c0 + c1 * c1 + c2 * c2);
                    REAL dth = ATAN2(cn, ab) - th0;
                    e[l] += (REAL)0.5 * ka * dth * dth;
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
        } else {
            /* dihedral of each unique quad (IUPAC sign, as OpenMM): f = x0 - x1, g = x1 - x2,
             * h = x3 - x2, a = f x g, b = h x g, phi = atan2(-|g| f.b, a.b) */
            for (int64_t t = 0; t < n; t++) {
                const int64_t q0 = idx[4 * t], q1 = idx[4 * t + 1], q2 = idx[4 * t + 2];
                const int64_t q3 = idx[4 * t + 3];
                REAL *ph = phi + t * LANES, *dp = dphi + t * LANES;
                REAL *a0_ = TV(t, 0), *a1_ = TV(t, 1), *a2_ = TV(t, 2), *c0_ = TV(t, 3);
                REAL *c1_ = TV(t, 4), *c2_ = TV(t, 5), *gn_ = TV(t, 6), *fg_ = TV(t, 7);
                REAL *hg_ = TV(t, 8);
                LOOP {
                    REAL f0 = AT(X, q0, 0)[l] - AT(X, q1, 0)[l];
                    REAL f1 = AT(X, q0, 1)[l] - AT(X, q1, 1)[l];
                    REAL f2 = AT(X, q0, 2)[l] - AT(X, q1, 2)[l];
                    REAL g0 = AT(X, q1, 0)[l] - AT(X, q2, 0)[l];
                    REAL g1 = AT(X, q1, 1)[l] - AT(X, q2, 1)[l];
                    REAL g2 = AT(X, q1, 2)[l] - AT(X, q2, 2)[l];
                    REAL h0 = AT(X, q3, 0)[l] - AT(X, q2, 0)[l];
                    REAL h1 = AT(X, q3, 1)[l] - AT(X, q2, 1)[l];
                    REAL h2 = AT(X, q3, 2)[l] - AT(X, q2, 2)[l];
                    REAL a0 = f1 * g2 - f2 * g1, a1 = f2 * g0 - f0 * g2, a2 = f0 * g1 - f1 * g0;
                    REAL c0 = h1 * g2 - h2 * g1, c1 = h2 * g0 - h0 * g2, c2 = h0 * g1 - h1 * g0;
                    REAL gsq = g0 * g0 + g1 * g1 + g2 * g2, gn = SQRT(gsq);
                    ph[l] = ATAN2(-gn * (f0 * c0 + f1 * c1 + f2 * c2),
                                  a0 * c0 + a1 * c1 + a2 * c2);
                    dp[l] = 0;
                    a0_[l] = a0, a1_[l] = a1, a2_[l] = a2, c0_[l] = c0, c1_[l] = c1, c2_[l] = c2;
                    gn_[l] = gn;
                    fg_[l] = (f0 * g0 + f1 * g1 + f2 * g2) / gsq;
                    hg_[l] = (h0 * g0 + h1 * g1 + h2 * g2) / gsq;
                }
            }
            for (int64_t t = 0; t < n_terms; t++) {
                const REAL *ph = phi + quad[t] * LANES;
                REAL *dp = dphi + quad[t] * LANES;
                const REAL per = p2[t], phase = p0[t], kt = p1[t];
                /* two loops: one with cos and one with sin, or the compiler merges them
                 * into a scalar sincos call */
                LOOP { e[l] += kt * (1 + COS(per * ph[l] - phase)); }
                if (grad) LOOP { dp[l] -= kt * per * SIN(per * ph[l] - phase); }
            }
            if (grad) {
                for (int64_t t = 0; t < n; t++) {
                    const int64_t q0 = idx[4 * t], q1 = idx[4 * t + 1], q2 = idx[4 * t + 2];
                    const int64_t q3 = idx[4 * t + 3];
                    const REAL *dp = dphi + t * LANES;
                    const REAL *a0_ = TV(t, 0), *a1_ = TV(t, 1), *a2_ = TV(t, 2);
                    const REAL *c0_ = TV(t, 3), *c1_ = TV(t, 4), *c2_ = TV(t, 5);
                    const REAL *gn_ = TV(t, 6), *fg_ = TV(t, 7), *hg_ = TV(t, 8);
                    LOOP {
                        REAL a0 = a0_[l], a1 = a1_[l], a2 = a2_[l];
                        REAL c0 = c0_[l], c1 = c1_[l], c2 = c2_[l];
                        REAL fg = fg_[l], hg = hg_[l];
                        REAL s0 = dp[l] * gn_[l] / (a0 * a0 + a1 * a1 + a2 * a2);
                        REAL s3 = dp[l] * gn_[l] / (c0 * c0 + c1 * c1 + c2 * c2);
                        REAL sa0 = s0 * a0, sa1 = s0 * a1, sa2 = s0 * a2;
                        REAL sb0 = s3 * c0, sb1 = s3 * c1, sb2 = s3 * c2;
                        /* dE/df = -sa, dE/dg = fg sa - hg sb, dE/dh = sb */
                        REAL dg0 = fg * sa0 - hg * sb0, dg1 = fg * sa1 - hg * sb1;
                        REAL dg2 = fg * sa2 - hg * sb2;
                        AT(G, q0, 0)[l] -= sa0; AT(G, q0, 1)[l] -= sa1; AT(G, q0, 2)[l] -= sa2;
                        AT(G, q1, 0)[l] += sa0 + dg0; AT(G, q1, 1)[l] += sa1 + dg1;
                        AT(G, q1, 2)[l] += sa2 + dg2;
                        AT(G, q2, 0)[l] -= dg0 + sb0; AT(G, q2, 1)[l] -= dg1 + sb1;
                        AT(G, q2, 2)[l] -= dg2 + sb2;
                        AT(G, q3, 0)[l] += sb0; AT(G, q3, 1)[l] += sb1; AT(G, q3, 2)[l] += sb2;
                    }
                }
            }
        }
        const int64_t nl = B - b0 < LANES ? B - b0 : LANES;
        for (int64_t l = 0; l < nl; l++) energy[b0 + l] = e[l];
        if (grad) FN(add_grad)(G, grad, B, N, b0);
    }
    free(work);
    return 0;
}
#undef TV
