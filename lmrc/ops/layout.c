/* Layout changes between the convolutions' channels-last tensors (NHWC) and the memory reads' NCHW ones.
 *
 * A P x C matrix transposed in tiles of TILE rows: the tile's rows (TILE * C elements) stay in L1 while each of
 * the C output rows gets TILE contiguous elements. PyTorch runs this copy on one thread, element-wise; the
 * tiles here are split over the threads. The types are fixed (bfloat16 bits, float), whatever LW_REAL is.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define TILE 32

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element e of a bfloat16 (f32 = 0) or float (f32 = 1) array, as float, and back (bf16 rounded to nearest even). */
static inline float load_as_f32(const void *p, long e, int f32) {
    return f32 ? ((const float *)p)[e] : bf16_to_f32(((const uint16_t *)p)[e]);
}
static inline void store_from_f32(void *p, long e, float v, int f32) {
    if (f32)
        ((float *)p)[e] = v;
    else
        ((uint16_t *)p)[e] = f32_to_bf16(v);
}

/* dst[i] (C x P) = src[i] (P x C) + shared[i / per_shared] (P x C, optional) for i < images. Each tile is first
 * summed row by row into float (contiguous, vectorised), then transposed out; a bf16 sum is rounded once. Inlined
 * into each exported variant, where the types are constants. */
static inline __attribute__((always_inline)) void nhwc_to_nchw(const void *src, const void *shared, void *dst,
                                                               long images, long per_shared, long C, long P,
                                                               int src_f32, int dst_f32, int nthreads) {
    const long tiles = (P + TILE - 1) / TILE;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (long i = 0; i < images; i++)
        for (long t = 0; t < tiles; t++) {
            const long p0 = t * TILE, n = P - p0 < TILE ? P - p0 : TILE;
            const long s0 = (i * P + p0) * C, h0 = ((i / per_shared) * P + p0) * C, d0 = i * C * P + p0;
            float tile[TILE * C];
            for (long e = 0; e < n * C; e++)
                tile[e] = shared ? load_as_f32(src, s0 + e, src_f32) + load_as_f32(shared, h0 + e, src_f32)
                                 : load_as_f32(src, s0 + e, src_f32);
            for (long c = 0; c < C; c++)
                for (long p = 0; p < n; p++) store_from_f32(dst, d0 + c * P + p, tile[p * C + c], dst_f32);
        }
}

void LW_FN(ly_nhwc_to_nchw_bf16)(const uint16_t *src, const uint16_t *shared, uint16_t *dst, long images,
                                 long per_shared, long C, long P, int nthreads) {
    nhwc_to_nchw(src, shared, dst, images, per_shared, C, P, 0, 0, nthreads);
}

void LW_FN(ly_nhwc_bf16_to_nchw_f32)(const uint16_t *src, const uint16_t *shared, float *dst, long images,
                                     long per_shared, long C, long P, int nthreads) {
    nhwc_to_nchw(src, shared, dst, images, per_shared, C, P, 0, 1, nthreads);
}

void LW_FN(ly_nhwc_to_nchw_f32)(const float *src, const float *shared, float *dst, long images, long per_shared,
                                long C, long P, int nthreads) {
    nhwc_to_nchw(src, shared, dst, images, per_shared, C, P, 1, 1, nthreads);
}

/* dst[i] (P x C) += sum over g < groups of src[i, g] (C x P) for i < images; float. The groups are added in
 * order, each in float, as a sequence of in-place adds would. act (P x C per image, optional): relu(dst) as well,
 * in bfloat16 (act_f32 = 0) or float, in the same pass (the decoder's residual block starts with that ReLU, and its
 * convolution takes bf16 under bf16 autocast). */
void LW_FN(ly_add_nchw_groups_to_nhwc_f32)(const float *src, float *dst, void *act, long images, long groups, long C,
                                          long P, int act_f32, int nthreads) {
    const long tiles = (P + TILE - 1) / TILE;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (long i = 0; i < images; i++)
        for (long t = 0; t < tiles; t++) {
            const long p0 = t * TILE, n = P - p0 < TILE ? P - p0 : TILE;
            float *d = dst + (i * P + p0) * C;
            for (long g = 0; g < groups; g++) {
                const float *s = src + (i * groups + g) * C * P + p0;
                for (long c = 0; c < C; c++)
                    for (long p = 0; p < n; p++) d[p * C + c] += s[c * P + p];
            }
            if (act)
                for (long e = 0; e < n * C; e++) store_from_f32(act, (i * P + p0) * C + e, d[e] > 0 ? d[e] : 0, act_f32);
        }
}
