/* Row-wise top-k for the global memory read with STCN's top-k (eq. 2 over the k best similarities of a query).
 *
 * For each row of a contiguous rows x cols matrix: the k largest entries, sorted descending, and their column
 * indices. A similarity row has thousands of entries and only k survive, so the running k-th best is a threshold
 * that almost every vector of entries fails at once; the few that pass are inserted into a sorted list of k.
 * About 10x faster than a general selection here.
 */
#include <stdlib.h>

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

static void tk_row(const real *row, long cols, long k, real *val, long *idx) {
    for (long j = 0; j < k; j++) { /* the first k entries, insertion-sorted */
        long p = j;
        while (p > 0 && val[p - 1] < row[j]) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
            p--;
        }
        val[p] = row[j];
        idx[p] = j;
    }
    real threshold = val[k - 1];
    long j = k;
    for (; j + 2 * VL <= cols; j += 2 * VL) {
        /* lane-wise max of two vectors, then one test of every lane against the threshold */
        vmask above = vmax(vload(row + j), vload(row + j + VL)) > vsplat(threshold);
        long pass = 0;
        for (long l = 0; l < VL; l++) pass |= above[l];
        if (!pass) continue;
        for (long l = 0; l < 2 * VL; l++) {
            if (row[j + l] > threshold) {
                tk_insert(val, idx, k, row[j + l], j + l);
                threshold = val[k - 1];
            }
        }
    }
    for (; j < cols; j++) {
        if (row[j] > threshold) {
            tk_insert(val, idx, k, row[j], j);
            threshold = val[k - 1];
        }
    }
}

/* x rows x cols (contiguous), 1 <= k <= cols -> val rows x k, idx rows x k (int64), each row sorted descending */
void LW_FN(tk_rows)(const real *x, long rows, long cols, long k, real *val, long *idx, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) tk_row(x + r * cols, cols, k, val + r * k, idx + r * k);
}

#ifdef LW_BF16_INPUTS
/* tk_rows of bfloat16 rows (the global read's similarities under bf16 autocast): each row widened into a float
 * scratch row that stays in cache, then scanned as above; val is float (exactly the bf16 values). */
void LW_FN(tk_rows_bf16)(const lw_bf16 *x, long rows, long cols, long k, real *val, long *idx, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        real *row = malloc((size_t)cols * sizeof(real));
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!row) { /* out of memory: the caller sees index -1 */
                idx[r * k] = -1;
                continue;
            }
            const lw_bf16 *src = x + r * cols;
            long j = 0;
            for (; j + VL <= cols; j += VL) vstore(row + j, vload_bf16(src + j));
            for (; j < cols; j++) row[j] = ld_bf16(src + j);
            tk_row(row, cols, k, val + r * k, idx + r * k);
        }
        free(row);
    }
}
#endif
