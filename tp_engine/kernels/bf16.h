/* bfloat16 as torch stores it (the top half of a float32), and the element access the kernels
 * share: every kernel computes in float32 and rounds once per value it stores. */

#ifndef TP_ENGINE_BF16_H
#define TP_ENGINE_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float from_bf16(bf16 x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline bf16 to_bf16(float f) {  /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (bf16)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40 : rounded);
}

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const bf16 *p, int64_t i) { return from_bf16(p[i]); }
static inline void store_f32(float *p, int64_t i, float v) { p[i] = v; }
static inline void store_bf16(bf16 *p, int64_t i, float v) { p[i] = to_bf16(v); }

#endif
