/* Native kernels for the local-window reads of LMRC: LMR (eq. 4-5) and SLMR (eq. 6-8).
 *
 * Built at first use by lmrc/ops/local_window.py, once with -DLW_REAL=float -DLW_SUFFIX=_f32 and once with
 * -DLW_REAL=double -DLW_SUFFIX=_f64 (the double build exists so gradcheck can test this exact code).
 * Every tensor is a contiguous B x C x H x W array. A window tensor has O = (2R+1)^2 channels, offsets
 * row-major (dy outer, dx inner), each offset scaled by the dilation D. Neighbours outside the image are
 * skipped: similarity -inf, zero weight, zero gradient.
 *
 * Work is split over output rows (b, y): every row is written by exactly one thread, so the backward
 * passes are written as gathers (no atomics). Inner loops run over x on contiguous memory so the compiler
 * vectorises them. The autograd kernels allocate no memory: scratch space is a row of an output that is written
 * later. The inference kernels at the end allocate small per-thread scratch (a band of weight rows).
 */
#include <math.h>

#include "kernels.h"

/* Channels per pass of the similarity's interior blocks over a row (sim_row_inf) */
#ifndef LW_SIM_CHANNELS
#define LW_SIM_CHANNELS 32
#endif

/* Largest radius the kernels accept (the Python wrapper falls back to plain PyTorch beyond it). */
#define LW_MAX_RADIUS 7
#define LW_MAX_O ((2 * LW_MAX_RADIUS + 1) * (2 * LW_MAX_RADIUS + 1))

typedef struct {
    long H, W, HW, R, D, K, O;
    int oy[LW_MAX_O], ox[LW_MAX_O]; /* offset o in pixels: tables keep divisions out of the row loops */
} geom;

static geom make_geom(long H, long W, long R, long D) {
    geom g;
    if (R > LW_MAX_RADIUS) R = LW_MAX_RADIUS; /* never reached through the Python wrapper */
    g.H = H;
    g.W = W;
    g.HW = H * W;
    g.R = R;
    g.D = D;
    g.K = 2 * R + 1;
    g.O = g.K * g.K;
    for (long o = 0; o < g.O; o++) {
        g.oy[o] = (int)((o / g.K - R) * D);
        g.ox[o] = (int)((o % g.K - R) * D);
    }
    return g;
}

/* Shift (dy, dx) of offset o and the columns x for which x + dx stays inside [0, W). Returns 0 when no
 * column of row y has its neighbour inside the image (sign = +1: neighbour is y + dy; -1: y - dy). */
static inline int window_cols(const geom *g, long o, long y, int sign, long *dy, long *dx, long *x0, long *x1) {
    long sy = sign * g->oy[o], sx = sign * g->ox[o];
    *dy = sy;
    *dx = sx;
    if (y + sy < 0 || y + sy >= g->H) return 0;
    *x0 = sx < 0 ? -sx : 0;
    *x1 = sx > 0 ? g->W - sx : g->W;
    return *x0 < *x1;
}

/* s[b, :, y, :] = -scale * ||q(y, x) - k(y + dy, x + dx)||^2, -inf outside (eq. 4). */
static void sim_row(const geom *g, long C, const real *restrict q, const real *restrict k, real *restrict s,
                    real scale, long b, long y) {
    const long W = g->W, HW = g->HW;
    real *srow = s + b * g->O * HW + y * W;
    for (long o = 0; o < g->O; o++) {
        real *sr = srow + o * HW;
        long dy, dx, x0 = 0, x1 = 0;
        if (!window_cols(g, o, y, 1, &dy, &dx, &x0, &x1)) x0 = x1 = 0;
        for (long x = 0; x < W; x++) sr[x] = (x >= x0 && x < x1) ? (real)0 : (real)-INFINITY;
    }
    /* channels outer, four at a time: the query rows are reused across all offsets while the O output rows
     * stay in L1, and each output load/store is shared by four channels */
    long c = 0;
    for (; c + 4 <= C; c += 4) {
        const real *q0 = q + (b * C + c) * HW + y * W, *q1 = q0 + HW, *q2 = q1 + HW, *q3 = q2 + HW;
        for (long o = 0; o < g->O; o++) {
            long dy, dx, x0, x1;
            if (!window_cols(g, o, y, 1, &dy, &dx, &x0, &x1)) continue;
            const real *k0 = k + (b * C + c) * HW + (y + dy) * W + dx, *k1 = k0 + HW, *k2 = k1 + HW, *k3 = k2 + HW;
            real *sr = srow + o * HW;
            for (long x = x0; x < x1; x++) {
                real d0 = q0[x] - k0[x], d1 = q1[x] - k1[x], d2 = q2[x] - k2[x], d3 = q3[x] - k3[x];
                sr[x] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            }
        }
    }
    for (; c < C; c++) {
        const real *qr = q + (b * C + c) * HW + y * W;
        for (long o = 0; o < g->O; o++) {
            long dy, dx, x0, x1;
            if (!window_cols(g, o, y, 1, &dy, &dx, &x0, &x1)) continue;
            const real *kr = k + (b * C + c) * HW + (y + dy) * W + dx;
            real *sr = srow + o * HW;
            for (long x = x0; x < x1; x++) {
                real d = qr[x] - kr[x];
                sr[x] += d * d;
            }
        }
    }
    for (long o = 0; o < g->O; o++) {
        long dy, dx, x0, x1;
        if (!window_cols(g, o, y, 1, &dy, &dx, &x0, &x1)) continue;
        real *sr = srow + o * HW;
        for (long x = x0; x < x1; x++) sr[x] *= -scale;
    }
}

/* An offset whose neighbour row is inside the image for the current row, and its valid columns. */
typedef struct {
    long o, dy, dx, x0, x1;
} tap;

/* Fills t with the offsets valid for row y (sign as in window_cols); returns how many. */
static int row_taps(const geom *g, long y, int sign, tap *t) {
    int n = 0;
    for (long o = 0; o < g->O; o++) {
        t[n].o = o;
        if (window_cols(g, o, y, sign, &t[n].dy, &t[n].dx, &t[n].x0, &t[n].x1)) n++;
    }
    return n;
}

/* Columns [*X0, *X1) valid for all four taps t[0..3] (X0 == X1 when none). The row kernels below sum four
 * taps per pass over these columns, sharing one load and store of the output row between four products;
 * each tap's remaining border columns are then done one tap at a time. */
static inline void common_cols(const tap *t, long *X0, long *X1) {
    long a = t[0].x0, z = t[0].x1;
    for (int i = 1; i < 4; i++) {
        a = t[i].x0 > a ? t[i].x0 : a;
        z = t[i].x1 < z ? t[i].x1 : z;
    }
    *X0 = a;
    *X1 = z > a ? z : a;
}

#define LW_BORDER_LOOPS(t, X0, X1, BODY)                                              \
    for (long x = (t).x0; x < ((X0) < (t).x1 ? (X0) : (t).x1); x++) BODY;             \
    for (long x = ((X1) > (t).x0 ? (X1) : (t).x0); x < (t).x1; x++) BODY;

/* out[b, c, y, :] = sum_o w[b, o, y, :] * v(y + dy, x + dx) (eq. 5, 6-7). */
static void wsum_row(const geom *g, long C, const real *restrict w, const real *restrict v, real *restrict out,
                     long b, long y) {
    const long W = g->W, HW = g->HW;
    const real *wrow = w + b * g->O * HW + y * W;
    tap t[LW_MAX_O];
    const int n = row_taps(g, y, 1, t);
    for (long c = 0; c < C; c++) {
        real *restrict orow = out + (b * C + c) * HW + y * W;
        const real *vc = v + (b * C + c) * HW;
        for (long x = 0; x < W; x++) orow[x] = 0;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            const tap *u = t + i;
            long X0, X1;
            common_cols(u, &X0, &X1);
            const real *w0 = wrow + u[0].o * HW, *w1 = wrow + u[1].o * HW, *w2 = wrow + u[2].o * HW,
                       *w3 = wrow + u[3].o * HW;
            const real *v0 = vc + (y + u[0].dy) * W + u[0].dx, *v1 = vc + (y + u[1].dy) * W + u[1].dx,
                       *v2 = vc + (y + u[2].dy) * W + u[2].dx, *v3 = vc + (y + u[3].dy) * W + u[3].dx;
            for (long x = X0; x < X1; x++) orow[x] += (w0[x] * v0[x] + w1[x] * v1[x]) + (w2[x] * v2[x] + w3[x] * v3[x]);
            LW_BORDER_LOOPS(u[0], X0, X1, orow[x] += w0[x] * v0[x])
            LW_BORDER_LOOPS(u[1], X0, X1, orow[x] += w1[x] * v1[x])
            LW_BORDER_LOOPS(u[2], X0, X1, orow[x] += w2[x] * v2[x])
            LW_BORDER_LOOPS(u[3], X0, X1, orow[x] += w3[x] * v3[x])
        }
        for (; i < n; i++) {
            const real *wr = wrow + t[i].o * HW, *vr = vc + (y + t[i].dy) * W + t[i].dx;
            for (long x = t[i].x0; x < t[i].x1; x++) orow[x] += wr[x] * vr[x];
        }
    }
}

/* gw[b, o, y, :] (+)= sum_c gout(c, y, x) * v(c, y + dy, x + dx): gradient of wsum w.r.t. its weights. */
static void wsum_grad_w_row(const geom *g, long C, const real *restrict gout, const real *restrict v,
                            real *restrict gw, int accumulate, long b, long y) {
    const long W = g->W, HW = g->HW;
    real *gwrow = gw + b * g->O * HW + y * W;
    if (!accumulate)
        for (long o = 0; o < g->O; o++)
            for (long x = 0; x < W; x++) gwrow[o * HW + x] = 0;
    long c = 0;
    for (; c + 4 <= C; c += 4) { /* four channels per pass over the O rows, as in sim_row */
        const real *r0 = gout + (b * C + c) * HW + y * W, *r1 = r0 + HW, *r2 = r1 + HW, *r3 = r2 + HW;
        for (long o = 0; o < g->O; o++) {
            long dy, dx, x0, x1;
            if (!window_cols(g, o, y, 1, &dy, &dx, &x0, &x1)) continue;
            const real *v0 = v + (b * C + c) * HW + (y + dy) * W + dx, *v1 = v0 + HW, *v2 = v1 + HW, *v3 = v2 + HW;
            real *restrict gwr = gwrow + o * HW;
            for (long x = x0; x < x1; x++) gwr[x] += (r0[x] * v0[x] + r1[x] * v1[x]) + (r2[x] * v2[x] + r3[x] * v3[x]);
        }
    }
    for (; c < C; c++) {
        const real *gr = gout + (b * C + c) * HW + y * W;
        for (long o = 0; o < g->O; o++) {
            long dy, dx, x0, x1;
            if (!window_cols(g, o, y, 1, &dy, &dx, &x0, &x1)) continue;
            const real *vr = v + (b * C + c) * HW + (y + dy) * W + dx;
            real *gwr = gwrow + o * HW;
            for (long x = x0; x < x1; x++) gwr[x] += gr[x] * vr[x];
        }
    }
}

/* gv[b, c, y', :] = sum_o w(o, y' - dy, x' - dx) * gout(c, y' - dy, x' - dx): gather form of the scatter. */
static void wsum_grad_v_row(const geom *g, long C, const real *restrict w, const real *restrict gout,
                            real *restrict gv, long b, long y) {
    const long W = g->W, HW = g->HW;
    tap t[LW_MAX_O]; /* negated offsets: the source row is y + dy */
    const int n = row_taps(g, y, -1, t);
    const real *wb = w + b * g->O * HW;
    for (long c = 0; c < C; c++) {
        real *restrict gvr = gv + (b * C + c) * HW + y * W;
        const real *gc = gout + (b * C + c) * HW;
        for (long x = 0; x < W; x++) gvr[x] = 0;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            const tap *u = t + i;
            long X0, X1;
            common_cols(u, &X0, &X1);
            const real *w0 = wb + u[0].o * HW + (y + u[0].dy) * W + u[0].dx,
                       *w1 = wb + u[1].o * HW + (y + u[1].dy) * W + u[1].dx,
                       *w2 = wb + u[2].o * HW + (y + u[2].dy) * W + u[2].dx,
                       *w3 = wb + u[3].o * HW + (y + u[3].dy) * W + u[3].dx;
            const real *g0 = gc + (y + u[0].dy) * W + u[0].dx, *g1 = gc + (y + u[1].dy) * W + u[1].dx,
                       *g2 = gc + (y + u[2].dy) * W + u[2].dx, *g3 = gc + (y + u[3].dy) * W + u[3].dx;
            for (long x = X0; x < X1; x++) gvr[x] += (w0[x] * g0[x] + w1[x] * g1[x]) + (w2[x] * g2[x] + w3[x] * g3[x]);
            LW_BORDER_LOOPS(u[0], X0, X1, gvr[x] += w0[x] * g0[x])
            LW_BORDER_LOOPS(u[1], X0, X1, gvr[x] += w1[x] * g1[x])
            LW_BORDER_LOOPS(u[2], X0, X1, gvr[x] += w2[x] * g2[x])
            LW_BORDER_LOOPS(u[3], X0, X1, gvr[x] += w3[x] * g3[x])
        }
        for (; i < n; i++) {
            const real *wr = wb + t[i].o * HW + (y + t[i].dy) * W + t[i].dx, *gr = gc + (y + t[i].dy) * W + t[i].dx;
            for (long x = t[i].x0; x < t[i].x1; x++) gvr[x] += wr[x] * gr[x];
        }
    }
}

/* gq[b, c, y, :] = -2 scale * sum_o gs(o, y, x) (q(c, y, x) - k(c, y + dy, x + dx)); outside pairs skipped. */
static void sim_grad_q_row(const geom *g, long C, const real *restrict gs, const real *restrict q,
                           const real *restrict k, real *restrict gq, real scale, long b, long y) {
    const long W = g->W, HW = g->HW;
    const real *gsrow = gs + b * g->O * HW + y * W;
    tap t[LW_MAX_O];
    const int n = row_taps(g, y, 1, t);
    for (long c = 0; c < C; c++) {
        const real *qr = q + (b * C + c) * HW + y * W, *kc = k + (b * C + c) * HW;
        real *restrict gqr = gq + (b * C + c) * HW + y * W;
        for (long x = 0; x < W; x++) gqr[x] = 0;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            const tap *u = t + i;
            long X0, X1;
            common_cols(u, &X0, &X1);
            const real *g0 = gsrow + u[0].o * HW, *g1 = gsrow + u[1].o * HW, *g2 = gsrow + u[2].o * HW,
                       *g3 = gsrow + u[3].o * HW;
            const real *k0 = kc + (y + u[0].dy) * W + u[0].dx, *k1 = kc + (y + u[1].dy) * W + u[1].dx,
                       *k2 = kc + (y + u[2].dy) * W + u[2].dx, *k3 = kc + (y + u[3].dy) * W + u[3].dx;
            for (long x = X0; x < X1; x++)
                gqr[x] += (g0[x] * (qr[x] - k0[x]) + g1[x] * (qr[x] - k1[x])) +
                          (g2[x] * (qr[x] - k2[x]) + g3[x] * (qr[x] - k3[x]));
            LW_BORDER_LOOPS(u[0], X0, X1, gqr[x] += g0[x] * (qr[x] - k0[x]))
            LW_BORDER_LOOPS(u[1], X0, X1, gqr[x] += g1[x] * (qr[x] - k1[x]))
            LW_BORDER_LOOPS(u[2], X0, X1, gqr[x] += g2[x] * (qr[x] - k2[x]))
            LW_BORDER_LOOPS(u[3], X0, X1, gqr[x] += g3[x] * (qr[x] - k3[x]))
        }
        for (; i < n; i++) {
            const real *gr = gsrow + t[i].o * HW, *kr = kc + (y + t[i].dy) * W + t[i].dx;
            for (long x = t[i].x0; x < t[i].x1; x++) gqr[x] += gr[x] * (qr[x] - kr[x]);
        }
        for (long x = 0; x < W; x++) gqr[x] *= -2 * scale;
    }
}

/* gk[b, c, y', :] = 2 scale * sum_o gs(o, y' - dy, x' - dx) (q(c, y' - dy, x' - dx) - k(c, y', x')). */
static void sim_grad_k_row(const geom *g, long C, const real *restrict gs, const real *restrict q,
                           const real *restrict k, real *restrict gk, real scale, long b, long y) {
    const long W = g->W, HW = g->HW;
    tap t[LW_MAX_O]; /* negated offsets: the source row is y + dy */
    const int n = row_taps(g, y, -1, t);
    const real *gsb = gs + b * g->O * HW;
    for (long c = 0; c < C; c++) {
        const real *kr = k + (b * C + c) * HW + y * W, *qc = q + (b * C + c) * HW;
        real *restrict gkr = gk + (b * C + c) * HW + y * W;
        for (long x = 0; x < W; x++) gkr[x] = 0;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            const tap *u = t + i;
            long X0, X1;
            common_cols(u, &X0, &X1);
            const real *g0 = gsb + u[0].o * HW + (y + u[0].dy) * W + u[0].dx,
                       *g1 = gsb + u[1].o * HW + (y + u[1].dy) * W + u[1].dx,
                       *g2 = gsb + u[2].o * HW + (y + u[2].dy) * W + u[2].dx,
                       *g3 = gsb + u[3].o * HW + (y + u[3].dy) * W + u[3].dx;
            const real *q0 = qc + (y + u[0].dy) * W + u[0].dx, *q1 = qc + (y + u[1].dy) * W + u[1].dx,
                       *q2 = qc + (y + u[2].dy) * W + u[2].dx, *q3 = qc + (y + u[3].dy) * W + u[3].dx;
            for (long x = X0; x < X1; x++)
                gkr[x] += (g0[x] * (q0[x] - kr[x]) + g1[x] * (q1[x] - kr[x])) +
                          (g2[x] * (q2[x] - kr[x]) + g3[x] * (q3[x] - kr[x]));
            LW_BORDER_LOOPS(u[0], X0, X1, gkr[x] += g0[x] * (q0[x] - kr[x]))
            LW_BORDER_LOOPS(u[1], X0, X1, gkr[x] += g1[x] * (q1[x] - kr[x]))
            LW_BORDER_LOOPS(u[2], X0, X1, gkr[x] += g2[x] * (q2[x] - kr[x]))
            LW_BORDER_LOOPS(u[3], X0, X1, gkr[x] += g3[x] * (q3[x] - kr[x]))
        }
        for (; i < n; i++) {
            const real *gr = gsb + t[i].o * HW + (y + t[i].dy) * W + t[i].dx, *qr = qc + (y + t[i].dy) * W + t[i].dx;
            for (long x = t[i].x0; x < t[i].x1; x++) gkr[x] += gr[x] * (qr[x] - kr[x]);
        }
        for (long x = 0; x < W; x++) gkr[x] *= 2 * scale;
    }
}

/* Affinity rows a[b, :, y, :] = softmax over o of s[b, :, y, :]; `tmp` is a W-long scratch row. */
static void softmax_row(const geom *g, const real *restrict s, real *restrict a, real *restrict tmp, long b,
                        long y) {
    const long W = g->W, HW = g->HW, O = g->O;
    const real *srow = s + b * O * HW + y * W;
    real *arow = a + b * O * HW + y * W;
    for (long x = 0; x < W; x++) tmp[x] = srow[x];
    for (long o = 1; o < O; o++)
        for (long x = 0; x < W; x++) tmp[x] = srow[o * HW + x] > tmp[x] ? srow[o * HW + x] : tmp[x];
    /* the centre offset is always inside, so the maximum is finite and exp(-inf - max) = 0; vectors of VL pixels
     * (libm's expf per element cost twice the rest of the softmax, by perf), the row's tail per element */
    const long xv = W / VL * VL;
    for (long o = 0; o < O; o++) {
        for (long x = 0; x < xv; x += VL) vstore(arow + o * HW + x, vexp(vload(srow + o * HW + x) - vload(tmp + x)));
        for (long x = xv; x < W; x++) arow[o * HW + x] = lw_exp(srow[o * HW + x] - tmp[x]);
    }
    for (long x = 0; x < W; x++) tmp[x] = 0;
    for (long o = 0; o < O; o++)
        for (long x = 0; x < W; x++) tmp[x] += arow[o * HW + x];
    for (long x = 0; x < W; x++) tmp[x] = (real)1 / tmp[x];
    for (long o = 0; o < O; o++)
        for (long x = 0; x < W; x++) arow[o * HW + x] *= tmp[x];
}

/* Softmax backward of one row in place: ds = a (ds - sum_o a ds), plus the similarity's own gradient gs (may be NULL).
 * Rows of a, ds and gs are HW apart; tmp: W reals. */
static void softmax_bwd_row(const geom *g, const real *arow, real *dsrow, const real *gsrow, real *tmp) {
    const long W = g->W, HW = g->HW, O = g->O;
    for (long x = 0; x < W; x++) tmp[x] = 0;
    for (long o = 0; o < O; o++)
        for (long x = 0; x < W; x++) tmp[x] += arow[o * HW + x] * dsrow[o * HW + x];
    for (long o = 0; o < O; o++)
        for (long x = 0; x < W; x++) dsrow[o * HW + x] = arow[o * HW + x] * (dsrow[o * HW + x] - tmp[x]);
    if (gsrow)
        for (long o = 0; o < O; o++)
            for (long x = 0; x < W; x++) dsrow[o * HW + x] += gsrow[o * HW + x];
}

/* Rows in parallel, but only when there is enough work: forking a team costs far more than a tiny call
 * (gradcheck makes hundreds of them) and a descheduled worker stalls the join on a busy machine. */
#define LW_MIN_PARALLEL_WORK (1L << 15)
#define LW_ROWS_PARALLEL \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(B * H * W * g.O >= LW_MIN_PARALLEL_WORK)")

void LW_FN(lw_similarity_fwd)(const real *q, const real *k, real *s, long B, long C, long H, long W, long R,
                              long D, double scale, int nthreads) {
    geom g = make_geom(H, W, R, D);
    LW_ROWS_PARALLEL
    for (long i = 0; i < B * H; i++) sim_row(&g, C, q, k, s, (real)scale, i / H, i % H);
}

/* gq or gk may be NULL when that gradient is not needed. */
void LW_FN(lw_similarity_bwd)(const real *gs, const real *q, const real *k, real *gq, real *gk, long B, long C,
                              long H, long W, long R, long D, double scale, int nthreads) {
    geom g = make_geom(H, W, R, D);
    LW_ROWS_PARALLEL
    for (long i = 0; i < B * H; i++) {
        if (gq) sim_grad_q_row(&g, C, gs, q, k, gq, (real)scale, i / H, i % H);
        if (gk) sim_grad_k_row(&g, C, gs, q, k, gk, (real)scale, i / H, i % H);
    }
}

void LW_FN(lw_wsum_fwd)(const real *w, const real *v, real *out, long B, long C, long H, long W, long R, long D,
                        int nthreads) {
    geom g = make_geom(H, W, R, D);
    LW_ROWS_PARALLEL
    for (long i = 0; i < B * H; i++) wsum_row(&g, C, w, v, out, i / H, i % H);
}

/* gw or gv may be NULL when that gradient is not needed. */
void LW_FN(lw_wsum_bwd)(const real *gout, const real *w, const real *v, real *gw, real *gv, long B, long C,
                        long H, long W, long R, long D, int nthreads) {
    geom g = make_geom(H, W, R, D);
    LW_ROWS_PARALLEL
    for (long i = 0; i < B * H; i++) {
        if (gw) wsum_grad_w_row(&g, C, gout, v, gw, 0, i / H, i % H);
        if (gv) wsum_grad_v_row(&g, C, w, gout, gv, i / H, i % H);
    }
}

/* Fused LMR (eq. 4-5), rows narrower than a vector: similarity, affinity and readout of one row while its data is
 * in cache. Wider rows take lw_attention_fwd (after the inference kernels, whose loops it shares). */
static void attention_fwd_rows(const real *q, const real *k, const real *v, real *s, real *a, real *out, long B,
                               long Ck, long Cv, long H, long W, long R, long D, double scale, int nthreads) {
    geom g = make_geom(H, W, R, D);
    LW_ROWS_PARALLEL
    for (long i = 0; i < B * H; i++) {
        long b = i / H, y = i % H;
        sim_row(&g, Ck, q, k, s, (real)scale, b, y);
        /* readout channel 0 of this row is only written by wsum_row below, so it serves as scratch */
        softmax_row(&g, s, a, out + b * Cv * g.HW + y * W, b, y);
        wsum_row(&g, Cv, a, v, out, b, y);
    }
}

/* Backward of the fused LMR, row by row (rows narrower than a vector; lw_attention_bwd below takes wider ones).
 * gr (readout grad) is required; gs and ga may be NULL (unused outputs).
 * ds (B x O x H x W) receives the similarity gradient; gq must be given (its rows serve as scratch),
 * gk and gv may be NULL. Two passes: ds and gq need only row y, gk and gv gather ds and a from other rows. */
static void attention_bwd_rows(const real *gr, const real *gs, const real *ga, const real *q, const real *k,
                               const real *v, const real *a, real *ds, real *gq, real *gk, real *gv, long B,
                               long Ck, long Cv, long H, long W, long R, long D, double scale, int nthreads) {
    geom g = make_geom(H, W, R, D);
    const long HW = g.HW, O = g.O;
    LW_ROWS_PARALLEL
    for (long i = 0; i < B * H; i++) {
        long b = i / H, y = i % H;
        real *dsrow = ds + b * O * HW + y * W;
        const real *arow = a + b * O * HW + y * W;
        real *t = gq + b * Ck * HW + y * W; /* scratch, overwritten by sim_grad_q_row */
        for (long o = 0; o < O; o++)
            for (long x = 0; x < W; x++) dsrow[o * HW + x] = ga ? ga[b * O * HW + o * HW + y * W + x] : 0;
        wsum_grad_w_row(&g, Cv, gr, v, ds, 1, b, y);
        softmax_bwd_row(&g, arow, dsrow, gs ? gs + b * O * HW + y * W : NULL, t);
        sim_grad_q_row(&g, Ck, ds, q, k, gq, (real)scale, b, y);
    }
    LW_ROWS_PARALLEL
    for (long i = 0; i < B * H; i++) {
        if (gk) sim_grad_k_row(&g, Ck, ds, q, k, gk, (real)scale, i / H, i % H);
        if (gv) wsum_grad_v_row(&g, Cv, a, gr, gv, i / H, i % H);
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Inference-only kernels (no autograd): LMR with the comparator's top-k fused in, and the SLMR reorganisation
 * (eq. 6-7) of several tensors in one pass over the weights.
 *
 * Register-blocked over x: a block is VL adjacent pixels of one row held in a vector register. The similarity
 * of one block keeps one accumulator per tap of a window row over all key channels; the readout keeps one
 * accumulator per value channel (eight channels at a time) over all taps, so every output vector is stored
 * once instead of being re-loaded for every four taps. Blocks start at 0, VL, ..., and the last one at W - VL
 * (it may overlap its neighbour: results are stored, not accumulated). A block whose window crosses the left
 * or right image border loads each neighbour vector from the nearest in-row position and moves the lanes into
 * place with a shuffle; lanes outside the image are zeroed (value) or get similarity -inf. Rows narrower than
 * VL take a plain per-pixel path.
 * --------------------------------------------------------------------------------------------------------------- */
#include <stdlib.h>

#define LW_MAX_TOPK 16 /* largest k of the fused top-k (the Python wrapper checks it) */
#ifndef LW_PREFETCH_BLOCKS
#define LW_PREFETCH_BLOCKS 2 /* how far ahead (in vector blocks) the readout prefetches value rows */
#endif
#ifndef LW_CB
#define LW_CB 8 /* value channels per readout pass */
#endif
#if defined(__clang__)
static inline vreal vshuf(vreal v, vmask i) {
    vreal r;
    for (int l = 0; l < VL; l++) r[l] = v[i[l] & (VL - 1)];
    return r;
}
#else
#define vshuf(v, i) __builtin_shuffle(v, i)
#endif

/* Where block xs reads the neighbour row for shift dx: the load start (in-row) and, for border blocks, the lane
 * shuffle and validity mask. Returns 1 for a border block. W >= VL. */
static inline int block_src(long xs, long dx, long W, long *start, vmask *idx, vmask *valid) {
    long s = xs + dx;
    if (s >= 0 && s + VL <= W) {
        *start = s;
        return 0;
    }
    long cs = s < 0 ? 0 : W - VL, sh = s - cs;
    *start = cs;
    for (int l = 0; l < VL; l++) {
        (*idx)[l] = (l + sh) & (VL - 1);
        (*valid)[l] = (l + sh >= 0 && l + sh < VL) ? -1 : 0;
    }
    return 1;
}

typedef struct {
    long o, dy, dx;
} itap;

/* Taps of row y whose neighbour row is inside the image (row-major order, so whole window rows). */
static int inf_taps(const geom *g, long y, itap *t) {
    int n = 0;
    for (long o = 0; o < g->O; o++) {
        long dy = g->oy[o];
        if (y + dy < 0 || y + dy >= g->H) continue;
        t[n].o = o;
        t[n].dy = dy;
        t[n].dx = g->ox[o];
        n++;
    }
    return n;
}

/* Where block bi of a row reads the neighbour row of each offset o (border tables, the same for every row). */
typedef struct {
    long rel;          /* load start minus block start */
    int border;        /* the window of this offset crosses the left or right border in this block */
    vmask idx, valid;  /* border only: lane shuffle and the lanes inside the image */
} blocktap;

static long block_start(long i, long W) { /* block i of a row; the last block ends at W */
    long xs = i * VL;
    return xs + VL > W ? W - VL : xs;
}

/* n table entries, aligned for their vector members (malloc only guarantees 16 bytes) */
static blocktap *alloc_tables(long n) {
    void *p = NULL;
    return posix_memalign(&p, 64, sizeof(blocktap) * n) == 0 ? p : NULL;
}

/* Tables of all blocks (nb x O, row-major) and each block's "any offset crosses the border" flag. W >= VL. */
static void block_tables(const geom *g, blocktap *tab, int *any) {
    const long W = g->W, nb = (W + VL - 1) / VL;
    for (long bi = 0; bi < nb; bi++) {
        long xs = block_start(bi, W);
        any[bi] = 0;
        for (long o = 0; o < g->O; o++) {
            blocktap *e = tab + bi * g->O + o;
            long st;
            e->border = block_src(xs, g->ox[o], W, &st, &e->idx, &e->valid);
            e->rel = st - xs;
            any[bi] |= e->border;
        }
    }
}

/* Rows of a band: the valid taps of each row and their weight rows (W reals each, index x). */
typedef struct {
    int n;
    itap t[LW_MAX_O];
    const real *wr[LW_MAX_O];
    const real *h; /* per-pixel factor of the whole row's readout (W reals), or NULL */
} rowtaps;

/* Where channel c of image b of a tensor starts, in elements: b bstride + (c / cper) gstride + (c % cper) HW. A
 * plain B x C x H x W tensor has cper = C; C channels per object of a B x N x C' x H x W tensor (one channel group
 * of a value a read takes, or one readout's slice of the decoder's input) have cper = C / N and gstride = C' HW:
 * read or written in place instead of copied. */
typedef struct {
    long bstride, gstride, cper;
    long pstride; /* 0: planes of H x W per channel (NCHW); > 0: channels-last, see read_band_nhwc */
} chlayout;

static inline long ch_offset(const chlayout *l, long HW, long b, long c) {
    return b * l->bstride + (c / l->cper) * l->gstride + (c % l->cper) * HW;
}

static inline chlayout plain_layout(long C, long HW) { return (chlayout){C * HW, C * HW, C > 0 ? C : 1, 0}; }

/* An output: its base and channel layout. */
typedef struct {
    real *base;
    chlayout at;
} olayout;

static inline real *out_plane(const olayout *ol, long HW, long b, long c) { return ol->base + ch_offset(&ol->at, HW, b, c); }

/* Rows per band: the band's weight rows (O x W each) stay within LW_BAND_KB (in L2 with the value rows they
 * read), at most 16 rows, and every thread gets a band. A band reads its value rows from memory once, plus 2 R D
 * rows of halo: taller bands cost less memory traffic. */
#ifndef LW_BAND_KB
#define LW_BAND_KB 128
#endif
static long band_rows(const geom *g, long B, int nthreads) {
    long rows = (LW_BAND_KB * 1024L) / (g->O * g->W * (long)sizeof(real));
    if (rows > 16) rows = 16;
    const long threads = nthreads > 0 ? nthreads : 1, per_thread = (B * g->H + threads - 1) / threads;
    if (rows > per_thread) rows = per_thread;
    if (rows < 1) rows = 1;
    /* as many bands as a multiple of the threads where that costs few rows: 60 rows in 5 bands of 12 left one of
     * two threads idle for a fifth of the time (1/8 of 480p); 6 bands of 10 do not */
    const long k0 = (g->H + rows - 1) / rows;
    for (long k = k0; k <= g->H && k < k0 + threads; k++)
        if ((B * k) % threads == 0) return (g->H + k - 1) / k;
    return rows;
}

/* row[x] = src[x / 2] for x < W (a weight row upsampled by 2, nearest), without the division per pixel that took a
 * sixth of SLMR's time. */
static void upsample2_row(const real *restrict src, real *restrict row, long W) {
    for (long x = 0; x < W / 2; x++) row[2 * x] = row[2 * x + 1] = src[x];
    if (W % 2) row[W - 1] = src[W / 2];
}

/* Top-k (descending) of the O similarity vectors s of one block. */
static void topk_block(long O, long K, const vreal *s, vreal *top) {
    for (long j = 0; j < K; j++) top[j] = vsplat((real)-INFINITY);
    for (long o = 0; o < O; o++) {
        vreal x = s[o];
        for (long j = 0; j < K; j++) {
            vreal hi = vmax(top[j], x);
            x = vmin(top[j], x);
            top[j] = hi;
        }
    }
}

/* tanh(x / 2) = sign(x) (1 - e^-|x|) / (1 + e^-|x|) (no overflow; vsigmoid likewise, kernels.h). */
static inline vreal vtanh_half(vreal x) {
    vreal ax = vsel(x < vsplat(0), -x, x), e = vexp(-ax), t = (1 - e) / (1 + e);
    return vsel(x < vsplat(0), -t, t);
}

/* The comparator's reliability weight (eq. 9 and its 1x1 conv + sigmoid) of one block from the local top-k and
 * the global top-k G of the same pixels: sigmoid(b + sum_j w_j alpha/2 tanh((L_j - G_j) / 2)). */
static inline vreal reliability_block(long K, const vreal *top, const vreal *G, const real *w, real bias,
                                      real alpha) {
    vreal z = vsplat(bias);
    for (long j = 0; j < K; j++) z += (w[j] * (real)0.5 * alpha) * vtanh_half(top[j] - G[j]);
    return vsigmoid(z);
}

/* Channels-last (NHWC) readout: element (b, c, y, x) of a value or output at b bstride + (c / cper) gstride +
 * (y W + x) pstride + c % cper, e.g. one readout's channel group of the value encoder's channels-last output, or the
 * decoder's channels-last sum. Pixel by pixel, each tap's weight broadcast over all the pixel's channels (every
 * object's, cper a multiple of VL), so no transposing pass is needed on the way in or out of the read. */
#define LW_NHWC_V 8 /* vectors of channels per pass over a pixel's taps: the accumulators stay in registers */

static inline __attribute__((always_inline)) vreal load_value(const void *p, long e, const int bf16) {
#ifdef LW_BF16_INPUTS
    if (bf16) return vload_bf16((const lw_bf16 *)p + e);
#endif
    (void)bf16;
    return vload((const real *)p + e);
}

/* Lanes i of the result: (even, odd) channels interleaved, the low (hi = 0) or high VL of the 2 VL channels. */
static inline vreal interleave_half(vreal even, vreal odd, int hi) {
    vmask idx;
    for (int l = 0; l < VL; l++) idx[l] = (l / 2 + (hi ? VL / 2 : 0)) + (l % 2 ? VL : 0);
    return __builtin_shuffle(even, odd, idx);
}

/* What an NHWC readout writes: out (+)= the readout (accumulate), then act = relu(out) in float (act_f32) or bf16
 * (same layout as out; NULL: none). */
typedef struct {
    int accumulate, act_f32;
    void *act;
} nhwc_store;

/* One pixel's readout over m vector units of channels (unit j at voff[j] / ooff[j]). mode 0: real values, a unit
 * is VL channels; 1: bfloat16 values widened per VL channels; 2: bfloat16 pairs, a unit is 2 VL channels loaded
 * as VL 32-bit words and split into the even and the odd channels (an AND and a shift instead of two widening
 * conversions: mode 1 cost 1.8x mode 0's readout), interleaved back once per pixel. */
static inline __attribute__((always_inline)) void nhwc_pixel(const int m, const int mode, const rowtaps *rt,
                                                            long x, long y, long W, int interior, const void *vb,
                                                            long vps, const long *voff, real *obase, long opix,
                                                            const long *ooff, const nhwc_store *st) {
    vreal acc[2 * LW_NHWC_V] = {0}; /* mode 2 uses two per unit (at most LW_NHWC_V / 2 units) */
    const int na = mode == 2 ? 2 * m : m;
    for (int i = 0; i < rt->n; i++) {
        const long xx = x + rt->t[i].dx;
        if (!interior && (xx < 0 || xx >= W)) continue;
        const vreal wv = vsplat(rt->wr[i][x]);
        const long e = ((y + rt->t[i].dy) * W + xx) * vps;
        if (mode == 2) {
#ifdef LW_BF16_INPUTS
            const vmask high = (vmask)(vsplat(0) == vsplat(0)) << 16; /* the upper 16 bits of each word */
            for (int j = 0; j < m; j++) {
                vmask u;
                memcpy(&u, (const lw_bf16 *)vb + e + voff[j], sizeof u);
                acc[2 * j] += wv * (vreal)(u << 16);
                acc[2 * j + 1] += wv * (vreal)(u & high);
            }
#endif
        } else {
            for (int j = 0; j < m; j++) acc[j] += wv * load_value(vb, e + voff[j], mode);
        }
    }
    if (rt->h) {
        const vreal hv = vsplat(rt->h[x]);
        for (int j = 0; j < na; j++) acc[j] *= hv;
    }
    for (int j = 0; j < na; j++) {
        vreal a = acc[j];
        long e = opix + ooff[mode == 2 ? j / 2 : j];
        if (mode == 2) { /* even/odd channels back in order: unit j / 2 holds low (j even) and high halves */
            a = interleave_half(acc[j & ~1], acc[j | 1], j & 1);
            e += (j & 1) * VL;
        }
        const vreal r = st->accumulate ? vload(obase + e) + a : a;
        vstore(obase + e, r);
        if (st->act) vstore_relu(st->act, e, r, st->act_f32);
    }
}

static inline __attribute__((always_inline)) void nhwc_row(const int mode, const geom *g, long nu, const rowtaps *rt,
                                                          long y, const void *vb, long vps, const long *voff,
                                                          real *obase, long ops, const long *ooff,
                                                          const nhwc_store *st) {
    const long W = g->W, reach = g->R * g->D, per = mode == 2 ? LW_NHWC_V / 2 : LW_NHWC_V;
    for (long j0 = 0; j0 < nu; j0 += per) {
        const int m = nu - j0 < per ? (int)(nu - j0) : (int)per;
        for (long x = 0; x < W; x++) {
            const int interior = x >= reach && x < W - reach;
            const long opix = (y * W + x) * ops;
#define LW_PIXEL(M) nhwc_pixel(M, mode, rt, x, y, W, interior, vb, vps, voff + j0, obase, opix, ooff + j0, st)
            LW_UNROLL8(m, LW_PIXEL)
#undef LW_PIXEL
        }
    }
}

/* Readout of rows y0 .. y0 + nr - 1 of image b, C channels (every object's), values and output channels-last
 * (pixel strides il->pstride, ol->at.pstride); v holds bfloat16 when vbf16. */
static void read_band_nhwc(const geom *g, long C, long y0, long nr, const rowtaps *rt, const void *v, int vbf16,
                           const chlayout *il, const olayout *ol, long b, const nhwc_store *st) {
    /* bf16 pairs where every object's channels come in whole units of 2 VL (float build only) */
    const int mode = !vbf16 ? 0 : (sizeof(real) == sizeof(float) && il->cper % (2 * VL) == 0
                                   && ol->at.cper % (2 * VL) == 0) ? 2 : 1;
    const long unit = mode == 2 ? 2 * VL : VL, nu = C / unit;
    long voff[nu > 0 ? nu : 1], ooff[nu > 0 ? nu : 1];
    for (long j = 0; j < nu; j++) {
        const long c = j * unit;
        voff[j] = (c / il->cper) * il->gstride + c % il->cper;
        ooff[j] = (c / ol->at.cper) * ol->at.gstride + c % ol->at.cper;
    }
    const long vbase = b * il->bstride;
    real *obase = ol->base + b * ol->at.bstride;
    for (long r = 0; r < nr; r++) {
        if (mode) {
#ifdef LW_BF16_INPUTS
            const lw_bf16 *vb = (const lw_bf16 *)v + vbase;
            if (mode == 2)
                nhwc_row(2, g, nu, rt + r, y0 + r, vb, il->pstride, voff, obase, ol->at.pstride, ooff, st);
            else
                nhwc_row(1, g, nu, rt + r, y0 + r, vb, il->pstride, voff, obase, ol->at.pstride, ooff, st);
#endif
        } else {
            nhwc_row(0, g, nu, rt + r, y0 + r, (const real *)v + vbase, il->pstride, voff, obase, ol->at.pstride,
                     ooff, st);
        }
    }
}

/* The kernels that read q, k, v: once for real inputs and, in the float build, once for bfloat16 inputs
 * (lw_attention_inf_bf16, lw_wsum_inf_bf16), widened to float in registers as they are loaded. */
#define LW_IN real
#define LW_INF(name) name
#define vload_in vload
#define LD_IN(x) (x)
#include "local_window_inf.h"
#undef LW_IN
#undef LW_INF
#undef vload_in
#undef LD_IN

#ifdef LW_BF16_INPUTS
#define LW_IN lw_bf16
#define LW_INF(name) LW_CAT(name, _bf16)
#define vload_in vload_bf16
#define LD_IN(x) ld_bf16(&(x))
#include "local_window_inf.h"
#endif

/* Fused LMR (eq. 4-5) for autograd: writes the similarity s and affinity a (B x O x H x W, kept for the backward
 * pass) and the readout. Bands of rows as lw_attention_inf: the similarity in dot form from the band's squared
 * norms (sim_row_inf), softmax_row, then the register-blocked readout of the band (read_band). */
void LW_FN(lw_attention_fwd)(const real *q, const real *k, const real *v, real *s, real *a, real *out, long B,
                             long Ck, long Cv, long H, long W, long R, long D, double scale, int nthreads) {
    if (W < VL) {
        attention_fwd_rows(q, k, v, s, a, out, B, Ck, Cv, H, W, R, D, scale, nthreads);
        return;
    }
    geom g = make_geom(H, W, R, D);
    const olayout ol = {out, plain_layout(Cv, g.HW)};
    const chlayout il = plain_layout(Cv, g.HW);
    const long O = g.O, HW = g.HW, nb = (W + VL - 1) / VL, Y = band_rows(&g, B, nthreads), bands = (H + Y - 1) / Y;
    blocktap *tab = alloc_tables(nb * O);
    int *any = malloc(sizeof(int) * nb);
    if (!tab || !any) {
        free(any);
        free(tab);
        attention_fwd_rows(q, k, v, s, a, out, B, Ck, Cv, H, W, R, D, scale, nthreads);
        return;
    }
    block_tables(&g, tab, any);
#pragma omp parallel num_threads(nthreads) if (B * H * W * g.O >= LW_MIN_PARALLEL_WORK)
    {
        LW_DENORMALS_TO_ZERO;
        const long reach = R * D, krows = Y + 2 * reach < H ? Y + 2 * reach : H;
        real *qn = malloc(sizeof(real) * (Y + krows + 1) * W), *knb = qn + Y * W, *tmp = knb + krows * W;
        rowtaps *rt = malloc(sizeof(rowtaps) * Y);
#pragma omp for schedule(static)
        for (long i = 0; i < B * bands; i++) {
            const long b = i / bands, y0 = (i % bands) * Y, nr = H - y0 < Y ? H - y0 : Y;
            const long k0 = y0 - reach > 0 ? y0 - reach : 0, k1 = y0 + nr + reach < H ? y0 + nr + reach : H;
            sq_norm_rows(q + b * Ck * HW, Ck, HW, W, y0, y0 + nr, qn);
            sq_norm_rows(k + b * Ck * HW, Ck, HW, W, k0, k1, knb);
            for (long r = 0; r < nr; r++) {
                const long y = y0 + r;
                sim_row_inf(&g, Ck, q, k, qn + r * W, knb - k0 * W, (real)scale, s + b * O * HW + y * W, HW, b, y);
                softmax_row(&g, s, a, tmp, b, y);
                rt[r].n = inf_taps(&g, y, rt[r].t);
                for (int j = 0; j < rt[r].n; j++) rt[r].wr[j] = a + b * O * HW + rt[r].t[j].o * HW + y * W;
                rt[r].h = NULL;
            }
            read_band(&g, Cv, y0, nr, rt, tab, any, v, &il, &ol, b);
        }
        free(rt);
        free(qn);
    }
    free(any);
    free(tab);
}

/* out(c, y, x) = sum over taps of w(o, y + dy, x + dx) v(c, y + dy, x + dx) for one image (w: O x H x W, v and out:
 * C x H x W), the taps given by the negated-offset geometry gn and its block tables: the gather form of a
 * weighted sum's transpose (its value gradient), n value channels at a time in registers as in read_chunk. */
static inline __attribute__((always_inline)) void gather_chunk(const int n, long HW, long W, long y, long xs,
                                                               const itap *taps, int ntaps, const blocktap *tab,
                                                               int any, const real *w, const real *vc, real *oc) {
    vreal acc[LW_CB] = {0};
    for (int i = 0; i < ntaps; i++) {
        const blocktap *e = tab + taps[i].o;
        const long at = (y + taps[i].dy) * W + xs + e->rel;
        const real *wsrc = w + taps[i].o * HW + at, *vsrc = vc + at;
        if (!any || !e->border) {
            vreal wv = vload(wsrc);
            for (int j = 0; j < n; j++) acc[j] += wv * vload(vsrc + j * HW);
        } else { /* both shifted alike; the weight's lanes outside the image are zeroed */
            vmask ix = e->idx;
            vreal wv = (vreal)((vmask)vshuf(vload(wsrc), ix) & e->valid);
            for (int j = 0; j < n; j++) acc[j] += wv * vshuf(vload(vsrc + j * HW), ix);
        }
    }
    for (int j = 0; j < n; j++) vstore(oc + j * HW + y * W + xs, acc[j]);
}

static void gather_row(const geom *gn, long C, long y, const itap *taps, int ntaps, const blocktap *tab,
                       const int *any, const real *w, const real *v, real *out) {
    const long W = gn->W, HW = gn->HW, O = gn->O, nb = (W + VL - 1) / VL;
    long m;
    for (long c = 0; c < C; c += m) {
        m = C - c < LW_CB ? C - c : LW_CB;
        for (long bi = 0; bi < nb; bi++) {
            const long xs = block_start(bi, W), lx = xs + LW_PREFETCH_BLOCKS * VL;
            if (lx < W) /* the newest rows of weights and values, a few blocks ahead (too many streams otherwise) */
                for (int i = 0; i < ntaps; i++)
                    if (taps[i].dy == taps[ntaps - 1].dy) {
                        const long at = (y + taps[i].dy) * W + lx;
                        __builtin_prefetch(w + taps[i].o * HW + at, 0, 3);
                        if (taps[i].dx == taps[ntaps - 1].dx)
                            for (long j = 0; j < m; j++) __builtin_prefetch(v + (c + j) * HW + at, 0, 3);
                    }
#define LW_GATHER(N) gather_chunk(N, HW, W, y, xs, taps, ntaps, tab + bi * O, any[bi], w, v + c * HW, out + c * HW)
            LW_UNROLL8(m, LW_GATHER)
#undef LW_GATHER
        }
    }
}

/* Backward of the fused LMR (arguments as attention_bwd_rows). Pass 1, per row, with the inference loops: the
 * affinity gradient sum_c gr(c) v(c, shifted) as raw dot products (sim_row_inf), the softmax backward, and
 * gq = -2 scale (q S - sum_o ds_o k(shifted)) with S = sum of ds over the neighbours inside the image, the sum
 * being a readout (read_band) with ds as its weights. Pass 2, per row, the gathers from other rows: gv = sum_o a_o gr
 * and gk = 2 scale (sum_o ds_o q - k T) at the shifted positions (gather_row). */
void LW_FN(lw_attention_bwd)(const real *gr, const real *gs, const real *ga, const real *q, const real *k,
                             const real *v, const real *a, real *ds, real *gq, real *gk, real *gv, long B,
                             long Ck, long Cv, long H, long W, long R, long D, double scale, int nthreads) {
    geom g = make_geom(H, W, R, D);
    const long HW = g.HW, O = g.O, nb = (W + VL - 1) / VL;
    blocktap *tab = W >= VL ? alloc_tables(nb * O) : NULL;
    int *any = tab ? malloc(sizeof(int) * nb) : NULL;
    if (!tab || !any) {
        free(any);
        free(tab);
        attention_bwd_rows(gr, gs, ga, q, k, v, a, ds, gq, gk, gv, B, Ck, Cv, H, W, R, D, scale, nthreads);
        return;
    }
    block_tables(&g, tab, any);
    const olayout olq = {gq, plain_layout(Ck, HW)};
    const chlayout ilk = plain_layout(Ck, HW);
#pragma omp parallel num_threads(nthreads) if (B * H * W * g.O >= LW_MIN_PARALLEL_WORK)
    {
        LW_DENORMALS_TO_ZERO;
        real *dot = malloc(sizeof(real) * (O + 1) * W), *t = dot + O * W;
        rowtaps *rt = malloc(sizeof(rowtaps));
#pragma omp for schedule(static)
        for (long i = 0; i < B * H; i++) {
            const long b = i / H, y = i % H;
            real *dsrow = ds + b * O * HW + y * W;
            const real *arow = a + b * O * HW + y * W;
            sim_row_inf(&g, Cv, gr, v, NULL, NULL, 1, dot, W, b, y);
            for (long o = 0; o < O; o++)
                for (long x = 0; x < W; x++)
                    dsrow[o * HW + x] = (ga ? ga[b * O * HW + o * HW + y * W + x] : 0) + dot[o * W + x];
            softmax_bwd_row(&g, arow, dsrow, gs ? gs + b * O * HW + y * W : NULL, t);
            /* query gradient: S over the neighbours inside the image, then the readout of k weighted by ds */
            rt->n = inf_taps(&g, y, rt->t);
            rt->h = NULL;
            for (long x = 0; x < W; x++) t[x] = 0;
            for (int j = 0; j < rt->n; j++) {
                const long dx = rt->t[j].dx, x0 = dx < 0 ? -dx : 0, x1 = dx > 0 ? W - dx : W;
                rt->wr[j] = dsrow + rt->t[j].o * HW;
                for (long x = x0; x < x1; x++) t[x] += rt->wr[j][x];
            }
            read_band(&g, Ck, y, 1, rt, tab, any, k, &ilk, &olq, b);
            const real f = (real)(-2 * scale);
            for (long c = 0; c < Ck; c++) {
                const real *qr = q + (b * Ck + c) * HW + y * W;
                real *gqr = gq + (b * Ck + c) * HW + y * W;
                for (long x = 0; x < W; x++) gqr[x] = f * (qr[x] * t[x] - gqr[x]);
            }
        }
        free(rt);
        free(dot);
    }
    /* pass 2: the gathers, over the negated offsets (a source pixel receives from the pixels it is a neighbour of) */
    geom gn = g;
    for (long o = 0; o < O; o++) {
        gn.oy[o] = -g.oy[o];
        gn.ox[o] = -g.ox[o];
    }
    block_tables(&gn, tab, any);
#pragma omp parallel num_threads(nthreads) if (B * H * W * g.O >= LW_MIN_PARALLEL_WORK)
    {
        LW_DENORMALS_TO_ZERO;
        real *t = malloc(sizeof(real) * W);
        itap *taps = malloc(sizeof(itap) * LW_MAX_O);
#pragma omp for schedule(static)
        for (long i = 0; i < B * H; i++) {
            const long b = i / H, y = i % H;
            const int n = inf_taps(&gn, y, taps);
            if (gv) gather_row(&gn, Cv, y, taps, n, tab, any, a + b * O * HW, gr + b * Cv * HW, gv + b * Cv * HW);
            if (gk) {
                /* gk = 2 scale (sum_o ds_o q - k T), T = sum of ds over the pixels this one is a neighbour of */
                gather_row(&gn, Ck, y, taps, n, tab, any, ds + b * O * HW, q + b * Ck * HW, gk + b * Ck * HW);
                for (long x = 0; x < W; x++) t[x] = 0;
                for (int j = 0; j < n; j++) {
                    const long dx = taps[j].dx, x0 = dx < 0 ? -dx : 0, x1 = dx > 0 ? W - dx : W;
                    const real *dr = ds + b * O * HW + taps[j].o * HW + (y + taps[j].dy) * W + dx;
                    for (long x = x0; x < x1; x++) t[x] += dr[x];
                }
                const real f = (real)(2 * scale);
                for (long c = 0; c < Ck; c++) {
                    const real *kr = k + (b * Ck + c) * HW + y * W;
                    real *gkr = gk + (b * Ck + c) * HW + y * W;
                    for (long x = 0; x < W; x++) gkr[x] = f * (gkr[x] - kr[x] * t[x]);
                }
            }
        }
        free(taps);
        free(t);
    }
    free(any);
    free(tab);
}
