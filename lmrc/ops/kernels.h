/* What the native kernels share: the floating type they are built for and vectors of it.
 *
 * Every .c file of lmrc/ops is compiled into one library, once with -DLW_REAL=float -DLW_SUFFIX=_f32 and once with
 * -DLW_REAL=double -DLW_SUFFIX=_f64; LW_FN(name) gives each exported function its suffix. One library is built per
 * instruction set (lmrc/ops/_native.py: ISA_VARIANTS), each with its -m flags and its vector width
 * -DLW_VBYTES=16 / 32 / 64 (generic / AVX2 / AVX-512); the code is the same, written with GCC vector extensions.
 */
#ifndef LMRC_KERNELS_H
#define LMRC_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef LW_REAL
#define LW_REAL float
#endif
#ifndef LW_SUFFIX
#define LW_SUFFIX _f32
#endif
#define LW_CAT2(a, b) a##b
#define LW_CAT(a, b) LW_CAT2(a, b)
#define LW_FN(name) LW_CAT(name, LW_SUFFIX)

typedef LW_REAL real;

#ifndef LW_VBYTES
#define LW_VBYTES 32
#endif
typedef real vreal __attribute__((vector_size(LW_VBYTES)));
typedef __typeof__((vreal){0} < (vreal){0}) vmask; /* signed integer lanes of the same width */
#define VL ((long)(LW_VBYTES / sizeof(real)))

static inline vreal vload(const real *p) {
    vreal v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(real *p, vreal v) { memcpy(p, &v, sizeof v); }
static inline vreal vsplat(real s) { return (vreal){0} + s; }
static inline vreal vsel(vmask m, vreal a, vreal b) { return (vreal)((m & (vmask)a) | (~m & (vmask)b)); }
static inline vreal vmax(vreal a, vreal b) { return vsel(a > b, a, b); }
static inline vreal vmin(vreal a, vreal b) { return vsel(a < b, a, b); }

/* single-precision exp for the float build: the double one would round-trip every element */
#define lw_exp(x) _Generic((x), float: expf, default: exp)(x)

/* exp of x <= 0 (-inf gives 0). float: Cephes expf polynomial (within 2 ulp); double: libm per lane. */
static inline vreal vexp(vreal x) {
    if (sizeof(real) == sizeof(float)) {
        vmask keep = x > vsplat((real)-87.0);
        x = vsel(keep, x, vsplat((real)-87.0));
        vreal t = x * (real)1.44269504088896341 + (real)12582912.0; /* round to nearest: 1.5 * 2^23 */
        vreal n = t - (real)12582912.0;
        vreal r = x - n * (real)0.693359375;
        r = r - n * (real)-2.12194440e-4;
        vreal p = vsplat((real)1.9875691500e-4);
        p = p * r + (real)1.3981999507e-3;
        p = p * r + (real)8.3334519073e-3;
        p = p * r + (real)4.1665795894e-2;
        p = p * r + (real)1.6666665459e-1;
        p = p * r + (real)5.0000001201e-1;
        p = p * (r * r) + r + (real)1;
        vmask e = (__builtin_convertvector(n, vmask) + 127) << 23;
        return (vreal)((vmask)(p * (vreal)e) & keep);
    }
    vreal y;
    for (int l = 0; l < VL; l++) y[l] = exp(x[l]);
    return y;
}

/* sigmoid(z) from e^-|z| (no overflow). */
static inline vreal vsigmoid(vreal z) {
    vreal az = vsel(z < vsplat(0), -z, z), e = vexp(-az), p = 1 / (1 + e);
    return vsel(z < vsplat(0), e * p, p);
}

/* CALL(n) with n = m as a compile-time constant, for m in 1..8 (below 1: 1): the inner loops over n vectors are
 * unrolled and their accumulators stay in registers. */
#define LW_UNROLL8(m, CALL)             \
    switch (m) {                        \
    case 8: CALL(8); break;             \
    case 7: CALL(7); break;             \
    case 6: CALL(6); break;             \
    case 5: CALL(5); break;             \
    case 4: CALL(4); break;             \
    case 3: CALL(3); break;             \
    case 2: CALL(2); break;             \
    default: CALL(1); break;            \
    }


/* Denormal floats (below 1.2e-38) flushed to zero inside a kernel's parallel region, the caller's setting restored
 * when the region's scope ends. Softmax weights of far-off taps underflow into that range, and the CPU takes a
 * microcode assist for each: with trained weights on flat image regions the local reads ran 2x slower. A
 * denormal weight is zero to float precision in every sum it enters. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
static inline unsigned lw_denormals_off(void) {
    const unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u); /* FTZ and DAZ */
    return saved;
}
static inline void lw_restore_csr(unsigned *saved) { _mm_setcsr(*saved); }
#define LW_DENORMALS_TO_ZERO \
    unsigned lw_saved_csr __attribute__((cleanup(lw_restore_csr), unused)) = lw_denormals_off()
#else
#define LW_DENORMALS_TO_ZERO do { } while (0)
#endif

#ifdef LW_BF16_INPUTS /* float builds: inputs stored as bfloat16 (bf16 autocast), read as float */
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
typedef unsigned short lw_bf16; /* the upper half of a float's bits */
typedef unsigned short vhalf __attribute__((vector_size(LW_VBYTES / 2)));

static inline vreal vload_bf16(const lw_bf16 *p) {
#if defined(__AVX512F__) && LW_VBYTES == 64 /* one widening load (GCC splits the generic one into 256-bit halves) */
    return (vreal)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__) && LW_VBYTES == 32
    return (vreal)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    vhalf h;
    memcpy(&h, p, sizeof h);
    return (vreal)(__builtin_convertvector(h, vmask) << 16);
#endif
}
static inline real ld_bf16(const lw_bf16 *p) {
    unsigned int u = (unsigned int)*p << 16;
    real f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#endif

/* float -> bfloat16, rounding to nearest even as PyTorch does; NaN stays NaN. Branch-free, so loops vectorise. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* relu(r) stored at element e of a float (f32 = 1) or bfloat16 array, rounded to nearest even as PyTorch rounds
 * (f32_to_bf16 on every lane; a vector of floats at once, where NaN cannot occur after the ReLU). */
static inline void vstore_relu(void *p, long e, vreal r, int f32) {
    r = vmax(r, vsplat(0));
    if (f32) {
        vstore((real *)p + e, r);
        return;
    }
    if (sizeof(real) != sizeof(float)) { /* double build */
        for (int l = 0; l < VL; l++) ((uint16_t *)p)[e + l] = f32_to_bf16((float)r[l]);
        return;
    }
    typedef uint32_t vu32 __attribute__((vector_size(LW_VBYTES * sizeof(float) / sizeof(real))));
    typedef uint16_t vu16 __attribute__((vector_size(LW_VBYTES * sizeof(float) / sizeof(real) / 2)));
    vu32 u;
    memcpy(&u, &r, sizeof u);
    const vu16 h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, vu16);
    memcpy((uint16_t *)p + e, &h, sizeof h);
}

#endif
