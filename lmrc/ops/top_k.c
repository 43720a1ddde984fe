/* Row-wise top-k for the global memory read with STCN's top-k (eq. 2 over the k best similarities of a query).
 *
 * For each row of a contiguous rows x cols matrix: the k largest entries, sorted descending, and their column
 * indices. A similarity row has thousands of entries and only k survive, so the running k-th best is a threshold
 * that almost every pair of vectors fails at once; the few lanes that pass are inserted into a sorted list of k.
 * A floor computed first (tk_floor) keeps a row in ascending order, the worst case, from inserting every entry.
 */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels.h"

/* x into the sorted (descending) list val/idx of k entries, dropping the smallest; x > val[k-1] */
static inline void tk_insert(real *val, long *idx, long k, real x, long j) {
    long p = k - 1;
    while (p > 0 && val[p - 1] < x) {
        val[p] = val[p - 1];
        idx[p] = idx[p - 1];
        p--;
    }
    val[p] = x;
    idx[p] = j;
}

/* The lanes of m (all ones or zero) as bits, lane l -> bit l: one instruction on x86 (a lane-by-lane loop
 * compiles to an extract per lane) */
static inline unsigned long tk_bits(vmask m) {
#if defined(__AVX512DQ__) && LW_VBYTES == 64
    return sizeof(real) == 4 ? _mm512_movepi32_mask((__m512i)m) : _mm512_movepi64_mask((__m512i)m);
#elif defined(__AVX__) && LW_VBYTES == 32
    return sizeof(real) == 4 ? _mm256_movemask_ps((__m256)m) : _mm256_movemask_pd((__m256d)m);
#elif defined(__SSE2__) && LW_VBYTES == 16
    return sizeof(real) == 4 ? _mm_movemask_ps((__m128)m) : _mm_movemask_pd((__m128d)m);
#else
    unsigned long bits = 0;
    for (int l = 0; l < VL; l++) bits |= (unsigned long)(m[l] & 1) << l;
    return bits;
#endif
}

/* Whether any lane of a or b is >= bar: two compares into mask registers on AVX-512 (the generic form goes
 * through vectors of all-ones lanes and back) */
static inline int tk_any_ge(vreal a, vreal b, real bar) {
#if defined(__AVX512F__) && LW_VBYTES == 64
    if (sizeof(real) == 4)
        return (_mm512_cmp_ps_mask((__m512)a, _mm512_set1_ps((float)bar), _CMP_GE_OQ)
                | _mm512_cmp_ps_mask((__m512)b, _mm512_set1_ps((float)bar), _CMP_GE_OQ)) != 0;
    return (_mm512_cmp_pd_mask((__m512d)a, _mm512_set1_pd((double)bar), _CMP_GE_OQ)
            | _mm512_cmp_pd_mask((__m512d)b, _mm512_set1_pd((double)bar), _CMP_GE_OQ)) != 0;
#else
    return tk_bits((a >= vsplat(bar)) | (b >= vsplat(bar))) != 0;
#endif
}

/* Lane-wise maximum: one instruction on x86 (vmax's compare and select is two, in a dependent chain) */
static inline vreal tk_max(vreal a, vreal b) {
#if defined(__AVX512F__) && LW_VBYTES == 64
    return sizeof(real) == 4 ? (vreal)_mm512_max_ps((__m512)a, (__m512)b) : (vreal)_mm512_max_pd((__m512d)a, (__m512d)b);
#elif defined(__AVX__) && LW_VBYTES == 32
    return sizeof(real) == 4 ? (vreal)_mm256_max_ps((__m256)a, (__m256)b) : (vreal)_mm256_max_pd((__m256d)a, (__m256d)b);
#elif defined(__SSE2__) && LW_VBYTES == 16
    return sizeof(real) == 4 ? (vreal)_mm_max_ps((__m128)a, (__m128)b) : (vreal)_mm_max_pd((__m128d)a, (__m128d)b);
#else
    return vmax(a, b);
#endif
}

/* Entry j of a row of real (bf16 = 0) or bfloat16 entries, and VL of them from j, as real */
static inline __attribute__((always_inline)) real tk_load1(const void *row, int bf16, long j) {
#ifdef LW_BF16_INPUTS
    if (bf16) return ld_bf16((const lw_bf16 *)row + j);
#endif
    return ((const real *)row)[j];
}
static inline __attribute__((always_inline)) vreal tk_load(const void *row, int bf16, long j) {
#ifdef LW_BF16_INPUTS
    if (bf16) return vload_bf16((const lw_bf16 *)row + j);
#endif
    return vload((const real *)row + j);
}

#define TK_LANES 32 /* lane maxima of the floor (a multiple of every VL) */

/* A floor under the k-th largest entry of a row: TK_LANES lane-wise maxima of disjoint sets of its entries are
 * TK_LANES distinct entries, so at least k entries are >= the k-th largest of them. Entries below it cannot be among
 * the k largest, so the scan skips them from the start, whatever their order: with the running k-th best alone, a
 * row in ascending order inserts every entry (8100-entry rows: 24x slower than in random order; with the floor,
 * no slower). -inf when k > TK_LANES or the row is short (NaN maxima count as -inf: still a floor). */
static inline __attribute__((always_inline)) real tk_floor(const void *row, int bf16, long cols, long k) {
    enum { A = TK_LANES / VL, U = 4 }; /* U sets of lane maxima per lane vector: independent chains of maxima */
    if (k > TK_LANES || cols < U * TK_LANES) return (real)-INFINITY;
    vreal m[U][A];
    for (int u = 0; u < U; u++)
        for (int a = 0; a < A; a++) m[u][a] = tk_load(row, bf16, (u * A + a) * VL);
    for (long j = U * TK_LANES; j + U * TK_LANES <= cols; j += U * TK_LANES)
        for (int u = 0; u < U; u++)
            for (int a = 0; a < A; a++) m[u][a] = tk_max(m[u][a], tk_load(row, bf16, j + (u * A + a) * VL));
    vreal lanes[A];
    for (int a = 0; a < A; a++) {
        vreal x = tk_max(tk_max(m[0][a], m[1][a]), tk_max(m[2][a], m[3][a])); /* maxima of disjoint unions */
        lanes[a] = vsel(x == x, x, vsplat((real)-INFINITY));
    }
    /* the k-th largest lane: the one with k - 1 lanes above it (ties broken by position), counted with vector
     * compares: a sort of 32 values in random order mispredicts a branch about every other step */
    real kth = (real)-INFINITY;
    for (int i = 0; i < TK_LANES; i++) {
        const real li = lanes[i / VL][i % VL];
        long rank = 0;
        for (int a = 0; a < A; a++) {
            const long before = i - a * VL; /* lanes of vector a before lane i */
            const unsigned long earlier = before <= 0 ? 0 : before >= VL ? ~0ul : (1ul << before) - 1;
            rank += __builtin_popcountl(tk_bits(lanes[a] > vsplat(li)))
                    + __builtin_popcountl(tk_bits(lanes[a] == vsplat(li)) & earlier);
        }
        kth = rank == k - 1 ? li : kth;
    }
    return kth;
}

/* Entries j .. cols - 1 of a row into the sorted list val/idx of k: an entry
 * enters when it beats the running k-th best and is not below the row's floor (tk_floor; >=, so entries tied with
 * it still count). One compare per vector; only the lanes that pass are visited, by their bits. */
static inline __attribute__((always_inline)) void tk_scan(const void *row, int bf16, long j, long cols, long k,
                                                          real floor, real *val, long *idx) {
    real threshold = val[k - 1];
    for (; j + 2 * VL <= cols; j += 2 * VL) { /* skip a pair of vectors with no lane at the floor and the k-th best */
        const vreal v0 = tk_load(row, bf16, j), v1 = tk_load(row, bf16, j + VL);
        if (!tk_any_ge(v0, v1, floor > threshold ? floor : threshold)) continue;
        for (int h = 0; h < 2; h++) {
            const vreal v = h ? v1 : v0;
            unsigned long bits = tk_bits((v > vsplat(threshold)) & (v >= vsplat(floor)));
            while (bits) {
                const int l = __builtin_ctzl(bits);
                bits &= bits - 1;
                if (v[l] > threshold) {
                    tk_insert(val, idx, k, v[l], j + h * VL + l);
                    threshold = val[k - 1];
                }
            }
        }
    }
    for (; j < cols; j++) {
        const real x = tk_load1(row, bf16, j);
        if (x > threshold && x >= floor) {
            tk_insert(val, idx, k, x, j);
            threshold = val[k - 1];
        }
    }
}

/* One row (cols >= k): the list begins with its first k entries, insertion-sorted, then the scan. */
static inline __attribute__((always_inline)) void tk_row(const void *row, int bf16, long cols, long k, real *val,
                                                         long *idx) {
    for (long j = 0; j < k; j++) {
        const real x = tk_load1(row, bf16, j);
        long p = j;
        while (p > 0 && val[p - 1] < x) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
            p--;
        }
        val[p] = x;
        idx[p] = j;
    }
    tk_scan(row, bf16, k, cols, k, tk_floor(row, bf16, cols, k), val, idx);
}

/* x rows x cols (contiguous), 1 <= k <= cols -> val rows x k, idx rows x k (int64), each row sorted descending */
void LW_FN(tk_rows)(const real *x, long rows, long cols, long k, real *val, long *idx, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) tk_row(x + r * cols, 0, cols, k, val + r * k, idx + r * k);
}

#ifdef LW_BF16_INPUTS
/* tk_rows of bfloat16 rows (the global read's similarities under bf16 autocast), read in place and compared as
 * float; val is float (exactly the bf16 values). */
void LW_FN(tk_rows_bf16)(const lw_bf16 *x, long rows, long cols, long k, real *val, long *idx, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) tk_row(x + r * cols, 1, cols, k, val + r * k, idx + r * k);
}
#endif
