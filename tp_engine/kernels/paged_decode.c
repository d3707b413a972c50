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

#include "attention_avx512.h"

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

#if HAVE_AVX512
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
        for (int64_t g = 0; g < nh; g++) store_row_##S(oh + (hc + g) * dim, acc[g], NV);       \
    }
#else
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
