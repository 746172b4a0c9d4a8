/* RMSNorm over the last dimension in one call (see r1kit/infer/native_norm.py).
 *
 * PyTorch's CPU rms_norm is a composite of about ten operations; at decode, where a row is one
 * token's hidden state, their dispatch is the whole cost. This is the same formula in one pass
 * (to within a float32 rounding step: -ffast-math's reciprocal square root and sum order):
 * float32: y = x · rsqrt(mean(x²) + eps) · w. bfloat16, as the model's RMSNorm computes it:
 * normed = bf16(x · rsqrt(mean(x²) + eps)) in float32, then y = bf16(w · normed).
 * Rows go to OpenMP threads only when there are enough of them to pay for waking the threads.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define PARALLEL_ELEMENTS (1 << 16)

static inline void row_f32(const float *x, const float *w, float *y, int64_t dim, float eps) {
    float squares = 0.0f;
    for (int64_t i = 0; i < dim; ++i) squares += x[i] * x[i];
    const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
    for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * inv * w[i];
}

static inline void row_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t dim, float eps) {
    float squares = 0.0f;
    for (int64_t i = 0; i < dim; ++i) squares += bf16_value(x[i]) * bf16_value(x[i]);
    const float inv = 1.0f / sqrtf(squares / (float)dim + eps);
    for (int64_t i = 0; i < dim; ++i) y[i] = bf16_round(bf16_value(w[i]) * bf16_value(bf16_round(bf16_value(x[i]) * inv)));
}

#define DEFINE_NORM(NAME, ROW, T)                                                                         \
void NAME(const T *x, const T *w, T *y, int64_t rows, int64_t dim, float eps) {                          \
    if (rows * dim < PARALLEL_ELEMENTS) {                                                               \
        for (int64_t r = 0; r < rows; ++r) ROW(x + r * dim, w, y + r * dim, dim, eps);                  \
        return;                                                                                         \
    }                                                                                                   \
    _Pragma("omp parallel for schedule(static)")                                                        \
    for (int64_t r = 0; r < rows; ++r) ROW(x + r * dim, w, y + r * dim, dim, eps);                      \
}

DEFINE_NORM(rms_norm_f32, row_f32, float)
DEFINE_NORM(rms_norm_bf16, row_bf16, uint16_t)
