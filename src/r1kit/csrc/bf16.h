/* bfloat16 <-> float32 for r1kit's C kernels, rounding as PyTorch's .to(torch.bfloat16) does, so a
 * kernel's bfloat16 results match the PyTorch code it replaces bit for bit where it rounds in the
 * same places. r1kit.native puts this folder on the include path and in each build's hash. */
#ifndef R1KIT_BF16_H
#define R1KIT_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_value(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* round to nearest even; a NaN stays a (quiet) NaN instead of rounding into an infinity */
static inline uint16_t bf16_round(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* one element of a float32 or bfloat16 array as float (load_*), a float rounded to the type and
 * kept as float (round_*), a float as the type's stored value (store_f32, to_bf16): the kernels are
 * written once for both element types with these */
static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_value(p[i]); }
static inline float round_f32(float f) { return f; }
static inline float round_bf16(float f) { return bf16_value(bf16_round(f)); }
static inline float store_f32(float f) { return f; }
static inline uint16_t to_bf16(float f) { return bf16_round(f); }

#endif
