/* The decoder's last step at the input's resolution: x4 bilinear upsampling of each object's logits and the soft
 * aggregation of the objects (sigmoid, background = prod(1 - p), clamped odds normalised), in one pass over the
 * output. In PyTorch these were eight passes over full-resolution tensors (interpolate, sigmoid, 1 - p, prod, cat,
 * clamp, two divisions, a sum): 3-4 ms per 480p frame with 2 objects on a 2-core Xeon.
 *
 * Upsampling as F.interpolate(scale_factor=4, mode="bilinear", align_corners=False): output pixel X samples the
 * input at (X + 0.5) / 4 - 0.5, clamped to the image; the weights of the four phases X % 4 are 3/8 5/8, 1/8 7/8,
 * 7/8 1/8, 5/8 3/8 of the columns (i - 1, i), (i - 1, i), (i, i + 1), (i, i + 1) for X = 4 i + phase. Inputs and
 * outputs are float whatever LW_REAL is.
 */
#include <stdlib.h>

#include "kernels.h"

#define AG_EPS 1e-7f
#define AG_MAX_OBJECTS 16 /* objects per image the kernel takes (the Python wrapper falls back beyond) */

/* n <= VL floats as a vector (lanes past n: 0), and back */
static inline vreal load_floats(const float *p, long n) {
    vreal v = vsplat(0);
    if (n == VL && sizeof(real) == sizeof(float)) {
        memcpy(&v, p, sizeof v);
        return v;
    }
    for (long j = 0; j < n; j++) v[j] = p[j];
    return v;
}
static inline void store_floats(float *p, vreal v, long n) {
    if (n == VL && sizeof(real) == sizeof(float)) {
        memcpy(p, &v, sizeof v);
        return;
    }
    for (long j = 0; j < n; j++) p[j] = (float)v[j];
}

/* row (W4 = 4 w floats) = the x4 upsampling of src (w floats) along x; t: w + 2 floats of scratch */
static void upsample4_row(const float *src, long w, float *t, float *row) {
    t[0] = src[0]; /* the edges repeat: clamping the sample position */
    memcpy(t + 1, src, sizeof(float) * w);
    t[w + 1] = src[w - 1];
    for (long i = 0; i < w; i++) {
        const float a = t[i], b = t[i + 1], c = t[i + 2];
        row[4 * i] = 0.375f * a + 0.625f * b;
        row[4 * i + 1] = 0.125f * a + 0.875f * b;
        row[4 * i + 2] = 0.875f * b + 0.125f * c;
        row[4 * i + 3] = 0.625f * b + 0.375f * c;
    }
}

/* low (B x N x h x w) -> logits (B x N x 4h x 4w) and probs (B x (N + 1) x 4h x 4w, channel 0 the background);
 * valid (B x N, 1 or 0) or NULL: an invalid object's probability is 0 (a padding object of a batch). */
void LW_FN(ag_upsample4_aggregate)(const float *low, const float *valid, float *logits, float *probs, long B, long N,
                                   long h, long w, int nthreads) {
    const long H4 = 4 * h, W4 = 4 * w, P4 = H4 * W4;
#pragma omp parallel num_threads(nthreads)
    {
        LW_DENORMALS_TO_ZERO;
        float *scratch = malloc(sizeof(float) * ((w + 2) + 2 * W4));
        float *t = scratch, *r0 = t + (w + 2), *r1 = r0 + W4;
#pragma omp for schedule(static)
        for (long i = 0; i < B * H4; i++) {
            const long b = i / H4, Y = i % H4;
            float sy = (Y + 0.5f) * 0.25f - 0.5f;
            if (sy < 0) sy = 0;
            const long y0 = (long)sy, y1 = y0 + (y0 < h - 1);
            const float ly = sy - (float)y0;
            /* the objects' upsampled logits of this row, written to `logits`, read back below while in cache */
            for (long o = 0; o < N; o++) {
                const float *plane = low + (b * N + o) * h * w;
                upsample4_row(plane + y0 * w, w, t, r0);
                upsample4_row(plane + y1 * w, w, t, r1);
                float *out = logits + (b * N + o) * P4 + Y * W4;
                for (long X = 0; X < W4; X++) out[X] = (1 - ly) * r0[X] + ly * r1[X];
            }
            for (long X0 = 0; X0 < W4; X0 += VL) {
                const long n = W4 - X0 < VL ? W4 - X0 : VL, at = Y * W4 + X0;
                const vreal lo = vsplat(AG_EPS), hi = vsplat(1 - AG_EPS);
                vreal p[AG_MAX_OBJECTS], bg = vsplat(1);
                for (long o = 0; o < N; o++) {
                    const int keep = !valid || valid[b * N + o] != 0;
                    p[o] = keep ? vsigmoid(load_floats(logits + (b * N + o) * P4 + at, n)) : vsplat(0);
                    bg *= 1 - p[o];
                }
                /* clamped odds s / (1 - s) normalised: the softmax of the clamped log-odds; an invalid object: 0 */
                vreal s = vmin(vmax(bg, lo), hi);
                const vreal bg_odds = s / (1 - s);
                vreal total = bg_odds;
                for (long o = 0; o < N; o++) {
                    s = vmin(vmax(p[o], lo), hi);
                    p[o] = !valid || valid[b * N + o] != 0 ? s / (1 - s) : vsplat(0); /* now the object's odds */
                    total += p[o];
                }
                store_floats(probs + b * (N + 1) * P4 + at, bg_odds / total, n);
                for (long o = 0; o < N; o++) store_floats(probs + (b * (N + 1) + 1 + o) * P4 + at, p[o] / total, n);
            }
        }
        free(scratch);
    }
}
