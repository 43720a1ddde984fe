/* The first convolution of lmrc-lite's value trunk, read straight from the objects' soft masks.
 *
 * The trunk's input per object o of image b is (m_o, t - m_o): its mask and every other object's (t = sum of the
 * image's masks), at full resolution. Two input channels are too few for oneDNN's blocked kernels (2.8 ms for the
 * 3x3 stride-2 conv of two 480p masks on a 2-core Xeon, plus 2 ms of PyTorch passes building the input). The conv
 * is linear in its input, so per output pixel
 *     out_o = relu(bias + sum_tap W1[tap] * t(tap) + sum_tap (W0 - W1)[tap] * m_o(tap)),
 * W0 / W1 the weights of the mask / other-objects channel: the t term is computed once per pixel for every object.
 * Vectors run over the output channels (C = a multiple of VL, at most 8 vectors), the output is channels-last.
 * Geometry fixed to lmrc-lite's: 3x3 kernel, stride 2, padding 1. Inputs and weights are float whatever LW_REAL is.
 */
#include <stdlib.h>

#include "kernels.h"

/* Output pixels j .. j + PB - 1 of row i of every object: pixel q's window reads input columns 2(j + q) - 1 ..
 * 2(j + q) + 1, those outside [0, W) skipped when `checked` (the first column, and the last for odd W).
 * rows[ky * N + o]: object o's input row ky of the window (a zero row outside the image); total + ky * W: their sum
 * over the objects. PB pixels at once give PB independent chains of multiply-adds (one chain per pixel would wait
 * on the FMA latency). */
#define MC_PIXELS(CV, PB, checked)                                                                                  \
    do {                                                                                                            \
        vreal s[PB][CV];                                                                                            \
        for (int q = 0; q < PB; q++)                                                                                \
            for (int v = 0; v < CV; v++) s[q][v] = vload(bias_r + v * VL);                                          \
        for (int ky = 0; ky < 3; ky++)                                                                              \
            for (int kx = 0; kx < 3; kx++)                                                                          \
                for (int q = 0; q < PB; q++) {                                                                      \
                    const long x = 2 * (j + q) - 1 + kx;                                                            \
                    if (checked && (x < 0 || x >= W)) continue;                                                     \
                    const real tv = total[ky * W + x];                                                              \
                    for (int v = 0; v < CV; v++) s[q][v] += vload(wt + (ky * 3 + kx) * C + v * VL) * tv;          \
                }                                                                                                   \
        for (long o = 0; o < N; o++) {                                                                              \
            vreal acc[PB][CV];                                                                                      \
            for (int q = 0; q < PB; q++)                                                                            \
                for (int v = 0; v < CV; v++) acc[q][v] = s[q][v];                                                   \
            for (int ky = 0; ky < 3; ky++)                                                                          \
                for (int kx = 0; kx < 3; kx++)                                                                      \
                    for (int q = 0; q < PB; q++) {                                                                  \
                        const long x = 2 * (j + q) - 1 + kx;                                                        \
                        if (checked && (x < 0 || x >= W)) continue;                                                 \
                        const real mv = rows[ky * N + o][x];                                                        \
                        for (int v = 0; v < CV; v++) acc[q][v] += vload(wd + (ky * 3 + kx) * C + v * VL) * mv;     \
                    }                                                                                               \
            for (int q = 0; q < PB; q++)                                                                            \
                for (int v = 0; v < CV; v++)                                                                        \
                    vstore_relu(out, (((b * N + o) * Ho + i) * Wo + j + q) * C + v * VL, acc[q][v], out_f32);       \
        }                                                                                                           \
    } while (0)

/* One output row: blocks of 8 / CV pixels (at least 1) in the interior, single checked pixels at the borders. */
#define MC_ROW(CV)                                                                                                  \
    {                                                                                                               \
        enum { PB = CV >= 8 ? 1 : 8 / CV };                                                                         \
        long j = 0;                                                                                                 \
        MC_PIXELS(CV, 1, 1);                                                                                        \
        for (j = 1; j + PB <= Wo && 2 * (j + PB - 1) + 1 < W; j += PB) MC_PIXELS(CV, PB, 0);                      \
        for (; j < Wo; j++) MC_PIXELS(CV, 1, 1);                                                                    \
    }

/* out (B*N x Ho x Wo x C, float if out_f32 else bfloat16) from masks (B x N x H x W, float); weight_t (9 x C) =
 * W1, weight_d (9 x C) = W0 - W1, taps row-major; bias (C). Ho = (H + 1) / 2, Wo = (W + 1) / 2. */
void LW_FN(mc_mask_stem)(const float *masks, const float *weight_t, const float *weight_d, const float *bias,
                         void *out, long B, long N, long H, long W, long C, int out_f32, int nthreads) {
    const long Ho = (H + 1) / 2, Wo = (W + 1) / 2, CV = C / VL;
    real wt[9 * C], wd[9 * C], bias_r[C]; /* in the build's real type, for vload */
    for (long e = 0; e < 9 * C; e++) {
        wt[e] = weight_t[e];
        wd[e] = weight_d[e];
    }
    for (long c = 0; c < C; c++) bias_r[c] = bias[c];
#pragma omp parallel num_threads(nthreads)
    {
        real *total = malloc(3 * W * sizeof(real));
        float *zeros = calloc(W, sizeof(float)); /* what a row outside the image reads */
        const float *rows[3 * N];
#pragma omp for schedule(static)
        for (long r = 0; r < B * Ho; r++) {
            const long b = r / Ho, i = r % Ho;
            for (int ky = 0; ky < 3; ky++) {
                const long y = 2 * i - 1 + ky;
                real *t = total + ky * W;
                for (long x = 0; x < W; x++) t[x] = 0;
                for (long o = 0; o < N; o++) {
                    const float *m = y >= 0 && y < H ? masks + ((b * N + o) * H + y) * W : zeros;
                    rows[ky * N + o] = m;
                    for (long x = 0; x < W; x++) t[x] += m[x];
                }
            }
            LW_UNROLL8(CV, MC_ROW)
        }
        free(total);
        free(zeros);
    }
}
