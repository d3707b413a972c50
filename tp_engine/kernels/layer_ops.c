/* The small operations of a decoder layer, one pass over memory each: RMSNorm with the residual
 * add before it, SiLU(gate) * up, and rotary embeddings with the write of keys and values into
 * the paged cache.
 *
 * torch runs each of these as several ops, each reading and writing the whole activation (in
 * bfloat16 rounding in between; RMSNorm alone is eight). These loops round at the same points,
 * so they give torch's values except where a float32 sum of squares, or the exponential,
 * differs in its last bit. The rotary is the torch expression exactly (no fused multiply-add:
 * -std=c11 and -ffp-contract=off). */

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "exp_approx.h"

/* residual (if given) += x, rounded; out = weight * round(r / rms(r)); out may be x. */
#define RMS_NORM(T, LOAD, STORE, ROUND)                                                        \
    _Pragma("omp parallel for schedule(static) if (n * hidden > 32768)")                       \
    for (int64_t i = 0; i < n; i++) {                                                          \
        const T *xi = x + i * hidden;                                                          \
        T *oi = out + i * hidden;                                                              \
        float row[hidden];                                                                     \
        if (residual != NULL) {                                                                \
            T *ri = residual + i * hidden;                                                     \
            _Pragma("omp simd")                                                                \
            for (int64_t d = 0; d < hidden; d++) {                                             \
                row[d] = ROUND(LOAD(ri, d) + LOAD(xi, d));                                     \
                STORE(ri, d, row[d]);                                                          \
            }                                                                                  \
        } else {                                                                               \
            for (int64_t d = 0; d < hidden; d++) row[d] = LOAD(xi, d);                         \
        }                                                                                      \
        float squares = 0.0f;                                                                  \
        _Pragma("omp simd reduction(+:squares)")                                               \
        for (int64_t d = 0; d < hidden; d++) squares += row[d] * row[d];                       \
        float inverse = 1.0f / sqrtf(squares / (float)hidden + eps);                           \
        _Pragma("omp simd")                                                                    \
        for (int64_t d = 0; d < hidden; d++)                                                   \
            STORE(oi, d, LOAD(weight, d) * ROUND(row[d] * inverse));                           \
    }

/* out[i] = round(silu(gate[i])) * up[i], rounded: gate and up side by side in each row. */
#define SILU_MUL(T, LOAD, STORE, ROUND)                                                        \
    _Pragma("omp parallel for schedule(static) if (n * size > 32768)")                         \
    for (int64_t i = 0; i < n; i++) {                                                          \
        const T *gate = gate_up + i * stride, *up = gate + size;                               \
        T *oi = out + i * size;                                                                \
        _Pragma("omp simd")                                                                    \
        for (int64_t d = 0; d < size; d++) {                                                   \
            float g = LOAD(gate, d);                                                           \
            STORE(oi, d, ROUND(g / (1.0f + exp_approx(-g))) * LOAD(up, d));                    \
        }                                                                                      \
    }

static inline float keep(float x) { return x; }
static inline float round_bf16(float x) { return from_bf16(to_bf16(x)); }

#define DEFINE_NORM_AND_SILU(S, T, LOAD, STORE, ROUND)                                         \
void rms_norm_##S(const T *x, T *residual, const T *weight, float eps, T *out, int64_t n,      \
                  int64_t hidden) {                                                            \
    RMS_NORM(T, LOAD, STORE, ROUND)                                                            \
}                                                                                              \
void silu_mul_##S(const T *gate_up, int64_t stride, T *out, int64_t n, int64_t size) {         \
    SILU_MUL(T, LOAD, STORE, ROUND)                                                            \
}

DEFINE_NORM_AND_SILU(f32, float, load_f32, store_f32, keep)
DEFINE_NORM_AND_SILU(bf16, bf16, load_bf16, store_bf16, round_bf16)

/* Rotate the query and key heads of each row of qkv in place (rotate-half layout, the cos
 * and negated-first-half sin tables in float32, by position), then copy the keys and values
 * of row i into cache slot slots[i]: cache is [2][kv_heads][slots][dim]. */
#define ROTARY_KV(T, LOAD, STORE, ROUND)                                                       \
    _Pragma("omp parallel for schedule(static) if (n * (heads + kv_heads) * dim > 65536)")     \
    for (int64_t i = 0; i < n; i++) {                                                          \
        T *row = qkv + i * stride;                                                             \
        const float *c = cos_table + positions[i] * dim, *s = sin_table + positions[i] * dim;  \
        int64_t half = dim / 2;                                                                \
        float x[dim];                                                                          \
        for (int64_t h = 0; h < heads + kv_heads; h++) {                                       \
            T *head = row + h * dim;                                                           \
            for (int64_t d = 0; d < dim; d++) x[d] = LOAD(head, d);                            \
            for (int64_t d = 0; d < dim; d++) {                                                \
                float a = ROUND(x[d] * ROUND(c[d]));                                           \
                float b = ROUND(x[d < half ? d + half : d - half] * ROUND(s[d]));              \
                STORE(head, d, a + b);                                                         \
            }                                                                                  \
        }                                                                                      \
        for (int64_t h = 0; h < kv_heads; h++) {                                               \
            T *k = cache + (h * cache_slots + slots[i]) * dim;                                 \
            T *v = k + kv_heads * cache_slots * dim;                                           \
            memcpy(k, row + (heads + h) * dim, dim * sizeof(T));                               \
            memcpy(v, row + (heads + kv_heads + h) * dim, dim * sizeof(T));                    \
        }                                                                                      \
    }

void rotary_kv_f32(float *qkv, int64_t stride, int64_t n, int64_t heads, int64_t kv_heads,
                   int64_t dim, const int64_t *positions, const float *cos_table,
                   const float *sin_table, float *cache, int64_t cache_slots,
                   const int64_t *slots) {
    ROTARY_KV(float, load_f32, store_f32, keep)
}

void rotary_kv_bf16(bf16 *qkv, int64_t stride, int64_t n, int64_t heads, int64_t kv_heads,
                    int64_t dim, const int64_t *positions, const float *cos_table,
                    const float *sin_table, bf16 *cache, int64_t cache_slots,
                    const int64_t *slots) {
    ROTARY_KV(bf16, load_bf16, store_bf16, round_bf16)
}
