/* Decode attention over the paged KV cache, reading each sequence's blocks where they lie.
 *
 * The torch path gathers every sequence's blocks into a padded copy before two batched
 * matmuls: the cache is read, written and read again. These two loops read each key and value
 * once, straight from its block, and the first ends each head with its softmax, on scores of
 * [sequences, heads, width * block_size] in float32.
 *
 * Cache of one layer: [2][kv_heads][num_blocks * block_size][dim], keys then values; a
 * sequence's token t lives in row tables[t / block_size] * block_size + t % block_size. Query
 * heads come in runs that read one KV head (run_first, run_count, run_kv); the rows of one
 * sequence and KV head stay in cache while each head of the run reads them. Keys outside
 * [first_key, position] are neither read nor written: their scores are left undefined.
 *
 * Built at run time by tp_engine/kernels/build.py with -fopenmp, linked to the OpenMP runtime
 * torch already loaded, so its threads are torch's (and bound where torch's are). The head
 * size is made a constant for the common sizes, so the compiler unrolls the row loops. */

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "exp_approx.h"

static inline int64_t first_key(int64_t position, int64_t window) {
    return window > 0 && position - window + 1 > 0 ? position - window + 1 : 0;
}

/* A run of heads of one sequence, one head at a time: row[g][t] = q_g . k_t for t in [lo, pos]. */
#define SCORE_RUN(T, LOAD)                                                                     \
    for (int64_t g = 0; g < count; g++) {                                                      \
        float qv[dim];                                                                         \
        for (int64_t d = 0; d < dim; d++) qv[d] = LOAD(qh + g * dim, d) * scale;               \
        for (int64_t t = lo; t <= pos; t++) {                                                  \
            const T *k = base + (table[t / block_size] * block_size + t % block_size) * dim;   \
            float acc = 0.0f;                                                                  \
            _Pragma("omp simd reduction(+:acc)")                                               \
            for (int64_t d = 0; d < dim; d++) acc += qv[d] * LOAD(k, d);                       \
            row[g * context + t] = acc;                                                        \
        }                                                                                      \
    }

/* A run of heads of one sequence, one head at a time: out_g = sum over t in [lo, pos] of
 * row[g][t] v_t. */
#define VALUE_RUN(T, LOAD, STORE)                                                              \
    for (int64_t g = 0; g < count; g++) {                                                      \
        float acc[dim];                                                                        \
        for (int64_t d = 0; d < dim; d++) acc[d] = 0.0f;                                       \
        for (int64_t t = lo; t <= pos; t++) {                                                  \
            const T *v = base + (table[t / block_size] * block_size + t % block_size) * dim;   \
            const float p = row[g * context + t];                                              \
            _Pragma("omp simd")                                                                \
            for (int64_t d = 0; d < dim; d++) acc[d] += p * LOAD(v, d);                        \
        }                                                                                      \
        for (int64_t d = 0; d < dim; d++) STORE(oh + g * dim, d, acc[d]);                      \
    }

/* row[lo..pos] = softmax(row[lo..pos]); the rest of the row is never read. */
static inline void softmax(float *row, int64_t lo, int64_t pos) {
    float top = row[lo];
    for (int64_t t = lo + 1; t <= pos; t++) top = row[t] > top ? row[t] : top;
    float sum = 0.0f;
    _Pragma("omp simd reduction(+:sum)")
    for (int64_t t = lo; t <= pos; t++) {
        row[t] = exp_approx(row[t] - top);
        sum += row[t];
    }
    const float inverse = 1.0f / sum;
    _Pragma("omp simd")
    for (int64_t t = lo; t <= pos; t++) row[t] *= inverse;
}

#if defined(__AVX512F__)
#include <immintrin.h>

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
static inline int64_t dim_f32(int64_t j, int64_t l) { return 16 * j + l; }
static inline int64_t dim_bf16(int64_t j, int64_t l) { return 32 * (j >> 1) + 2 * l + (j & 1); }

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

/* Keys [lo, pos] of one sequence and KV head, block by block and 16 at a time: each head of
 * the run takes its 16 scores out of registers in one sum16. */
#define AVX_SCORES(S, T, NV, H)                                                                 \
    qrow_##S qv[count][NV];                                                                    \
    for (int64_t g = 0; g < count; g++) qload_##S(qh + g * dim, qv[g], NV);                   \
    const __m512 scaled = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();                  \
    for (int64_t b = lo / block_size; b <= pos / block_size; b++) {                            \
        const T *kb = base + table[b] * block_size * dim;                                      \
        prefetch_ahead((const char *)base, table, b, lo / block_size, pos / block_size,       \
                       block_size * dim * (int64_t)sizeof(T));                                 \
        const int64_t end = pos < (b + 1) * block_size ? pos : (b + 1) * block_size - 1;       \
        for (int64_t t0 = lo > b * block_size ? lo : b * block_size; t0 <= end; t0 += 16) {   \
            const int64_t m = end - t0 + 1 < 16 ? end - t0 + 1 : 16;                           \
            const T *k0 = kb + (t0 - b * block_size) * dim;                                    \
            for (int64_t g = 0; g < count; g++) {                                              \
                __m512 acc[16];                                                                \
                _Pragma("GCC unroll 16")                                                       \
                for (int j = 0; j < 16; j++)                                                   \
                    acc[SUM16_SLOT[j]] = j < m ? dot_##S(qv[g], k0 + j * dim, NV) : zero;      \
                _mm512_mask_storeu_ps(row + g * context + t0, (__mmask16)((1u << m) - 1),      \
                                      _mm512_mul_ps(sum16(acc), scaled));                      \
            }                                                                                  \
        }                                                                                      \
    }

/* Values [lo, pos] of one sequence and KV head, each row loaded once for H heads of the run,
 * their sums held in registers. */
#define AVX_VALUES(S, T, NV, H)                                                                 \
    for (int64_t hc = 0; hc < count; hc += (H)) {                                              \
        const int64_t nh = count - hc < (H) ? count - hc : (H);                                \
        __m512 acc[H][NV];                                                                     \
        for (int64_t g = 0; g < (H); g++)                                                      \
            for (int64_t j = 0; j < (NV); j++) acc[g][j] = _mm512_setzero_ps();                \
        for (int64_t b = lo / block_size; b <= pos / block_size; b++) {                        \
            const T *vb = base + table[b] * block_size * dim;                                  \
            if (hc == 0)                                                                       \
                prefetch_ahead((const char *)base, table, b, lo / block_size, pos / block_size,\
                               block_size * dim * (int64_t)sizeof(T));                         \
            const int64_t end = pos < (b + 1) * block_size ? pos : (b + 1) * block_size - 1;   \
            for (int64_t t = lo > b * block_size ? lo : b * block_size; t <= end; t++) {      \
                __m512 vv[NV];                                                                 \
                row_##S(vb + (t - b * block_size) * dim, vv, NV);                              \
                for (int64_t g = 0; g < (H); g++) {                                            \
                    if (g >= nh) break;                                                        \
                    const __m512 p = _mm512_set1_ps(row[(hc + g) * context + t]);              \
                    for (int64_t j = 0; j < (NV); j++)                                         \
                        acc[g][j] = _mm512_fmadd_ps(p, vv[j], acc[g][j]);                      \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int64_t g = 0; g < nh; g++) {                                                     \
            float done[16 * (NV)];                                                             \
            for (int64_t j = 0; j < (NV); j++) _mm512_storeu_ps(done + 16 * j, acc[g][j]);     \
            for (int64_t j = 0; j < (NV); j++)                                                 \
                for (int64_t l = 0; l < 16; l++)                                               \
                    store_##S(oh + (hc + g) * dim, dim_##S(j, l), done[16 * j + l]);           \
        }                                                                                      \
    }
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#define SOFTMAX softmax
#endif

#define FOR_EACH_RUN                                                                           \
    const int64_t context = width * block_size;                                                \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 4)")                               \
    for (int64_t i = 0; i < n; i++)                                                            \
        for (int64_t r = 0; r < runs; r++)

#define RUN_SETUP                                                                              \
    const int64_t pos = positions[i], lo = first_key(pos, window);                             \
    const int64_t *table = tables + i * width;                                                 \
    const int64_t h0 = run_first[r], count = run_count[r]

#if HAVE_AVX512
#define FAST(WHAT, S, T)                                                                       \
    if (dim == 64) { WHAT(S, T, 4, 4) } else if (dim == 128) { WHAT(S, T, 8, 2) } else
#else
#define FAST(WHAT, S, T)
#endif

#define DEFINE_KERNELS(S, T, LOAD, STORE)                                                      \
void decode_probs_##S(const T *q, int64_t q_stride, const T *keys, int64_t head_stride,       \
                      const int64_t *tables, int64_t width, const int64_t *positions,          \
                      int64_t n, int64_t heads, int64_t dim, int64_t block_size,               \
                      const int64_t *run_first, const int64_t *run_count,                      \
                      const int64_t *run_kv, int64_t runs, int64_t window, float scale,        \
                      float *scores) {                                                         \
    FOR_EACH_RUN {                                                                             \
        RUN_SETUP;                                                                             \
        const T *base = keys + run_kv[r] * head_stride;                                        \
        const T *qh = q + i * q_stride + h0 * dim;                                             \
        float *row = scores + (i * heads + h0) * context;                                      \
        FAST(AVX_SCORES, S, T) { SCORE_RUN(T, LOAD) }                                          \
        for (int64_t g = 0; g < count; g++) SOFTMAX(row + g * context, lo, pos);                 \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void decode_values_##S(const float *probs, const T *values, int64_t head_stride,               \
                       const int64_t *tables, int64_t width, const int64_t *positions,         \
                       int64_t n, int64_t heads, int64_t dim, int64_t block_size,              \
                       const int64_t *run_first, const int64_t *run_count,                     \
                       const int64_t *run_kv, int64_t runs, int64_t window, T *out) {          \
    FOR_EACH_RUN {                                                                             \
        RUN_SETUP;                                                                             \
        const T *base = values + run_kv[r] * head_stride;                                      \
        const float *row = probs + (i * heads + h0) * context;                                 \
        T *oh = out + (i * heads + h0) * dim;                                                  \
        FAST(AVX_VALUES, S, T) { VALUE_RUN(T, LOAD, STORE) }                                   \
    }                                                                                          \
}

DEFINE_KERNELS(f32, float, load_f32, store_f32)
DEFINE_KERNELS(bf16, bf16, load_bf16, store_bf16)
