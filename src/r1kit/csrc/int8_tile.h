/* The 8-bit GPTQ kernel's pieces, shared by the matmul (r1kit/quant/csrc/int8_matmul.c, where the layout
 * and the arithmetic are described) and the one-call decode step (r1kit/infer/csrc/decode_step.c): one
 * 32-column tile of the product for up to INT8_ROWS rows, with AVX512-VNNI or a portable loop, and one
 * activation row quantized the way the tile reads it. r1kit.native puts this folder on every kernel's
 * include path and in its build hash. */
#ifndef R1KIT_INT8_TILE_H
#define R1KIT_INT8_TILE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define R1KIT_HAVE_VNNI 1
#else
#define R1KIT_HAVE_VNNI 0
#endif

#define INT8_ROWS 4    /* rows per pass over a tile */
#define INT8_BLOCK 32  /* activation inputs per int8 scale */
#define INT8_TILE 32   /* output columns per tile */
#define INT8_PREFETCH 8192  /* bytes of weights ahead of the ones being read (see the tile loop) */

#if R1KIT_HAVE_VNNI
/* One tile for `rows` rows (1..INT8_ROWS): res[r][0..31] = Σ_g scale_w · (Σ_b scale_b · Σ_{k∈b} xq·q − zero · xzero). */
static inline __attribute__((always_inline)) void int8_tile_rows(
    const uint8_t *restrict w, const uint16_t *restrict sz, const int8_t *restrict xq, const float *restrict xs,
    const float *restrict xzero, int64_t k, int64_t groups, int64_t group, const int rows, float *restrict res) {
    const int64_t blocks = k / INT8_BLOCK, group_blocks = group / INT8_BLOCK;
    __m512 out_lo[INT8_ROWS], out_hi[INT8_ROWS];
    for (int r = 0; r < INT8_ROWS; ++r) out_lo[r] = out_hi[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        const uint16_t *restrict s = sz + g * 64;
        const __m512 s_lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
        const __m512 s_hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 16)));
        for (int64_t b = g * group_blocks; b < (g + 1) * group_blocks; ++b) {
            const uint8_t *restrict wb = w + b * (INT8_BLOCK / 4) * 128;
            /* two accumulator sets (even and odd quads): vpdpbusd's latency would otherwise bound one row */
            __m512i a_lo[INT8_ROWS], a_hi[INT8_ROWS], c_lo[INT8_ROWS], c_hi[INT8_ROWS];
            for (int r = 0; r < INT8_ROWS; ++r) a_lo[r] = a_hi[r] = c_lo[r] = c_hi[r] = _mm512_setzero_si512();
            for (int q = 0; q < INT8_BLOCK / 4; q += 2) {
                /* INT8_PREFETCH bytes ahead of the stream, into L2 only: at decode every weight byte comes from
                 * memory once, and this loop eats them faster than the int4 one (which prefetches nearer,
                 * into L1); measured against both and against none in docs/quant.md */
                for (int line = 0; line < 256; line += 64)
                    _mm_prefetch((const char *)((uintptr_t)(wb + q * 128) + INT8_PREFETCH + line), _MM_HINT_T2);
                const __m512i w0 = _mm512_loadu_si512(wb + q * 128), w1 = _mm512_loadu_si512(wb + q * 128 + 64);
                const __m512i w2 = _mm512_loadu_si512(wb + q * 128 + 128), w3 = _mm512_loadu_si512(wb + q * 128 + 192);
                for (int r = 0; r < rows; ++r) {
                    int32_t x0, x1;
                    memcpy(&x0, xq + r * k + b * INT8_BLOCK + q * 4, 4);
                    memcpy(&x1, xq + r * k + b * INT8_BLOCK + q * 4 + 4, 4);
                    const __m512i v0 = _mm512_set1_epi32(x0), v1 = _mm512_set1_epi32(x1);
                    a_lo[r] = _mm512_dpbusd_epi32(a_lo[r], w0, v0);
                    a_hi[r] = _mm512_dpbusd_epi32(a_hi[r], w1, v0);
                    c_lo[r] = _mm512_dpbusd_epi32(c_lo[r], w2, v1);
                    c_hi[r] = _mm512_dpbusd_epi32(c_hi[r], w3, v1);
                }
            }
            for (int r = 0; r < rows; ++r) {
                const __m512 xsb = _mm512_set1_ps(xs[r * blocks + b]);
                out_lo[r] = _mm512_fmadd_ps(_mm512_mul_ps(s_lo, xsb), _mm512_cvtepi32_ps(_mm512_add_epi32(a_lo[r], c_lo[r])), out_lo[r]);
                out_hi[r] = _mm512_fmadd_ps(_mm512_mul_ps(s_hi, xsb), _mm512_cvtepi32_ps(_mm512_add_epi32(a_hi[r], c_hi[r])), out_hi[r]);
            }
        }
        const __m512 z_lo = _mm512_mul_ps(s_lo, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 32))));
        const __m512 z_hi = _mm512_mul_ps(s_hi, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 48))));
        for (int r = 0; r < rows; ++r) {
            const __m512 total = _mm512_set1_ps(xzero[r * groups + g]);
            out_lo[r] = _mm512_fnmadd_ps(z_lo, total, out_lo[r]);
            out_hi[r] = _mm512_fnmadd_ps(z_hi, total, out_hi[r]);
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm512_storeu_ps(res + r * 32, out_lo[r]);
        _mm512_storeu_ps(res + r * 32 + 16, out_hi[r]);
    }
}

static inline void int8_tile(const uint8_t *w, const uint16_t *sz, const int8_t *xq, const float *xs, const float *xzero, int64_t k,
                 int64_t groups, int64_t group, int rows, float *res) {
    /* constant row counts, so the row loops unroll and the accumulators stay in registers */
    switch (rows) {
        case 1: int8_tile_rows(w, sz, xq, xs, xzero, k, groups, group, 1, res); break;
        case 2: int8_tile_rows(w, sz, xq, xs, xzero, k, groups, group, 2, res); break;
        case 3: int8_tile_rows(w, sz, xq, xs, xzero, k, groups, group, 3, res); break;
        default: int8_tile_rows(w, sz, xq, xs, xzero, k, groups, group, 4, res); break;
    }
}
#else
/* float16 bits to float (normal, subnormal, zero; scales are finite: the loader checks them) */
static inline float int8_half_value(uint16_t h) {
    const int exponent = (h >> 10) & 0x1f;
    const float magnitude = exponent ? ldexpf((float)(1024 | (h & 0x3ff)), exponent - 25) : ldexpf((float)(h & 0x3ff), -24);
    return (h & 0x8000) ? -magnitude : magnitude;
}

/* The same sums without VNNI: exact integer block products, then the same float steps. */
static inline void int8_tile(const uint8_t *w, const uint16_t *sz, const int8_t *xq, const float *xs, const float *xzero, int64_t k,
                 int64_t groups, int64_t group, int rows, float *res) {
    const int64_t blocks = k / INT8_BLOCK, group_blocks = group / INT8_BLOCK;
    for (int i = 0; i < rows * INT8_TILE; ++i) res[i] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
        const uint16_t *s = sz + g * 64;
        for (int64_t b = g * group_blocks; b < (g + 1) * group_blocks; ++b) {
            const uint8_t *wb = w + b * (INT8_BLOCK / 4) * 128;
            for (int r = 0; r < rows; ++r) {
                int32_t acc[INT8_TILE] = {0};
                const int8_t *xb = xq + r * k + b * INT8_BLOCK;
                for (int q = 0; q < INT8_BLOCK / 4; ++q)
                    for (int j = 0; j < INT8_TILE; ++j)
                        for (int i = 0; i < 4; ++i) acc[j] += (int32_t)wb[q * 128 + j * 4 + i] * (int32_t)xb[q * 4 + i];
                const float xsb = xs[r * blocks + b];
                for (int j = 0; j < INT8_TILE; ++j) res[r * INT8_TILE + j] += int8_half_value(s[j]) * xsb * (float)acc[j];
            }
        }
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < INT8_TILE; ++j) res[r * INT8_TILE + j] -= int8_half_value(s[j]) * int8_half_value(s[32 + j]) * xzero[r * groups + g];
    }
}
#endif

/* One row's activations as int8 blocks: xq [k], xs [k/INT8_BLOCK] (scale per block), xzero [groups]
 * (Σ_b scale_b · Σ xq over each group's blocks, which the zero points multiply). */
static inline void int8_quantize_row(const float *x, int64_t k, int64_t group, int8_t *xq, float *xs, float *xzero) {
    const int64_t group_blocks = group / INT8_BLOCK;
    for (int64_t b = 0; b < k / INT8_BLOCK; ++b) {
        float amax = 0.0f;
        for (int i = 0; i < INT8_BLOCK; ++i) amax = fmaxf(amax, fabsf(x[b * INT8_BLOCK + i]));
        const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < INT8_BLOCK; ++i) {
            const int32_t v = (int32_t)nearbyintf(x[b * INT8_BLOCK + i] * inv);
            xq[b * INT8_BLOCK + i] = (int8_t)v;
            total += v;
        }
        xs[b] = scale;
        if (b % group_blocks == 0) xzero[b / group_blocks] = 0.0f;
        xzero[b / group_blocks] += scale * (float)total;
    }
}

#endif
