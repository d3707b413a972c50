/* Prefill attention over the paged KV cache, causal, reading each sequence's blocks where
 * they lie (the keys and values of the new tokens are in the cache already).
 *
 * torch's path pads every sequence of a group to the longest query and context and runs one
 * masked SDPA: on SmolLM2's prompts of 8 to 160 tokens most of that work is padding or masked
 * away, and the blocks are gathered into a copy first. Here each task is one sequence, one run
 * of query heads that read the same KV head, and a tile of up to 16 query positions: the tile's
 * rows (position x head) face the keys they see, 16 keys at a time out of registers as in the
 * decode kernel, then one softmax a row and the values. Keys a row does not see are neither
 * read for it nor weighed.
 *
 * Same cache layout and head runs as paged_decode.c; AVX-512 and head sizes 64 and 128 only
 * (prefill_supported), torch's SDPA serves the rest. */

#include <stdint.h>
#include <stdlib.h>

#include "attention_avx512.h"

#define TILE 16

int64_t prefill_supported(int64_t dim) { return HAVE_AVX512 && (dim == 64 || dim == 128); }

#if HAVE_AVX512

/* One task: rows [a * count + g] for position p0 + a (a < tl) and head h0 + g. sc holds each
 * row's weights for keys [lo_tile, p_last], zero where the row does not see the key. */
#define PREFILL_TASK(S, T, NV, H)                                                               \
    const int64_t rows = tl * count, lo_tile = first_key(p0, window), p_last = p0 + tl - 1;     \
    const int64_t context = p_last - lo_tile + 1;                                               \
    qrow_##S qv[rows][NV];                                                                      \
    for (int64_t a = 0; a < tl; a++)                                                            \
        for (int64_t g = 0; g < count; g++)                                                     \
            qload_##S(q + (q_first + a) * q_stride + (h0 + g) * dim, qv[a * count + g], NV);    \
    float *sc = malloc(sizeof(float) * rows * context);                                         \
    const __m512 scaled = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();                    \
    for (int64_t b = lo_tile / block_size; b <= p_last / block_size; b++) {                     \
        const T *kb = keys + table[b] * block_size * dim;                                       \
        const int64_t end = p_last < (b + 1) * block_size ? p_last : (b + 1) * block_size - 1;  \
        for (int64_t t0 = lo_tile > b * block_size ? lo_tile : b * block_size; t0 <= end;       \
             t0 += 16) {                                                                        \
            const int64_t m = end - t0 + 1 < 16 ? end - t0 + 1 : 16;                            \
            const T *k0 = kb + (t0 - b * block_size) * dim;                                     \
            for (int64_t a = 0; a < tl; a++) {                                                  \
                if (t0 > p0 + a || t0 + m <= first_key(p0 + a, window)) continue;               \
                for (int64_t g = 0; g < count; g++) {                                           \
                    __m512 acc[16];                                                             \
                    _Pragma("GCC unroll 16")                                                    \
                    for (int j = 0; j < 16; j++)                                                \
                        acc[SUM16_SLOT[j]] = j < m ? dot_##S(qv[a * count + g], k0 + j * dim, NV)\
                                                   : zero;                                      \
                    _mm512_mask_storeu_ps(sc + (a * count + g) * context + t0 - lo_tile,        \
                                          (__mmask16)((1u << m) - 1),                           \
                                          _mm512_mul_ps(sum16(acc), scaled));                   \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    for (int64_t a = 0; a < tl; a++) {                                                          \
        const int64_t lo = first_key(p0 + a, window) - lo_tile, hi = p0 + a - lo_tile;         \
        for (int64_t g = 0; g < count; g++) {                                                   \
            float *row = sc + (a * count + g) * context;                                        \
            softmax_avx(row, lo, hi);                                                           \
            for (int64_t t = 0; t < lo; t++) row[t] = 0.0f;                                     \
            for (int64_t t = hi + 1; t < context; t++) row[t] = 0.0f;                           \
        }                                                                                       \
    }                                                                                           \
    for (int64_t r0 = 0; r0 < rows; r0 += (H)) {                                                \
        const int64_t nr = rows - r0 < (H) ? rows - r0 : (H);                                   \
        /* rows go by position: the group's keys run from its first row's to its last's */    \
        const int64_t lo = first_key(p0 + r0 / count, window);                                  \
        const int64_t hi = p0 + (r0 + nr - 1) / count;                                          \
        __m512 acc[H][NV];                                                                      \
        for (int64_t h = 0; h < (H); h++)                                                       \
            for (int64_t j = 0; j < (NV); j++) acc[h][j] = _mm512_setzero_ps();                 \
        for (int64_t b = lo / block_size; b <= hi / block_size; b++) {                          \
            const T *vb = values + table[b] * block_size * dim;                                 \
            const int64_t end = hi < (b + 1) * block_size ? hi : (b + 1) * block_size - 1;      \
            for (int64_t t = lo > b * block_size ? lo : b * block_size; t <= end; t++) {        \
                __m512 vv[NV];                                                                  \
                row_##S(vb + (t - b * block_size) * dim, vv, NV);                               \
                for (int64_t h = 0; h < (H); h++) {                                             \
                    if (h >= nr) break;                                                         \
                    const __m512 p = _mm512_set1_ps(sc[(r0 + h) * context + t - lo_tile]);      \
                    for (int64_t j = 0; j < (NV); j++)                                          \
                        acc[h][j] = _mm512_fmadd_ps(p, vv[j], acc[h][j]);                       \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int64_t h = 0; h < nr; h++) {                                                      \
            const int64_t a = (r0 + h) / count, g = (r0 + h) % count;                           \
            store_row_##S(out + (q_first + a) * heads * dim + (h0 + g) * dim, acc[h], NV);      \
        }                                                                                       \
    }                                                                                           \
    free(sc);

/* q: [tokens, heads, dim] rows q_stride apart, each sequence's tokens together, in order;
 * starts[i]: the tokens of sequence i already in the cache before its query_lens[i] new ones;
 * out: [tokens, heads * dim]. */
#define DEFINE_PREFILL(S, T)                                                                    \
void prefill_attention_##S(const T *q, int64_t q_stride, const T *cache, int64_t kv_heads,    \
                           int64_t head_stride, const int64_t *tables, int64_t width,          \
                           const int64_t *starts, const int64_t *query_lens, int64_t n,        \
                           int64_t heads, int64_t dim,                                         \
                           int64_t block_size, const int64_t *run_first,                       \
                           const int64_t *run_count, const int64_t *run_kv, int64_t runs,      \
                           int64_t window, float scale, T *out) {                              \
    int64_t *first = malloc(sizeof(int64_t) * (n + 1)), tiles = 0;                              \
    first[0] = 0;                                                                               \
    for (int64_t i = 0; i < n; i++) {                                                           \
        first[i + 1] = first[i] + query_lens[i];                                                \
        const int64_t t = (query_lens[i] + TILE - 1) / TILE;                                    \
        tiles = t > tiles ? t : tiles;                                                          \
    }                                                                                           \
    _Pragma("omp parallel for collapse(3) schedule(dynamic, 1)")                                \
    for (int64_t i = 0; i < n; i++)                                                             \
        for (int64_t r = 0; r < runs; r++)                                                      \
            for (int64_t tile = 0; tile < tiles; tile++) {                                      \
                if (tile * TILE >= query_lens[i]) continue;                                     \
                const int64_t *table = tables + i * width;                                      \
                const int64_t h0 = run_first[r], count = run_count[r];                          \
                const T *keys = cache + run_kv[r] * head_stride;                                \
                const T *values = cache + (kv_heads + run_kv[r]) * head_stride;                 \
                const int64_t q_first = first[i] + tile * TILE, p0 = starts[i] + tile * TILE;   \
                const int64_t left = query_lens[i] - tile * TILE;                               \
                const int64_t tl = left < TILE ? left : TILE;                                   \
                if (dim == 64) { PREFILL_TASK(S, T, 4, 4) } else { PREFILL_TASK(S, T, 8, 2) }   \
            }                                                                                   \
    free(first);                                                                                \
}

DEFINE_PREFILL(f32, float)
DEFINE_PREFILL(bf16, bf16)

#endif
