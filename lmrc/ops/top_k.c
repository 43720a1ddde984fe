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

/* x into the sorted (descending) list val/idx of k entries, dropping the smallest (val[k - 1], which x beats; a list
 * being filled passes k = entries so far + 1) */
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

/* The lanes of v flagged in bits that still beat the list's k-th best, into the list (column of lane l: col0 + l) */
static inline void tk_insert_lanes(vreal v, unsigned long bits, real *val, long *idx, long k, long col0) {
    while (bits) {
        const int l = __builtin_ctzl(bits);
        bits &= bits - 1;
        if (v[l] > val[k - 1]) tk_insert(val, idx, k, v[l], col0 + l);
    }
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

/* The k-th largest (k <= TK_LANES) of the TK_LANES lanes of `lanes` (NaN counted as -inf): the lane with k - 1 lanes
 * above it, ties broken by position, counted with vector compares (a sort of 32 values in random order mispredicts
 * a branch about every other step) */
static inline real tk_kth_lane(const vreal *lanes, long k) {
    enum { A = TK_LANES / VL };
    vreal x[A];
    for (int a = 0; a < A; a++) x[a] = vsel(lanes[a] == lanes[a], lanes[a], vsplat((real)-INFINITY));
    real kth = (real)-INFINITY;
    for (int i = 0; i < TK_LANES; i++) {
        const real li = x[i / VL][i % VL];
        long rank = 0;
        for (int a = 0; a < A; a++) {
            const long before = i - a * VL; /* lanes of vector a before lane i */
            const unsigned long earlier = before <= 0 ? 0 : before >= VL ? ~0ul : (1ul << before) - 1;
            rank += __builtin_popcountl(tk_bits(x[a] > vsplat(li)))
                    + __builtin_popcountl(tk_bits(x[a] == vsplat(li)) & earlier);
        }
        kth = rank == k - 1 ? li : kth;
    }
    return kth;
}

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
    for (int a = 0; a < A; a++) lanes[a] = tk_max(tk_max(m[0][a], m[1][a]), tk_max(m[2][a], m[3][a])); /* unions */
    return tk_kth_lane(lanes, k);
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
            tk_insert_lanes(v, tk_bits((v > vsplat(threshold)) & (v >= vsplat(floor))), val, idx, k, j + h * VL);
            threshold = val[k - 1];
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
    for (long j = 0; j < k; j++) tk_insert(val, idx, j + 1, tk_load1(row, bf16, j), j); /* a list of j + 1 */
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

#if defined(LW_BF16_INPUTS) && LW_VBYTES == 64 && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) \
    && !defined(__clang__) && __GNUC__ >= 11
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The top-k of the global read's similarities straight from the matrix product, on AMX tiles: each 16 x 16 block of
 * products is made in a tile, stored to a 1 KB buffer, and scanned there against the running k-th best of its 16
 * rows; the n x M similarity matrix is never written (at 20 memory frames of 480p it is 105 MB in bf16, written by
 * the matrix product and read back by the scan, against 4 MB of keys).
 *
 * q: n16 x C bf16 (query rows, zero rows up to a multiple of 16; the scale folded in), keys: C/2 x m16 x 2 bf16
 * (channel pairs, the tiles' VNNI layout; positions up to a multiple of 16), bias: m16 floats added to each product
 * (-inf at the padding positions). val/idx: n x k, each row sorted descending. C a multiple of 32, at most 64.
 * Returns 0, or -1 when Linux refuses the tile state or memory runs out (the caller then takes the matrix product). */
#define TK_AMX_BLOCKS 64 /* memory blocks of 16 positions whose keys stay in cache across the query tiles */
#define TK_AMX_SAMPLE 4  /* the floor pass takes every 4th block */

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tk_tile_config;

static int tk_amx_permitted(void) {
    static int state; /* 0 unknown, 1 granted, -1 refused (process-wide) */
    if (!state) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) ? -1 : 1;
    return state > 0;
}

/* 16 query rows' products with one block of 16 keys (c, 16 x 16 floats) plus the block's bias: into the rows'
 * lists (floors given: entries below a row's floor are skipped), or into the rows' lane maxima (maxima given: two
 * vectors per row, `set` picking one) */
static inline void tk_amx_visit(const float *c, const float *bias, long blk, long rows, long k, float *val, long *idx,
                                const float *floors, vreal *maxima, int set) {
    const vreal bv = vload(bias + blk * 16);
    if (maxima) {
        for (long i = 0; i < rows; i++) maxima[2 * i + set] = tk_max(maxima[2 * i + set], vload(c + i * 16) + bv);
        return;
    }
    for (long i = 0; i < rows; i++) {
        real *vi = val + i * k;
        const vreal v = vload(c + i * 16) + bv;
        tk_insert_lanes(v, tk_bits((v > vsplat(vi[k - 1])) & (v >= vsplat(floors[i]))), vi, idx + i * k, k, blk * 16);
    }
}

/* One block's products into tile ACC (tiles 1, 2: the query rows' two halves of 32 channels; B0, B1: its keys) */
#define TK_AMX_BLOCK(ACC, B0, B1, blk)                                    \
    do {                                                                  \
        _tile_zero(ACC);                                                  \
        _tile_loadd(B0, keys + (blk) * 32, kstride);                      \
        _tile_dpbf16ps(ACC, 1, B0);                                       \
        if (steps > 1) {                                                  \
            _tile_loadd(B1, keys + 16 * m16 * 2 + (blk) * 32, kstride);   \
            _tile_dpbf16ps(ACC, 2, B1);                                   \
        }                                                                 \
    } while (0)

/* Query tiles t0 .. t1 - 1 against key blocks 0, step, 2 step, ... (all when step = 1), four at a time, each 16 x 16
 * block of products handed to tk_amx_visit: maxima (the floor pass; block b into set (b / step) & 1) or floors (the
 * scan). Key blocks in chunks that stay in cache while every query tile of the thread passes over them. */
__attribute__((target("amx-tile,amx-bf16"))) static void tk_amx_pass(const lw_bf16 *q, long n, long C,
                                                                     const lw_bf16 *keys, const float *bias, long m16,
                                                                     long k, float *val, long *idx, long t0, long t1,
                                                                     long step, const float *floors, vreal *maxima) {
    float c[4][16 * 16] __attribute__((aligned(64)));
    const long blocks = m16 / 16, steps = C / 32, kstride = m16 * 2 * (long)sizeof(lw_bf16);
    for (long b0 = 0; b0 < blocks; b0 += TK_AMX_BLOCKS * step) {
        const long b1 = b0 + TK_AMX_BLOCKS * step < blocks ? b0 + TK_AMX_BLOCKS * step : blocks;
        for (long t = t0; t < t1; t++) {
            const lw_bf16 *qt = q + t * 16 * C;
            _tile_loadd(1, qt, C * (long)sizeof(lw_bf16));
            if (steps > 1) _tile_loadd(2, qt + 32, C * (long)sizeof(lw_bf16));
            const long rows = n - t * 16 < 16 ? n - t * 16 : 16;
            float *vt = val + t * 16 * k;
            long *it = idx + t * 16 * k, blk = b0;
            const float *ft = floors ? floors + (t - t0) * 16 : NULL;
            vreal *mt = maxima ? maxima + (t - t0) * 32 : NULL;
            for (; blk + 3 * step < b1; blk += 4 * step) { /* four accumulators: the products overlap in the tile unit */
                TK_AMX_BLOCK(0, 3, 7, blk);
                TK_AMX_BLOCK(4, 3, 7, blk + step);
                TK_AMX_BLOCK(5, 3, 7, blk + 2 * step);
                TK_AMX_BLOCK(6, 3, 7, blk + 3 * step);
                _tile_stored(0, c[0], 64);
                _tile_stored(4, c[1], 64);
                _tile_stored(5, c[2], 64);
                _tile_stored(6, c[3], 64);
                for (int u = 0; u < 4; u++)
                    tk_amx_visit(c[u], bias, blk + u * step, rows, k, vt, it, ft, mt, (int)(((blk + u * step) / step) & 1));
            }
            for (; blk < b1; blk += step) {
                TK_AMX_BLOCK(0, 3, 7, blk);
                _tile_stored(0, c[0], 64);
                tk_amx_visit(c[0], bias, blk, rows, k, vt, it, ft, mt, (int)((blk / step) & 1));
            }
        }
    }
}

/* A thread's query tiles: a first pass over every TK_AMX_SAMPLE-th key block gives each row a floor (the k-th
 * largest of its 32 lane maxima, as tk_floor), then the scan over every block. The running k-th best alone let
 * the similarities of trained keys, smooth along the memory's raster order, insert most of what they passed:
 * 4x the product's own time on a DAVIS clip; the floor pass costs a quarter of the product. */
__attribute__((target("amx-tile,amx-bf16"))) static int tk_amx_tiles(const lw_bf16 *q, long n, long C,
                                                                     const lw_bf16 *keys, const float *bias,
                                                                     long m16, long k, float *val, long *idx,
                                                                     long t0, long t1) {
    tk_tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { /* 0, 4, 5, 6: 16 x 16 float products; 1, 2: query rows; 3, 7: key pairs */
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    const long tiles = t1 - t0;
    float *floors = malloc(sizeof(float) * 16 * tiles);
    vreal *maxima = aligned_alloc(64, sizeof(vreal) * 32 * tiles);
    if (!floors || !maxima) {
        free(floors);
        free(maxima);
        return -1;
    }
    for (long e = 0; e < 32 * tiles; e++) maxima[e] = vsplat((real)-INFINITY);
    _tile_loadconfig(&cfg);
    const int sampled = k <= TK_LANES && m16 / 16 >= 8 * TK_AMX_SAMPLE;
    if (sampled)
        tk_amx_pass(q, n, C, keys, bias, m16, k, val, idx, t0, t1, TK_AMX_SAMPLE, NULL, maxima);
    for (long r = 0; r < 16 * tiles; r++) floors[r] = sampled ? tk_kth_lane(maxima + 2 * r, k) : (real)-INFINITY;
    tk_amx_pass(q, n, C, keys, bias, m16, k, val, idx, t0, t1, 1, floors, NULL);
    _tile_release();
    free(floors);
    free(maxima);
    return 0;
}

int LW_FN(tk_matmul_amx)(const lw_bf16 *q, long n, long C, const lw_bf16 *keys, const float *bias, long m16, long k,
                         float *val, long *idx, int nthreads) {
    if (C % 32 || C > 64 || m16 % 16 || !tk_amx_permitted()) return -1;
    for (long e = 0; e < n * k; e++) {
        val[e] = -INFINITY;
        idx[e] = -1;
    }
    const long tiles = (n + 15) / 16, parts = nthreads < tiles ? nthreads : tiles;
    int failed = 0;
    /* a contiguous run of query tiles per thread: each brings the keys into its cache once per run */
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : failed)
    for (long p = 0; p < parts; p++)
        failed |= tk_amx_tiles(q, n, C, keys, bias, m16, k, val, idx, tiles * p / parts, tiles * (p + 1) / parts) != 0;
    return failed ? -1 : 0;
}
#endif
