/* Pair terms of TorchEnergy (Coulomb + Lennard-Jones with OpenMM's exceptions, OBC
 * generalised Born with ACE surface area) for LANES configurations at a time; included twice by
 * kernels.c (REAL = float, double). The maths is that of
 * boltzgen/energy/torch_energy.py (_dense_nonbonded_from_r2) and gb.py (GBSAOBCTerm._born,
 * _gb_from_r2), evaluated pair by pair instead of on (B, N, N) matrices. */
/* What the descreening integral I_ij of atom i (offset radius ori) by atom j (scaled radius srj)
 * at distance r is made of, as GBSAOBCTerm._born: active pairs have r > th (= ori - srj); the
 * others are evaluated at th and masked out. */
typedef struct {
    REAL r, inv_r, inv_u, inv_l, lower, diff, diff_ul, a, log_lu;
    int active, use_diff, engulfed;
} FN(descreen_t);

static inline FN(descreen_t) FN(descreen)(REAL r, REAL th, REAL ori, REAL srj, int engulfed_term) {
    FN(descreen_t) q;
    q.active = r > th;
    r = r > th ? r : th;
    q.r = r;
    q.inv_u = 1 / (r + srj);
    q.diff = r - srj;
    REAL ad = q.diff < 0 ? -q.diff : q.diff;
    q.use_diff = ad > ori;
    q.lower = q.use_diff ? ad : ori;
    q.inv_l = 1 / q.lower;
    q.inv_r = 1 / r;
    q.diff_ul = q.inv_u * q.inv_u - q.inv_l * q.inv_l;
    q.a = r - srj * srj * q.inv_r;
    q.log_lu = LOG(q.lower * q.inv_u);
    q.engulfed = engulfed_term && ori < srj - r;
    return q;
}

/* Energies e_nb, e_gb (B,) and, unless grad is NULL, dE/dx (B, N, 3) of positions x (B, N, 3)
 * added to grad.
 * nb_*: (N, N) pair matrices as _DenseNonbonded's (half weights on both triangles) or NULL;
 * gb_qq, thr: (N, N); the other gb_* arrays (N,); see GBSAOBCTerm. */
int FN(pairs_eval)(int64_t B, int64_t N, const REAL *x, const REAL *nb_qq,
                    const REAL *nb_eps4, const REAL *nb_sigma6, const REAL *gb_qq,
                    const REAL *thr, const REAL *g_or, const REAL *g_sr, const REAL *half_or,
                    const REAL *inv_or, const REAL *inv_radius, const REAL *or_over_radius,
                    const REAL *sa_coef, REAL alpha, REAL beta, REAL gamma, REAL prefactor,
                    int surface, int engulfed_term, REAL *e_nb, REAL *e_gb, REAL *grad) {
    const int64_t n3 = 3 * N * LANES;
    REAL *work = (REAL *)malloc(sizeof(REAL) * (size_t)(2 * n3 + 6 * N * LANES));
    if (!work) return -2;
    REAL *X = work, *G = work + n3;          /* [N][3][LANES] positions, gradient */
    REAL *psi = G + n3, *tt = psi + N * LANES, *born = tt + N * LANES;
    REAL *dborn = born + N * LANES, *dint = dborn + N * LANES, *inv_born = dint + N * LANES;
    for (int64_t b0 = 0; b0 < B; b0 += LANES) {
        const int64_t nl = B - b0 < LANES ? B - b0 : LANES;
        FN(load_x)(X, x, B, N, b0);
        for (int64_t q = 0; q < n3; q++) G[q] = 0;
        REAL enb[LANES], egb[LANES], esa[LANES];
        LOOP { enb[l] = 0; egb[l] = 0; esa[l] = 0; }
        /* Coulomb + LJ: each unordered pair once, twice the half-weight entry */
        if (nb_qq) {
            for (int64_t i = 0; i < N; i++) {
                for (int64_t j = i + 1; j < N; j++) {
                    const REAL qq = 2 * nb_qq[i * N + j], e4 = 2 * nb_eps4[i * N + j];
                    if (qq == 0 && e4 == 0) continue; /* excluded pair */
                    const REAL s6 = nb_sigma6[i * N + j];
                    const REAL *xi0 = AT(X, i, 0), *xi1 = AT(X, i, 1), *xi2 = AT(X, i, 2);
                    const REAL *xj0 = AT(X, j, 0), *xj1 = AT(X, j, 1), *xj2 = AT(X, j, 2);
                    REAL *gi0 = AT(G, i, 0), *gi1 = AT(G, i, 1), *gi2 = AT(G, i, 2);
                    REAL *gj0 = AT(G, j, 0), *gj1 = AT(G, j, 1), *gj2 = AT(G, j, 2);
                    LOOP {
                        REAL d0 = xi0[l] - xj0[l], d1 = xi1[l] - xj1[l], d2 = xi2[l] - xj2[l];
                        REAL r2 = d0 * d0 + d1 * d1 + d2 * d2;
                        REAL inv_r2 = 1 / r2;
                        REAL coul = qq * SQRT(inv_r2);
                        REAL sr6 = s6 * inv_r2 * inv_r2 * inv_r2;
                        REAL lj6 = e4 * sr6, lj12 = lj6 * sr6;
                        enb[l] += coul + lj12 - lj6;
                        /* dE/dr2 = (-coul / 2 - 6 lj12 + 3 lj6) / r2; dr2/dx_i = 2 d */
                        REAL g = 2 * ((3 * lj6 - 6 * lj12 - (REAL)0.5 * coul) * inv_r2);
                        gi0[l] += g * d0; gi1[l] += g * d1; gi2[l] += g * d2;
                        gj0[l] -= g * d0; gj1[l] -= g * d1; gj2[l] -= g * d2;
                    }
                }
            }
        }
        if (gb_qq) {
            /* Born radii: psi_i = or_i / 2 sum_j I_ij over descreening pairs */
            for (int64_t i = 0; i < N; i++) {
                REAL *ps = ROW(psi, i);
                LOOP { ps[l] = 0; }
                const REAL ori = g_or[i];
                for (int64_t j = 0; j < N; j++) {
                    if (j == i) continue;
                    const REAL srj = g_sr[j], th = thr[i * N + j];
                    const REAL *xi0 = AT(X, i, 0), *xi1 = AT(X, i, 1), *xi2 = AT(X, i, 2);
                    const REAL *xj0 = AT(X, j, 0), *xj1 = AT(X, j, 1), *xj2 = AT(X, j, 2);
                    LOOP {
                        REAL d0 = xi0[l] - xj0[l], d1 = xi1[l] - xj1[l], d2 = xi2[l] - xj2[l];
                        FN(descreen_t) q = FN(descreen)(SQRT(d0 * d0 + d1 * d1 + d2 * d2), th,
                                                        ori, srj, engulfed_term);
                        REAL term = (q.inv_l - q.inv_u) + (REAL)0.25 * q.a * q.diff_ul
                                    + (REAL)0.5 * q.log_lu * q.inv_r;
                        if (q.engulfed) term += 2 / ori - 2 * q.inv_l;
                        ps[l] += q.active ? term : 0;
                    }
                }
                REAL *ti = ROW(tt, i), *bi = ROW(born, i), *ib = ROW(inv_born, i);
                const REAL h_or = half_or[i], ior = inv_or[i], irad = inv_radius[i];
                LOOP {
                    REAL p = h_or * ps[l];
                    ps[l] = p;
                    REAL tv = TANH(p * (alpha + p * (gamma * p - beta)));
                    ti[l] = tv;
                    bi[l] = 1 / (ior - tv * irad);
                    ib[l] = 1 / bi[l];
                }
            }
            /* polar energy over all ordered pairs (diagonal: the self energy) and dE/dB */
            for (int64_t i = 0; i < N; i++) {
                REAL *db = ROW(dborn, i);
                LOOP { db[l] = 0; }
                const REAL *bi = ROW(born, i), *ibi = ROW(inv_born, i);
                for (int64_t j = 0; j < N; j++) {
                    const REAL qq = gb_qq[i * N + j];
                    const REAL *bj = ROW(born, j), *ibj = ROW(inv_born, j);
                    const REAL *xi0 = AT(X, i, 0), *xi1 = AT(X, i, 1), *xi2 = AT(X, i, 2);
                    const REAL *xj0 = AT(X, j, 0), *xj1 = AT(X, j, 1), *xj2 = AT(X, j, 2);
                    LOOP {
                        REAL d0 = xi0[l] - xj0[l], d1 = xi1[l] - xj1[l], d2 = xi2[l] - xj2[l];
                        REAL r2 = d0 * d0 + d1 * d1 + d2 * d2;
                        REAL neg_q = r2 * ((REAL)-0.25 * ibi[l] * ibj[l]);
                        REAL e = EXP(neg_q);
                        REAL inv_f = 1 / SQRT(r2 + bi[l] * bj[l] * e);
                        REAL pair = qq * inv_f;
                        egb[l] += pair;
                        REAL he = pair * inv_f * inv_f * e;
                        db[l] += (he - he * neg_q) * bj[l];
                    }
                }
            }
            for (int64_t i = 0; i < N; i++) {
                REAL *db = ROW(dborn, i), *di = ROW(dint, i);
                const REAL *bi = ROW(born, i), *ibi = ROW(inv_born, i), *ti = ROW(tt, i);
                const REAL *ps = ROW(psi, i);
                const REAL sac = sa_coef[i], oor = or_over_radius[i];
                LOOP {
                    REAL d = -prefactor * db[l];
                    if (surface) {
                        REAL ib2 = ibi[l] * ibi[l];
                        REAL sa = sac * ib2 * ib2 * ib2;
                        esa[l] += sa;
                        d -= 6 * sa * ibi[l];
                    }
                    REAL p = ps[l];
                    REAL dpsi = alpha + p * (3 * gamma * p - 2 * beta);
                    di[l] = d * bi[l] * bi[l] * (1 - ti[l] * ti[l]) * dpsi * oor;
                }
            }
            if (grad) {
                /* dE/dr2_ij: explicit part and the part through the Born radius of i */
                for (int64_t i = 0; i < N; i++) {
                    const REAL ori = g_or[i];
                    const REAL *bi = ROW(born, i), *ibi = ROW(inv_born, i), *di = ROW(dint, i);
                    for (int64_t j = 0; j < N; j++) {
                        if (j == i) continue;
                        const REAL qq = gb_qq[i * N + j], srj = g_sr[j], th = thr[i * N + j];
                        const REAL *bj = ROW(born, j), *ibj = ROW(inv_born, j);
                        const REAL *xi0 = AT(X, i, 0), *xi1 = AT(X, i, 1), *xi2 = AT(X, i, 2);
                        const REAL *xj0 = AT(X, j, 0), *xj1 = AT(X, j, 1), *xj2 = AT(X, j, 2);
                        REAL *gi0 = AT(G, i, 0), *gi1 = AT(G, i, 1), *gi2 = AT(G, i, 2);
                        REAL *gj0 = AT(G, j, 0), *gj1 = AT(G, j, 1), *gj2 = AT(G, j, 2);
                        LOOP {
                            REAL d0 = xi0[l] - xj0[l], d1 = xi1[l] - xj1[l];
                            REAL d2 = xi2[l] - xj2[l];
                            REAL r2 = d0 * d0 + d1 * d1 + d2 * d2;
                            REAL neg_q = r2 * ((REAL)-0.25 * ibi[l] * ibj[l]);
                            REAL e = EXP(neg_q);
                            REAL inv_f = 1 / SQRT(r2 + bi[l] * bj[l] * e);
                            REAL h = qq * inv_f * inv_f * inv_f;
                            REAL g = (h - (REAL)0.25 * h * e) * ((REAL)-0.5 * prefactor);
                            FN(descreen_t) q = FN(descreen)(SQRT(r2), th, ori, srj,
                                                            engulfed_term);
                            /* dI_ij/dr (times 2), as _gb_from_r2's d_term */
                            REAL inv_r = q.inv_r, inv_u = q.inv_u, inv_l = q.inv_l, a = q.a;
                            REAL inv_u2 = inv_u * inv_u;
                            REAL inv_d = q.use_diff ? 1 / q.diff : 0;
                            REAL lp = inv_d * inv_l;
                            REAL dt = inv_u2 - lp + (REAL)0.25 * (2 - a * inv_r) * q.diff_ul
                                      + (REAL)0.5 * a * (lp * inv_l - inv_u2 * inv_u)
                                      + (REAL)0.5 * inv_r * (inv_d - inv_u - q.log_lu * inv_r);
                            if (q.engulfed) dt += 2 * lp;
                            g += q.active ? dt * inv_r * (REAL)0.25 * di[l] : 0;
                            g *= 2; /* dr2/dx_i = 2 d */
                            gi0[l] += g * d0; gi1[l] += g * d1; gi2[l] += g * d2;
                            gj0[l] -= g * d0; gj1[l] -= g * d1; gj2[l] -= g * d2;
                        }
                    }
                }
            }
            LOOP { egb[l] = prefactor * egb[l] + esa[l]; }
        }
        for (int64_t l = 0; l < nl; l++) {
            if (e_nb) e_nb[b0 + l] = enb[l];
            if (e_gb) e_gb[b0 + l] = egb[l];
        }
        if (grad) FN(add_grad)(G, grad, B, N, b0);
    }
    free(work);
    return 0;
}
