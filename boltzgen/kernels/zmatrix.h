/* Internal -> Cartesian coordinates of a Z-matrix (boltzgen.coordinates.InternalCoordinates,
 * forward direction) with its log-det, and the analytic backward, for LANES configurations at
 * a time; included twice by kernels.c (REAL = float, double). The maths is that of
 * internal.py (_denormalise, the seed rows, _place_full_rows, _log_det_raw) and
 * geometry.place_local (NeRF).
 *
 * z (B, D) normalised coordinates, D = 3 N - 6, laid out as internal.py's raw vector:
 * bonds [0, N - 1) (seed bonds z0-z1, z2, then one per full row), angles [N - 1, 2 N - 3)
 * (seed angle, then one per full row), torsions [2 N - 3, D) (one per full row).
 * rows (R, 4): atoms d, c, b, a of the R = N - 3 full rows, in an order where every reference
 * is a seed atom or placed by an earlier row. */

typedef struct {
    int64_t N, D, R;
    const int64_t *rows;
    int64_t z0, z1, z2;
    int c2_is_z1;
    const REAL *scale, *shift;
} FN(zmat_t);

/* raw coordinates RAW[D][LANES] of configurations b0 .. (the last repeated) and positions
 * X[N][3][LANES] */
static void FN(zmat_place)(const FN(zmat_t) *m, const REAL *z, int64_t B, int64_t b0, REAL *RAW,
                           REAL *X) {
    const int64_t N = m->N, D = m->D;
    for (int l = 0; l < LANES; l++) {
        const int64_t b = b0 + l < B ? b0 + l : B - 1;
        for (int64_t j = 0; j < D; j++) ROW(RAW, j)[l] = z[b * D + j];
    }
    for (int64_t j = 0; j < D; j++) {
        const REAL sc = m->scale[j], sh = m->shift[j];
        REAL *r = ROW(RAW, j);
        LOOP { r[l] = r[l] * sc + sh; }
    }
    for (int64_t q = 0; q < 3 * N * LANES; q++) X[q] = 0;
    const REAL *bond0 = ROW(RAW, 0), *r2 = ROW(RAW, 1), *t2 = ROW(RAW, N - 1);
    REAL *x1 = AT(X, m->z1, 0), *x20 = AT(X, m->z2, 0), *x21 = AT(X, m->z2, 1);
    LOOP {
        x1[l] = bond0[l];
        REAL rc = r2[l] * COS(t2[l]);
        x20[l] = m->c2_is_z1 ? bond0[l] - rc : rc;
        x21[l] = r2[l] * SIN(t2[l]);
    }
    for (int64_t k = 0; k < m->R; k++) {
        const int64_t *row = m->rows + 4 * k;
        const REAL *r = ROW(RAW, 2 + k), *th = ROW(RAW, N + k), *ph = ROW(RAW, 2 * N - 3 + k);
        const REAL *a0 = AT(X, row[3], 0), *a1 = AT(X, row[3], 1), *a2 = AT(X, row[3], 2);
        const REAL *b0_ = AT(X, row[2], 0), *b1 = AT(X, row[2], 1), *b2 = AT(X, row[2], 2);
        const REAL *c0 = AT(X, row[1], 0), *c1 = AT(X, row[1], 1), *c2 = AT(X, row[1], 2);
        REAL *d0 = AT(X, row[0], 0), *d1 = AT(X, row[0], 1), *d2 = AT(X, row[0], 2);
        LOOP {
            REAL rs = r[l] * SIN(th[l]);
            REAL l0 = -r[l] * COS(th[l]), l1 = rs * COS(ph[l]), l2 = rs * SIN(ph[l]);
            REAL w0 = c0[l] - b0_[l], w1 = c1[l] - b1[l], w2 = c2[l] - b2[l];
            REAL iw = 1 / SQRT(w0 * w0 + w1 * w1 + w2 * w2);
            REAL e0 = w0 * iw, e1 = w1 * iw, e2 = w2 * iw; /* bc */
            REAL v0 = b0_[l] - a0[l], v1 = b1[l] - a1[l], v2 = b2[l] - a2[l];
            REAL u0 = v1 * e2 - v2 * e1, u1 = v2 * e0 - v0 * e2, u2 = v0 * e1 - v1 * e0;
            REAL iu = 1 / SQRT(u0 * u0 + u1 * u1 + u2 * u2);
            REAL n0 = u0 * iu, n1 = u1 * iu, n2 = u2 * iu;
            REAL m0 = n1 * e2 - n2 * e1, m1 = n2 * e0 - n0 * e2, m2 = n0 * e1 - n1 * e0;
            d0[l] = c0[l] + l0 * e0 + l1 * m0 + l2 * n0;
            d1[l] = c1[l] + l0 * e1 + l1 * m1 + l2 * n1;
            d2[l] = c2[l] + l0 * e2 + l1 * m2 + l2 * n2;
        }
    }
}

static REAL *FN(zmat_work)(const FN(zmat_t) *m, int grad) {
    /* RAW and X; with grad also their gradients */
    return (REAL *)malloc(sizeof(REAL) * (size_t)((m->D + 3 * m->N) * (grad ? 2 : 1) * LANES));
}

/* x (B, N, 3) and log|det| (B,) of the forward map; log_scale_sum = sum(log scale) */
int FN(zmat_fwd)(int64_t B, int64_t N, int64_t R, const int64_t *rows, int64_t z0, int64_t z1,
                 int64_t z2, int c2_is_z1, const REAL *scale, const REAL *shift,
                 REAL log_scale_sum, const REAL *z, REAL *x, REAL *ld) {
    FN(zmat_t) m = {N, 3 * N - 6, R, rows, z0, z1, z2, c2_is_z1, scale, shift};
    if (R != N - 3) return -1;
    REAL *work = FN(zmat_work)(&m, 0);
    if (!work) return -2;
    REAL *RAW = work, *X = work + m.D * LANES;
    for (int64_t b0 = 0; b0 < B; b0 += LANES) {
        FN(zmat_place)(&m, z, B, b0, RAW, X);
        /* sums in double: float32 round-off of a long sum would exceed torch's */
        double sb[LANES], sa[LANES], acc[LANES];
        const REAL *r1 = ROW(RAW, 1);
        LOOP { sb[l] = 0; sa[l] = 0; }
        for (int64_t k = 0; k < R; k++) {
            const REAL *r = ROW(RAW, 2 + k), *th = ROW(RAW, N + k);
            LOOP {
                sb[l] += (double)LOG(FABS(r[l]));
                sa[l] += (double)LOG(FABS(SIN(th[l])));
            }
        }
        LOOP { acc[l] = ((double)LOG(FABS(r1[l])) + 2 * sb[l] + sa[l]) + (double)log_scale_sum; }
        const int64_t n = B - b0 < LANES ? B - b0 : LANES;
        for (int64_t l = 0; l < n; l++) {
            ld[b0 + l] = (REAL)acc[l];
            for (int64_t i = 0; i < N; i++)
                for (int k = 0; k < 3; k++) x[((b0 + l) * N + i) * 3 + k] = AT(X, i, k)[l];
        }
    }
    free(work);
    return 0;
}

/* g_z (B, D) for upstream gradients g_x (B, N, 3) (NULL: zero) and g_ld (B,) (NULL: zero) */
int FN(zmat_bwd)(int64_t B, int64_t N, int64_t R, const int64_t *rows, int64_t z0, int64_t z1,
                 int64_t z2, int c2_is_z1, const REAL *scale, const REAL *shift,
                 const REAL *z, const REAL *g_x, const REAL *g_ld, REAL *g_z) {
    FN(zmat_t) m = {N, 3 * N - 6, R, rows, z0, z1, z2, c2_is_z1, scale, shift};
    if (R != N - 3) return -1;
    const int64_t D = m.D;
    REAL *work = FN(zmat_work)(&m, 1);
    if (!work) return -2;
    REAL *RAW = work, *X = RAW + D * LANES, *GR = X + 3 * N * LANES, *G = GR + D * LANES;
    for (int64_t b0 = 0; b0 < B; b0 += LANES) {
        FN(zmat_place)(&m, z, B, b0, RAW, X);
        for (int64_t q = 0; q < D * LANES; q++) GR[q] = 0;
        for (int l = 0; l < LANES; l++) {
            const int64_t b = b0 + l < B ? b0 + l : B - 1;
            for (int64_t i = 0; i < N; i++)
                for (int k = 0; k < 3; k++) AT(G, i, k)[l] = g_x ? g_x[(b * N + i) * 3 + k] : 0;
        }
        /* log|det|: d/dr log|r| = 1 / r, d/dtheta log|sin theta| = cot theta */
        if (g_ld) {
            REAL gl[LANES];
            for (int l = 0; l < LANES; l++) gl[l] = g_ld[b0 + l < B ? b0 + l : B - 1];
            const REAL *r1 = ROW(RAW, 1);
            REAL *g1 = ROW(GR, 1);
            LOOP { g1[l] += gl[l] / r1[l]; }
            for (int64_t k = 0; k < R; k++) {
                const REAL *r = ROW(RAW, 2 + k), *th = ROW(RAW, N + k);
                REAL *gr = ROW(GR, 2 + k), *gt = ROW(GR, N + k);
                LOOP {
                    gr[l] += 2 * gl[l] / r[l];
                    gt[l] += gl[l] * COS(th[l]) / SIN(th[l]);
                }
            }
        }
        for (int64_t k = R - 1; k >= 0; k--) {
            const int64_t *row = m.rows + 4 * k;
            const REAL *r = ROW(RAW, 2 + k), *th = ROW(RAW, N + k), *ph = ROW(RAW, 2 * N - 3 + k);
            REAL *g_r = ROW(GR, 2 + k), *g_th = ROW(GR, N + k), *g_ph = ROW(GR, 2 * N - 3 + k);
            const REAL *a0 = AT(X, row[3], 0), *a1 = AT(X, row[3], 1), *a2 = AT(X, row[3], 2);
            const REAL *b0_ = AT(X, row[2], 0), *b1 = AT(X, row[2], 1), *b2 = AT(X, row[2], 2);
            const REAL *c0 = AT(X, row[1], 0), *c1 = AT(X, row[1], 1), *c2 = AT(X, row[1], 2);
            const REAL *gd0 = AT(G, row[0], 0), *gd1 = AT(G, row[0], 1), *gd2 = AT(G, row[0], 2);
            REAL *ga0 = AT(G, row[3], 0), *ga1 = AT(G, row[3], 1), *ga2 = AT(G, row[3], 2);
            REAL *gb0 = AT(G, row[2], 0), *gb1 = AT(G, row[2], 1), *gb2 = AT(G, row[2], 2);
            REAL *gc0 = AT(G, row[1], 0), *gc1 = AT(G, row[1], 1), *gc2 = AT(G, row[1], 2);
            LOOP {
                REAL st = SIN(th[l]), ct = COS(th[l]), sp = SIN(ph[l]), cp = COS(ph[l]);
                REAL rs = r[l] * st;
                REAL l0 = -r[l] * ct, l1 = rs * cp, l2 = rs * sp;
                REAL w0 = c0[l] - b0_[l], w1 = c1[l] - b1[l], w2 = c2[l] - b2[l];
                REAL iw = 1 / SQRT(w0 * w0 + w1 * w1 + w2 * w2);
                REAL e0 = w0 * iw, e1 = w1 * iw, e2 = w2 * iw;
                REAL v0 = b0_[l] - a0[l], v1 = b1[l] - a1[l], v2 = b2[l] - a2[l];
                REAL u0 = v1 * e2 - v2 * e1, u1 = v2 * e0 - v0 * e2, u2 = v0 * e1 - v1 * e0;
                REAL iu = 1 / SQRT(u0 * u0 + u1 * u1 + u2 * u2);
                REAL n0 = u0 * iu, n1 = u1 * iu, n2 = u2 * iu;
                REAL m0 = n1 * e2 - n2 * e1, m1 = n2 * e0 - n0 * e2, m2 = n0 * e1 - n1 * e0;
                const REAL g0 = gd0[l], g1 = gd1[l], g2 = gd2[l];
                /* d = c + l0 e + l1 m + l2 n */
                REAL gl0 = g0 * e0 + g1 * e1 + g2 * e2;
                REAL gl1 = g0 * m0 + g1 * m1 + g2 * m2;
                REAL gl2 = g0 * n0 + g1 * n1 + g2 * n2;
                REAL ge0 = l0 * g0, ge1 = l0 * g1, ge2 = l0 * g2;
                REAL gm0 = l1 * g0, gm1 = l1 * g1, gm2 = l1 * g2;
                REAL gn0 = l2 * g0, gn1 = l2 * g1, gn2 = l2 * g2;
                /* m = n x e */
                gn0 += e1 * gm2 - e2 * gm1; gn1 += e2 * gm0 - e0 * gm2; gn2 += e0 * gm1 - e1 * gm0;
                ge0 += gm1 * n2 - gm2 * n1; ge1 += gm2 * n0 - gm0 * n2; ge2 += gm0 * n1 - gm1 * n0;
                /* n = u / |u| */
                REAL pn = n0 * gn0 + n1 * gn1 + n2 * gn2;
                REAL gu0 = (gn0 - n0 * pn) * iu, gu1 = (gn1 - n1 * pn) * iu, gu2 = (gn2 - n2 * pn) * iu;
                /* u = v x e, v = b - a */
                REAL gv0 = e1 * gu2 - e2 * gu1, gv1 = e2 * gu0 - e0 * gu2, gv2 = e0 * gu1 - e1 * gu0;
                ge0 += gu1 * v2 - gu2 * v1; ge1 += gu2 * v0 - gu0 * v2; ge2 += gu0 * v1 - gu1 * v0;
                /* e = w / |w|, w = c - b */
                REAL pe = e0 * ge0 + e1 * ge1 + e2 * ge2;
                REAL gw0 = (ge0 - e0 * pe) * iw, gw1 = (ge1 - e1 * pe) * iw, gw2 = (ge2 - e2 * pe) * iw;
                gc0[l] += g0 + gw0; gc1[l] += g1 + gw1; gc2[l] += g2 + gw2;
                gb0[l] += gv0 - gw0; gb1[l] += gv1 - gw1; gb2[l] += gv2 - gw2;
                ga0[l] -= gv0; ga1[l] -= gv1; ga2[l] -= gv2;
                /* l0 = -r cos t, l1 = r sin t cos p, l2 = r sin t sin p */
                g_r[l] += -gl0 * ct + (gl1 * cp + gl2 * sp) * st;
                g_th[l] += r[l] * (gl0 * st + (gl1 * cp + gl2 * sp) * ct);
                g_ph[l] += rs * (gl2 * cp - gl1 * sp);
            }
        }
        {   /* seeds: x_z1 = (bond0, 0, 0); x_z2 = (bond0 - r2 cos t2 | r2 cos t2, r2 sin t2, 0) */
            const REAL *r2 = ROW(RAW, 1), *t2 = ROW(RAW, N - 1);
            const REAL *gx1 = AT(G, m.z1, 0), *gx20 = AT(G, m.z2, 0), *gx21 = AT(G, m.z2, 1);
            REAL *gb0v = ROW(GR, 0), *gr2 = ROW(GR, 1), *gt2 = ROW(GR, N - 1);
            const REAL sgn = m.c2_is_z1 ? -1 : 1;
            LOOP {
                REAL c = COS(t2[l]), s = SIN(t2[l]);
                gb0v[l] += gx1[l] + (m.c2_is_z1 ? gx20[l] : 0);
                gr2[l] += sgn * gx20[l] * c + gx21[l] * s;
                gt2[l] += -sgn * gx20[l] * r2[l] * s + gx21[l] * r2[l] * c;
            }
        }
        const int64_t n = B - b0 < LANES ? B - b0 : LANES;
        for (int64_t j = 0; j < D; j++) {
            const REAL sc = m.scale[j];
            const REAL *g = ROW(GR, j);
            for (int64_t l = 0; l < n; l++) g_z[(b0 + l) * D + j] = g[l] * sc;
        }
    }
    free(work);
    return 0;
}
