/* What the CPU attention kernels share (paged_decode.c, paged_prefill.c): the key range a
 * query sees and, with AVX-512, rows of keys and values as float32 vectors, dot products, 16
 * sums at once, the softmax and the prefetch of a sequence's next blocks. */

#ifndef TP_ENGINE_ATTENTION_AVX512_H
#define TP_ENGINE_ATTENTION_AVX512_H

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "exp_approx.h"

static inline int64_t first_key(int64_t position, int64_t window) {
    return window > 0 && position - window + 1 > 0 ? position - window + 1 : 0;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1

/* One key or value row as NV vectors of 16 floats. float32 in order; bfloat16 from 512-bit
 * loads split into the even and the odd elements (a shift and a mask, no widening loads), so
 * vector 2c holds elements 32c + 2l and vector 2c + 1 elements 32c + 2l + 1 in its lane l.
 * A dot product does not care about the order; the values pass puts it back as it stores. */
static inline void row_f32(const float *p, __m512 *out, int nv) {
    for (int j = 0; j < nv; j++) out[j] = _mm512_loadu_ps(p + 16 * j);
}
static inline void row_bf16(const bf16 *p, __m512 *out, int nv) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    for (int c = 0; c < nv / 2; c++) {
        const __m512i x = _mm512_loadu_si512((const void *)(p + 32 * c));
        out[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        out[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    }
}
static inline int64_t dim_bf16(int64_t j, int64_t l) { return 32 * (j >> 1) + 2 * l + (j & 1); }

/* A row of sums (NV vectors in the row layout above) stored as one output row of T. */
static inline void store_row_f32(float *o, const __m512 *acc, int nv) {
    for (int j = 0; j < nv; j++) _mm512_storeu_ps(o + 16 * j, acc[j]);
}
static inline void store_row_bf16(bf16 *o, const __m512 *acc, int nv) {
    float done[16 * nv];
    for (int j = 0; j < nv; j++) _mm512_storeu_ps(done + 16 * j, acc[j]);
    for (int j = 0; j < nv; j++)
        for (int l = 0; l < 16; l++) store_bf16(o, dim_bf16(j, l), done[16 * j + l]);
}

/* q . k for one row, q given as NV vectors in the row layout above. */
static inline __m512 dot_f32(const __m512 *q, const float *k, int nv) {
    __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
    for (int j = 1; j < nv; j++) acc = _mm512_fmadd_ps(q[j], _mm512_loadu_ps(k + 16 * j), acc);
    return acc;
}
#if defined(__AVX512BF16__)
/* AVX512-BF16 multiplies pairs of bfloat16 into float32 sums directly: q is kept in bfloat16
 * for it, and the products are exact in float32 as in the widening path. */
typedef __m512bh qrow_bf16;
static inline void qload_bf16(const bf16 *p, __m512bh *out, int nv) {
    for (int c = 0; c < nv / 2; c++)
        out[c] = (__m512bh)_mm512_loadu_si512((const void *)(p + 32 * c));
}
static inline __m512 dot_bf16(const __m512bh *q, const bf16 *k, int nv) {
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < nv / 2; c++)
        acc = _mm512_dpbf16_ps(acc, q[c], (__m512bh)_mm512_loadu_si512((const void *)(k + 32 * c)));
    return acc;
}
#else
typedef __m512 qrow_bf16;
static inline void qload_bf16(const bf16 *p, __m512 *out, int nv) { row_bf16(p, out, nv); }
static inline __m512 dot_bf16(const __m512 *q, const bf16 *k, int nv) {
    __m512 kv[nv];
    row_bf16(k, kv, nv);
    __m512 acc = _mm512_mul_ps(q[0], kv[0]);
    for (int j = 1; j < nv; j++) acc = _mm512_fmadd_ps(q[j], kv[j], acc);
    return acc;
}
#endif
typedef __m512 qrow_f32;
static inline void qload_f32(const float *p, __m512 *out, int nv) { row_f32(p, out, nv); }

/* The horizontal sums of 16 vectors as one: lane l holds the sum of v[SUM16_SLOT[l]]. Four
 * rounds of pairwise folds (30 shuffles and 15 adds for 16 sums, against 16 full reductions). */
static const int SUM16_SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
static inline __m512 sum16(const __m512 *v) {
    __m512 w[8], u[4], s[2];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44),
                             _mm512_shuffle_f32x4(v[i], v[i + 8], 0xee));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88),
                             _mm512_shuffle_f32x4(w[i], w[i + 4], 0xdd));
    for (int i = 0; i < 2; i++)
        s[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], 0x44),
                             _mm512_shuffle_ps(u[i], u[i + 2], 0xee));
    return _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xdd));
}

/* exp_approx on 16 lanes, the same operations in the same order. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.8f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(k, _mm512_set1_ps(0.693145752f))),
                                   _mm512_mul_ps(k, _mm512_set1_ps(1.42860677e-6f)));
    static const float c[] = {0.00833336823f, 0.0416666418f, 0.166666672f, 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps(0.00138878601f);
    for (int i = 0; i < 6; i++) p = _mm512_add_ps(_mm512_set1_ps(c[i]), _mm512_mul_ps(r, p));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k),
                                                         _mm512_set1_epi32(126)), 23);
    return _mm512_mul_ps(_mm512_mul_ps(p, _mm512_castsi512_ps(e)), _mm512_set1_ps(2.0f));
}

/* softmax() on 16 lanes at a time. */
static inline void softmax_avx(float *row, int64_t lo, int64_t pos) {
    float *x = row + lo;
    const int64_t n = pos - lo + 1;
    __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, x + i));
    }
    const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), peak));
        _mm512_mask_storeu_ps(x + i, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inverse));
    }
}
#define SOFTMAX softmax_avx

/* The rows of one KV head in the blocks PREFETCH_BLOCKS ahead of block b (all of them up to
 * there at the first block), fetched while block b is computed: a sequence's blocks lie
 * anywhere in the cache, so the hardware prefetcher starts cold at each one, and a block takes
 * less time to compute than to come from memory. */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2
#endif
static inline void prefetch_ahead(const char *base, const int64_t *table, int64_t b,
                                  int64_t first, int64_t last, int64_t block_bytes) {
    const int64_t stop = b + PREFETCH_BLOCKS < last ? b + PREFETCH_BLOCKS : last;
    for (int64_t a = b == first ? b + 1 : stop; a <= stop && a > b; a++)
        for (int64_t off = 0; off < block_bytes; off += 64)
            _mm_prefetch(base + table[a] * block_bytes + off, _MM_HINT_T0);
}
#else
#define HAVE_AVX512 0
#endif

#endif
