/* The inference kernels' code that reads the inputs q, k, v: included by local_window.c once per input type.
 *
 * LW_IN is the stored type of the inputs (real, or lw_bf16: bfloat16 bits), LW_INF(name) the name of this
 * instance, vload_in / LD_IN load a vector / an element of LW_IN as real. Everything is computed in real; weights,
 * outputs and scratch are real. bf16 inputs halve the bytes the memory-bound readout and similarity stream, and
 * spare the caller a float32 copy of every input under bf16 autocast.
 */
/* Similarities of n (<= 5, a compile-time constant) taps of one block in dot form, as the plain path computes
 * them: -scale (|q|^2 + |k|^2 - 2 q.k), one FMA per multiply-add (the difference form needs two). qn: |q|^2 of the
 * block; knp[j]: |k|^2 at tap j's load start (shuffled like the keys for border taps). */
static inline __attribute__((always_inline)) void LW_INF(sim_chunk)(const int n, long C, long HW, const LW_IN *qp,
                                                            const LW_IN *const *kp, const real *qn,
                                                            const real *const *knp, const int *border,
                                                            const vmask *idx, const vmask *valid, real scale,
                                                            vreal *out) {
    vreal a[5] = {0};
    int any = 0;
    for (int j = 0; j < n; j++) any |= border[j];
    if (!any) {
        for (long c = 0; c < C; c++) {
            vreal qv = vload_in(qp + c * HW);
            for (int j = 0; j < n; j++) a[j] += qv * vload_in(kp[j] + c * HW);
        }
    } else {
        for (long c = 0; c < C; c++) {
            vreal qv = vload_in(qp + c * HW);
            for (int j = 0; j < n; j++) {
                vreal kv = vload_in(kp[j] + c * HW);
                if (border[j]) kv = vshuf(kv, idx[j]);
                a[j] += qv * kv;
            }
        }
    }
    if (!qn) { /* raw dot products (the backward pass's weight gradient): 0 outside the image */
        for (int j = 0; j < n; j++) out[j] = border[j] ? vsel(valid[j], a[j], vsplat(0)) : a[j];
        return;
    }
    const vreal qnv = vload(qn);
    for (int j = 0; j < n; j++) {
        vreal knv = vload(knp[j]);
        if (border[j]) knv = vshuf(knv, idx[j]);
        vreal s = (a[j] + a[j] - qnv - knv) * scale;
        out[j] = border[j] ? vsel(valid[j], s, vsplat((real)-INFINITY)) : s;
    }
}

/* All 25 taps of one interior block of a 5 x 5, dilation-1 window (every window row inside the image, no tap
 * crossing the left or right border), channels c0 .. c1 - 1 in one pass: the query is loaded once per channel, not
 * once per window row, and 25 accumulators stay in registers. k0: the key at the window's top-left tap. The partial
 * sums of the channels before c0 are in s (tap o at s[o * sst]); after the last channel (c1 = C) s receives the
 * similarities (dot form, as sim_chunk; raw dot products when qn is NULL), else the partial sums. */
static inline __attribute__((always_inline)) void LW_INF(sim_block25)(long c0, long c1, long C, long HW, long W,
                                                                      const LW_IN *qp, const LW_IN *k0,
                                                                      const real *qn, const real *kn0, real scale,
                                                                      real *s, long sst) {
    vreal a[25];
    for (int o = 0; o < 25; o++) a[o] = c0 ? vload(s + o * sst) : vsplat(0);
    for (long c = c0; c < c1; c++) {
        const vreal qv = vload_in(qp + c * HW);
        const LW_IN *kc = k0 + c * HW;
        for (int r = 0; r < 5; r++)
            for (int j = 0; j < 5; j++) a[r * 5 + j] += qv * vload_in(kc + r * W + j);
    }
    if (!qn || c1 < C) { /* partial sums, or the raw dot products (the backward pass's weight gradient) */
        for (int o = 0; o < 25; o++) vstore(s + o * sst, a[o]);
        return;
    }
    const vreal qnv = vload(qn);
    for (int o = 0; o < 25; o++)
        vstore(s + o * sst, (a[o] + a[o] - qnv - vload(kn0 + (o / 5) * W + o % 5)) * scale);
}

/* out[(y - y0) W + x] = sum_c x(c, y, x)^2 for rows y0 .. y1 - 1 (rows of a plane are contiguous). */
static void LW_INF(sq_norm_rows)(const LW_IN *x, long C, long HW, long W, long y0, long y1, real *out) {
    const long n = (y1 - y0) * W;
    const LW_IN *x0 = x + y0 * W;
    for (long i = 0; i < n; i++) out[i] = 0;
    for (long c = 0; c < C; c++)
        for (long i = 0; i < n; i++) {
            real e = LD_IN(x0[c * HW + i]);
            out[i] += e * e;
        }
}

/* out[c, y, block] = sum over taps of w[tap, block] * v(c, y + dy, block + dx) for n (<= LW_CB, compile-time
 * constant) channels starting at channel plane vc. Interior blocks (no tap crosses the border) have a loop of
 * their own: it needs no shuffle registers, so the n accumulators stay in registers. */
static inline __attribute__((always_inline)) void LW_INF(read_chunk)(const int n, long HW, long W, long y, long xs,
                                                             const rowtaps *rt, const blocktap *tab, int any,
                                                             const LW_IN *vc, real *oc) {
    vreal acc[LW_CB] = {0};
    const LW_IN *vy = vc + y * W + xs;
    if (!any) {
        for (int i = 0; i < rt->n; i++) {
            vreal wv = vload(rt->wr[i] + xs);
            const LW_IN *src = vy + rt->t[i].dy * W + rt->t[i].dx;
            for (int j = 0; j < n; j++) acc[j] += wv * vload_in(src + j * HW);
        }
    } else {
        for (int i = 0; i < rt->n; i++) {
            vreal wv = vload(rt->wr[i] + xs);
            const blocktap *e = tab + rt->t[i].o;
            const LW_IN *src = vy + rt->t[i].dy * W + e->rel;
            if (!e->border) {
                for (int j = 0; j < n; j++) acc[j] += wv * vload_in(src + j * HW);
            } else {
                vmask ix = e->idx, ok = e->valid;
                for (int j = 0; j < n; j++) acc[j] += wv * (vreal)((vmask)vshuf(vload_in(src + j * HW), ix) & ok);
            }
        }
    }
    if (rt->h) {
        vreal hv = vload(rt->h + xs);
        for (int j = 0; j < n; j++) acc[j] *= hv;
    }
    for (int j = 0; j < n; j++) vstore(oc + j * HW + y * W + xs, acc[j]);
}

/* Readout of rows y0 .. y0 + nr - 1 (W >= VL). Channel blocks outside the rows: the value rows of a block of
 * channels are reused from cache by the next rows of the band instead of being fetched again for every row. */
static void LW_INF(read_band)(const geom *g, long C, long y0, long nr, const rowtaps *rt, const blocktap *tab,
                      const int *any, const LW_IN *v, const chlayout *il, const olayout *ol, long b) {
    const long W = g->W, HW = g->HW, O = g->O, nb = (W + VL - 1) / VL;
    long m;
    for (long c = 0; c < C; c += m) {
        const LW_IN *vc = v + ch_offset(il, HW, b, c);
        real *oc = out_plane(ol, HW, b, c);
        m = C - c < LW_CB ? C - c : LW_CB;
        if (ol->at.cper - c % ol->at.cper < m) m = ol->at.cper - c % ol->at.cper; /* a block stays within one object */
        if (il->cper - c % il->cper < m) m = il->cper - c % il->cper;
        for (long r = 0; r < nr; r++) {
            for (long bi = 0; bi < nb; bi++) {
                long xs = block_start(bi, W), y = y0 + r;
                const blocktap *tb = tab + bi * O;
                /* the band's leading row (the other window rows were read by the rows above) comes from memory:
                 * fetch it a few blocks ahead; the hardware prefetcher does not follow this many streams */
                const long reach = g->R * g->D, lx = xs + LW_PREFETCH_BLOCKS * VL;
                if (lx < W)
                    for (long ly = r ? y + reach : y - reach; ly <= y + reach; ly += g->D)
                        if (ly >= 0 && ly < g->H)
                            for (long j = 0; j < m; j++) __builtin_prefetch(vc + j * HW + ly * W + lx, 0, 3);
#define LW_READ_CHUNK(N) LW_INF(read_chunk)(N, HW, W, y, xs, rt + r, tb, any[bi], vc, oc)
                LW_UNROLL8(m, LW_READ_CHUNK)
#undef LW_READ_CHUNK
            }
        }
    }
}

/* Readout of rows y0 .. y0 + nr - 1, plain per pixel (rows narrower than VL). */
static void LW_INF(read_band_plain)(const geom *g, long C, long y0, long nr, const rowtaps *rt, const LW_IN *v,
                            const chlayout *il, const olayout *ol, long b) {
    const long W = g->W, HW = g->HW;
    for (long r = 0; r < nr; r++) {
        long y = y0 + r;
        for (long c = 0; c < C; c++) {
            const LW_IN *vc = v + ch_offset(il, HW, b, c);
            real *orow = out_plane(ol, HW, b, c) + y * W;
            for (long x = 0; x < W; x++) {
                real acc = 0;
                for (int i = 0; i < rt[r].n; i++) {
                    long xx = x + rt[r].t[i].dx;
                    if (xx >= 0 && xx < W) acc += rt[r].wr[i][x] * LD_IN(vc[(y + rt[r].t[i].dy) * W + xx]);
                }
                orow[x] = rt[r].h ? acc * rt[r].h[x] : acc;
            }
        }
    }
}

/* Similarity rows of row y into s (O rows of W, sst apart, -inf outside), W >= VL. qn = kn = NULL: the raw dot
 * products sum_c q(c, y, x) k(c, y + dy, x + dx) instead, 0 outside, scale unused. qn: |q|^2 of row y; kn: |k|^2 with row
 * y' at kn + y' W (the rows of the window). The key rows come from memory only as the band's leading row: they
 * are prefetched a few blocks ahead. */
static void LW_INF(sim_row_inf)(const geom *g, long C, const LW_IN *q, const LW_IN *k, const real *qn, const real *kn,
                        real scale, real *s, long sst, long b, long y) {
    const long W = g->W, HW = g->HW, O = g->O, K = g->K, nb = (W + VL - 1) / VL;
    const LW_IN *qb = q + b * C * HW + y * W, *kb = k + b * C * HW;
    const long ly = y + g->R * g->D;
    for (long o = 0; o < O; o++) {
        long dy = g->oy[o];
        if (y + dy < 0 || y + dy >= g->H)
            for (long x = 0; x < W; x++) s[o * sst + x] = qn ? (real)-INFINITY : 0;
    }
    /* The interior blocks of a 5 x 5 window: LW_SIM_CHANNELS channels at a time over the whole row, so the window
     * rows of those channels stay in L1 from one block to the next (all channels at once touch 5 rows of every
     * plane per block: more lines than L1 holds) */
    const int block25 = K == 5 && g->D == 1 && y >= 2 && y + 2 < g->H;
    for (long c0 = 0; block25 && c0 < C; c0 += LW_SIM_CHANNELS) {
        const long c1 = C - c0 < LW_SIM_CHANNELS ? C : c0 + LW_SIM_CHANNELS;
        for (long bi = 0; bi < nb; bi++) {
            const long xs = block_start(bi, W), lx = xs + LW_PREFETCH_BLOCKS * VL;
            if (xs < 2 || xs + VL + 2 > W) continue;
            if (ly < g->H && lx < W)
                for (long c = c0; c < c1; c++) __builtin_prefetch(kb + c * HW + ly * W + lx, 0, 3);
            if (!qn && W >= 96 && lx < W)
                for (long c = c0; c < c1; c++) __builtin_prefetch(qb + c * HW + lx, 0, 3);
            LW_INF(sim_block25)(c0, c1, C, HW, W, qb + xs, kb + (y - 2) * W + xs - 2, qn ? qn + xs : NULL,
                                kn ? kn + (y - 2) * W + xs - 2 : NULL, scale, s + xs, sst);
        }
    }
    for (long bi = 0; bi < nb; bi++) {
        long xs = block_start(bi, W), lx = xs + LW_PREFETCH_BLOCKS * VL;
        if (block25 && xs >= 2 && xs + VL + 2 <= W) continue; /* done above */
        if (ly < g->H && lx < W)
            for (long c = 0; c < C; c++) __builtin_prefetch(kb + c * HW + ly * W + lx, 0, 3);
        /* raw dot products (backward): no norm pass has brought the query rows into cache; a narrow image is
         * there anyway (1/16 of 480p: no gain, 2 % slower with the prefetches) */
        if (!qn && W >= 96 && lx < W)
            for (long c = 0; c < C; c++) __builtin_prefetch(qb + c * HW + lx, 0, 3);
        for (long r0 = 0; r0 < O; r0 += K) { /* one window row (same dy) at a time */
            long dy = g->oy[r0];
            if (y + dy < 0 || y + dy >= g->H) continue;
            for (long j0 = 0; j0 < K; j0 += 5) {
                const int n = K - j0 < 5 ? (int)(K - j0) : 5;
                const LW_IN *kp[5];
                const real *knp[5];
                int border[5];
                vmask idx[5], valid[5];
                vreal out[5];
                for (int j = 0; j < n; j++) {
                    long st;
                    border[j] = block_src(xs, g->ox[r0 + j0 + j], W, &st, &idx[j], &valid[j]);
                    kp[j] = kb + (y + dy) * W + st;
                    knp[j] = kn ? kn + (y + dy) * W + st : NULL;
                }
#define LW_SIM_CHUNK(N) LW_INF(sim_chunk)(N, C, HW, qb + xs, kp, qn ? qn + xs : NULL, knp, border, idx, valid, scale, out)
                switch (n) {
                case 5: LW_SIM_CHUNK(5); break;
                case 4: LW_SIM_CHUNK(4); break;
                case 3: LW_SIM_CHUNK(3); break;
                case 2: LW_SIM_CHUNK(2); break;
                default: LW_SIM_CHUNK(1); break;
                }
#undef LW_SIM_CHUNK
                for (int j = 0; j < n; j++) vstore(s + (r0 + j0 + j) * sst + xs, out[j]);
            }
        }
    }
}

/* Similarity rows, plain per pixel (rows narrower than VL). */
static void LW_INF(sim_row_inf_plain)(const geom *g, long C, const LW_IN *q, const LW_IN *k, real scale, real *s, long b,
                              long y) {
    const long W = g->W, HW = g->HW;
    for (long o = 0; o < g->O; o++) {
        long dy = g->oy[o], dx = g->ox[o];
        for (long x = 0; x < W; x++) {
            if (y + dy < 0 || y + dy >= g->H || x + dx < 0 || x + dx >= W) {
                s[o * W + x] = (real)-INFINITY;
                continue;
            }
            real acc = 0;
            for (long c = 0; c < C; c++) {
                real d = LD_IN(q[(b * C + c) * HW + y * W + x]) - LD_IN(k[(b * C + c) * HW + (y + dy) * W + x + dx]);
                acc += d * d;
            }
            s[o * W + x] = acc * -scale;
        }
    }
}

/* LMR (eq. 4-5) for inference. out: the B x Cv x H x W readout, laid out as in olayout (obs, ogs, cper, ops). vps > 0:
 * v and out are channels-last (read_band_nhwc; v bfloat16 when vbf16), out += the readout when accumulate, and act
 * (unless NULL) receives relu(out) (float when act_f32, else bf16); vps = 0: v is NCHW of type LW_IN. aff
 * (B x O x H x W) and topk (B x K x H x W, the K largest similarities per pixel, descending) may be NULL. No
 * similarity tensor is written. gtop (B x K x H x W global top-k) given: the readout is multiplied by the memory
 * comparator's reliability weight (eq. 9-10; 1x1 conv weights relw[K], bias relb, SCB alpha), which is also
 * written to relout (B x 1 x H x W) unless NULL. */
void LW_FN(LW_INF(lw_attention_inf))(const LW_IN *q, const LW_IN *k, const void *v, real *out, real *aff, real *topk,
                             long K, long B, long Ck, long Cv, long H, long W, long R, long D, double scale,
                             long vbs, long vgs, long vcper, long vps, int vbf16, long obs, long ogs, long cper,
                             long ops, int accumulate, void *act, int act_f32, const real *gtop,
                             const real *relw, double relb, double alpha, real *relout, int nthreads) {
    const olayout ol = {out, {obs, ogs, cper, ops}};
    const chlayout il = {vbs, vgs, vcper, vps};
    const nhwc_store st = {accumulate, act_f32, act};
    geom g = make_geom(H, W, R, D);
    const long O = g.O, HW = g.HW, nb = (W + VL - 1) / VL, Y = band_rows(&g, B, nthreads);
    const long bands = (H + Y - 1) / Y;
    if (K > LW_MAX_TOPK) K = LW_MAX_TOPK; /* never reached through the Python wrapper */
    blocktap *tab = W >= VL ? alloc_tables(nb * O) : NULL;
    int *any = W >= VL ? malloc(sizeof(int) * nb) : NULL;
    if (tab) block_tables(&g, tab, any);
#pragma omp parallel num_threads(nthreads) if (B * H * W * g.O >= LW_MIN_PARALLEL_WORK)
    {
        LW_DENORMALS_TO_ZERO;
        /* per thread: the similarity rows of one image row, the affinity rows of a band (unless written to aff) */
        real *s = malloc(sizeof(real) * ((1 + Y) * O * W + Y * W));
        real *abuf = s + O * W, *hbuf = abuf + Y * O * W;
        /* and the squared norms of the band's query rows and of the key rows its windows reach */
        const long reach = R * D, krows = Y + 2 * reach < H ? Y + 2 * reach : H;
        real *qn = malloc(sizeof(real) * (Y + krows) * W), *knb = qn + Y * W;
        rowtaps *rt = malloc(sizeof(rowtaps) * Y);
#pragma omp for schedule(static)
        for (long i = 0; i < B * bands; i++) {
            const long b = i / bands, y0 = (i % bands) * Y, nr = H - y0 < Y ? H - y0 : Y;
            const long k0 = y0 - reach > 0 ? y0 - reach : 0, k1 = y0 + nr + reach < H ? y0 + nr + reach : H;
            if (W >= VL) {
                LW_INF(sq_norm_rows)(q + b * Ck * HW, Ck, HW, W, y0, y0 + nr, qn);
                LW_INF(sq_norm_rows)(k + b * Ck * HW, Ck, HW, W, k0, k1, knb);
            }
            for (long r = 0; r < nr; r++) {
                const long y = y0 + r;
                if (W >= VL)
                    LW_INF(sim_row_inf)(&g, Ck, q, k, qn + r * W, knb - k0 * W, (real)scale, s, W, b, y);
                else
                    LW_INF(sim_row_inf_plain)(&g, Ck, q, k, (real)scale, s, b, y);
                real *arow = aff ? aff + b * O * HW + y * W : abuf + r * O * W;
                const long ast = aff ? HW : W;
                /* softmax over taps and top-k, VL pixels at a time (a narrow row pads a block) */
                for (long xs = 0; xs < W; xs += VL) {
                    long x0 = xs + VL > W ? (W >= VL ? W - VL : 0) : xs, m = W - x0 < VL ? W - x0 : VL;
                    vreal sv[LW_MAX_O], mx = vsplat((real)-INFINITY), sum = vsplat(0);
                    for (long o = 0; o < O; o++) {
                        if (m == VL)
                            sv[o] = vload(s + o * W + x0);
                        else
                            for (long l = 0; l < VL; l++) sv[o][l] = l < m ? s[o * W + x0 + l] : 0;
                        mx = vmax(mx, sv[o]);
                    }
                    if (topk || gtop) {
                        vreal top[LW_MAX_TOPK];
                        topk_block(O, K, sv, top);
                        if (topk)
                            for (long j = 0; j < K; j++) {
                                real *tr = topk + b * K * HW + j * HW + y * W + x0;
                                if (m == VL)
                                    vstore(tr, top[j]);
                                else
                                    for (long l = 0; l < m; l++) tr[l] = top[j][l];
                            }
                        if (gtop) {
                            vreal G[LW_MAX_TOPK], hv;
                            for (long j = 0; j < K; j++) {
                                const real *gr = gtop + b * K * HW + j * HW + y * W + x0;
                                if (m == VL)
                                    G[j] = vload(gr);
                                else
                                    for (long l = 0; l < VL; l++) G[j][l] = l < m ? gr[l] : 0;
                            }
                            hv = reliability_block(K, top, G, relw, (real)relb, (real)alpha);
                            for (long l = 0; l < m; l++) {
                                hbuf[r * W + x0 + l] = hv[l];
                                if (relout) relout[b * HW + y * W + x0 + l] = hv[l];
                            }
                        }
                    }
                    for (long o = 0; o < O; o++) {
                        sv[o] = vexp(sv[o] - mx);
                        sum += sv[o];
                    }
                    vreal inv = (real)1 / sum;
                    for (long o = 0; o < O; o++) {
                        vreal e = sv[o] * inv;
                        if (m == VL)
                            vstore(arow + o * ast + x0, e);
                        else
                            for (long l = 0; l < m; l++) arow[o * ast + x0 + l] = e[l];
                    }
                }
                rt[r].n = inf_taps(&g, y, rt[r].t);
                for (int j = 0; j < rt[r].n; j++) rt[r].wr[j] = arow + rt[r].t[j].o * ast;
                rt[r].h = gtop ? hbuf + r * W : NULL;
            }
            if (vps)
                read_band_nhwc(&g, Cv, y0, nr, rt, v, vbf16, &il, &ol, b, &st);
            else if (tab && any)
                LW_INF(read_band)(&g, Cv, y0, nr, rt, tab, any, v, &il, &ol, b);
            else
                LW_INF(read_band_plain)(&g, Cv, y0, nr, rt, v, &il, &ol, b);
        }
        free(rt);
        free(qn);
        free(s);
    }
    free(any);
    free(tab);
}

/* Eq. (6)-(7) for inference: out_i[b, c, y, x] = sum_o w(o, y, x) v_i(c, y + dy, x + dx) for up to two (value,
 * output, channels) triples in one pass over the weights (v2 may be NULL). up = 2: w is B x O x H/2 x W/2 and
 * pixel (y, x) uses weight (y/2, x/2), i.e. nearest upsampling by 2 without an upsampled copy; up = 1: w is
 * B x O x H x W. Weights of neighbours outside the image are ignored (they must be finite). v2 and out2 have the
 * layouts (v2bs, v2gs, v2cper, v2ps) and (o2bs, ...): channels-last when v2ps > 0 (then v2 is bf16 if v2bf16). */
void LW_FN(LW_INF(lw_wsum_inf))(const real *w, const LW_IN *v1, real *out1, long C1, const void *v2, real *out2, long C2,
                        long v2bs, long v2gs, long v2cper, long v2ps, int v2bf16, long o2bs, long o2gs, long o2cper,
                        long o2ps, long B, long H, long W, long R, long D, long up, int nthreads) {
    geom g = make_geom(H, W, R, D);
    const long O = g.O, Hw = H / up, Ww = W / up, HWw = Hw * Ww, nb = (W + VL - 1) / VL;
    const olayout ol1 = {out1, plain_layout(C1, g.HW)}, ol2 = {out2, {o2bs, o2gs, o2cper, o2ps}};
    const chlayout il1 = plain_layout(C1, g.HW), il2 = {v2bs, v2gs, v2cper, v2ps};
    const nhwc_store st2 = {0, 1, NULL};
    const long Y = band_rows(&g, B, nthreads), bands = (H + Y - 1) / Y;
    blocktap *tab = W >= VL ? alloc_tables(nb * O) : NULL;
    int *any = W >= VL ? malloc(sizeof(int) * nb) : NULL;
    if (tab) block_tables(&g, tab, any);
#pragma omp parallel num_threads(nthreads) if (B * H * W * g.O >= LW_MIN_PARALLEL_WORK)
    {
        LW_DENORMALS_TO_ZERO;
        real *scratch = up == 1 ? NULL : malloc(sizeof(real) * Y * O * W);
        rowtaps *rt = malloc(sizeof(rowtaps) * Y);
#pragma omp for schedule(static)
        for (long i = 0; i < B * bands; i++) {
            const long b = i / bands, y0 = (i % bands) * Y, nr = H - y0 < Y ? H - y0 : Y;
            for (long r = 0; r < nr; r++) {
                const long y = y0 + r;
                rt[r].n = inf_taps(&g, y, rt[r].t);
                rt[r].h = NULL;
                for (int j = 0; j < rt[r].n; j++) {
                    const real *src = w + b * O * HWw + rt[r].t[j].o * HWw + (y / up) * Ww;
                    if (up == 1) {
                        rt[r].wr[j] = src;
                    } else {
                        real *row = scratch + (r * O + rt[r].t[j].o) * W;
                        upsample2_row(src, row, W);
                        rt[r].wr[j] = row;
                    }
                }
            }
            if (tab && any)
                LW_INF(read_band)(&g, C1, y0, nr, rt, tab, any, v1, &il1, &ol1, b);
            else
                LW_INF(read_band_plain)(&g, C1, y0, nr, rt, v1, &il1, &ol1, b);
            if (v2 && v2ps)
                read_band_nhwc(&g, C2, y0, nr, rt, v2, v2bf16, &il2, &ol2, b, &st2);
            else if (v2 && tab && any)
                LW_INF(read_band)(&g, C2, y0, nr, rt, tab, any, v2, &il2, &ol2, b);
            else if (v2)
                LW_INF(read_band_plain)(&g, C2, y0, nr, rt, v2, &il2, &ol2, b);
        }
        free(rt);
        free(scratch);
    }
    free(any);
    free(tab);
}
