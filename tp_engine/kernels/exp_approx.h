/* A vectorisable exponential for the kernels' softmax and SiLU. */

#ifndef TP_ENGINE_EXP_APPROX_H
#define TP_ENGINE_EXP_APPROX_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x to about 2 float32 ulp, in plain arithmetic the compiler vectorises (the C library's
 * expf is a call per element). Past 88.72 it overflows to infinity, as expf does; below -87
 * it is taken as e^-87, which vanishes beside what it is added to (1 in SiLU, the largest
 * term, e^0, in a softmax). The scale is applied as 2^(k-1) * 2, so that the
 * largest finite results keep their exponent. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x > 88.8f ? 88.8f : x;  /* (fminf would not vectorise) */
    float k = rintf(x * 1.44269504f);
    float r = x - k * 0.693145752f - k * 1.42860677e-6f;  /* ln 2 in two parts */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666418f
              + r * (0.00833336823f + r * 0.00138878601f)))));
    int32_t e = ((int32_t)k + 126) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale * 2.0f;
}

#endif
