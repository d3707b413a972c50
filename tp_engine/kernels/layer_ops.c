/* The small operations of a decoder layer, one pass over memory each: RMSNorm with the residual
 * add before it, SiLU(gate) * up, and rotary embeddings with the write of keys and values into
 * the paged cache.
 *
 * In bfloat16 torch runs each of these as several ops, each reading and writing the whole
 * activation and rounding to bfloat16 in between (RMSNorm alone is eight). These loops round
 * at the same points, so they give torch's values except where a float32 sum of squares, or
 * the exponential, differs in its last bit. The float32 rotary is the torch expression
 * exactly (no fused multiply-add: -std=c11 and -ffp-contract=off). */

#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "exp_approx.h"

/* residual (if given) += x, rounded; out = weight * bf16(r / rms(r)); out may be x. */
void rms_norm_bf16(const bf16 *x, bf16 *residual, const bf16 *weight, float eps, bf16 *out,
                   int64_t n, int64_t hidden) {
    _Pragma("omp parallel for schedule(static) if (n * hidden > 32768)")
    for (int64_t i = 0; i < n; i++) {
        const bf16 *xi = x + i * hidden;
        bf16 *oi = out + i * hidden;
        float row[hidden];
        if (residual != NULL) {
            bf16 *ri = residual + i * hidden;
            for (int64_t d = 0; d < hidden; d++) {
                ri[d] = to_bf16(from_bf16(ri[d]) + from_bf16(xi[d]));
                row[d] = from_bf16(ri[d]);
            }
        } else {
            for (int64_t d = 0; d < hidden; d++) row[d] = from_bf16(xi[d]);
        }
        float squares = 0.0f;
        _Pragma("omp simd reduction(+:squares)")
        for (int64_t d = 0; d < hidden; d++) squares += row[d] * row[d];
        float inverse = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (int64_t d = 0; d < hidden; d++)
            oi[d] = to_bf16(from_bf16(weight[d]) * from_bf16(to_bf16(row[d] * inverse)));
    }
}

/* out[i] = bf16(silu(gate[i])) * up[i], rounded: gate and up side by side in each row. */
void silu_mul_bf16(const bf16 *gate_up, int64_t stride, bf16 *out, int64_t n, int64_t size) {
    _Pragma("omp parallel for schedule(static) if (n * size > 32768)")
    for (int64_t i = 0; i < n; i++) {
        const bf16 *gate = gate_up + i * stride, *up = gate + size;
        bf16 *oi = out + i * size;
        _Pragma("omp simd")
        for (int64_t d = 0; d < size; d++) {
            float g = from_bf16(gate[d]);
            float silu = from_bf16(to_bf16(g / (1.0f + exp_approx(-g))));
            oi[d] = to_bf16(silu * from_bf16(up[d]));
        }
    }
}

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

static inline float keep(float x) { return x; }
static inline float round_bf16(float x) { return from_bf16(to_bf16(x)); }

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
