/* 8-bit GPTQ matmul for the CPU: y = x · dequant(W) (+ bias), with integer dot products as llama.cpp's
 * q8_0 × q8_0 path takes them (see r1kit/quant/cpu_int8.py, which packs the layout and calls this).
 *
 * Activations. Each row of x is quantized to int8 in blocks of 32 inputs (in the kernel's input order):
 * scale_b = max|x| / 127, xq = round(x / scale_b). For a weight group g of whole blocks:
 *     Σ_k x·w = scale_w · Σ_b scale_b · (Σ_{k∈b} xq·q − zero · Σ_{k∈b} xq),
 * so the codes q (0..255, unsigned) multiply the signed activations with no offset in the loop, and the
 * zero-point term is one float per row and group, worked out once (xzero below).
 *
 * Layout. Outputs go in tiles of 32 columns; a tile's weights are K/4 records of 128 bytes, one per four
 * inputs (4p .. 4p+3): byte 4j + r holds the code of input 4p + r for column j. The first 64 bytes are
 * then the sixteen 32-bit lanes vpdpbusd multiplies by four broadcast activations (columns 0..15), the
 * next 64 bytes columns 16..31. Per tile and group: 32 scales then 32 zero points, float16 (GPTQ's scales
 * exactly; zeros are integers up to 256, exact in float16). A tile reads its weights front to back.
 *
 * With AVX512-VNNI the block products are vpdpbusd; without it a portable loop computes the same
 * integers (the same results to float rounding). Rows go four at a time through a tile while its
 * weights sit in L1; tiles (and row blocks) are spread over the OpenMP threads of the runtime torch loaded.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define R1KIT_VNNI 1
#else
#define R1KIT_VNNI 0
#endif

#define ROWS 4    /* rows per pass over a tile */
#define BLOCK 32  /* activation inputs per int8 scale */
#define TILE 32   /* output columns per tile */
#define PREFETCH 8192  /* bytes of weights ahead of the ones being read (see the tile loop) */

/* 1 where the integer products run on AVX512-VNNI, 0 where the portable loop does */
int int8_matmul_vnni(void) { return R1KIT_VNNI; }

#if R1KIT_VNNI
/* One tile for `rows` rows (1..ROWS): res[r][0..31] = Σ_g scale_w · (Σ_b scale_b · Σ_{k∈b} xq·q − zero · xzero). */
static inline __attribute__((always_inline)) void tile_rows(
    const uint8_t *restrict w, const uint16_t *restrict sz, const int8_t *restrict xq, const float *restrict xs,
    const float *restrict xzero, int64_t k, int64_t groups, int64_t group, const int rows, float *restrict res) {
    const int64_t blocks = k / BLOCK, group_blocks = group / BLOCK;
    __m512 out_lo[ROWS], out_hi[ROWS];
    for (int r = 0; r < ROWS; ++r) out_lo[r] = out_hi[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        const uint16_t *restrict s = sz + g * 64;
        const __m512 s_lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
        const __m512 s_hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 16)));
        for (int64_t b = g * group_blocks; b < (g + 1) * group_blocks; ++b) {
            const uint8_t *restrict wb = w + b * (BLOCK / 4) * 128;
            /* two accumulator sets (even and odd quads): vpdpbusd's latency would otherwise bound one row */
            __m512i a_lo[ROWS], a_hi[ROWS], c_lo[ROWS], c_hi[ROWS];
            for (int r = 0; r < ROWS; ++r) a_lo[r] = a_hi[r] = c_lo[r] = c_hi[r] = _mm512_setzero_si512();
            for (int q = 0; q < BLOCK / 4; q += 2) {
                /* PREFETCH bytes ahead of the stream, into L2 only: at decode every weight byte comes from
                 * memory once, and this loop eats them faster than the int4 one (which prefetches nearer,
                 * into L1); measured against both and against none in docs/quant.md */
                for (int line = 0; line < 256; line += 64)
                    _mm_prefetch((const char *)((uintptr_t)(wb + q * 128) + PREFETCH + line), _MM_HINT_T2);
                const __m512i w0 = _mm512_loadu_si512(wb + q * 128), w1 = _mm512_loadu_si512(wb + q * 128 + 64);
                const __m512i w2 = _mm512_loadu_si512(wb + q * 128 + 128), w3 = _mm512_loadu_si512(wb + q * 128 + 192);
                for (int r = 0; r < rows; ++r) {
                    int32_t x0, x1;
                    memcpy(&x0, xq + r * k + b * BLOCK + q * 4, 4);
                    memcpy(&x1, xq + r * k + b * BLOCK + q * 4 + 4, 4);
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

static void tile(const uint8_t *w, const uint16_t *sz, const int8_t *xq, const float *xs, const float *xzero, int64_t k,
                 int64_t groups, int64_t group, int rows, float *res) {
    /* constant row counts, so the row loops unroll and the accumulators stay in registers */
    switch (rows) {
        case 1: tile_rows(w, sz, xq, xs, xzero, k, groups, group, 1, res); break;
        case 2: tile_rows(w, sz, xq, xs, xzero, k, groups, group, 2, res); break;
        case 3: tile_rows(w, sz, xq, xs, xzero, k, groups, group, 3, res); break;
        default: tile_rows(w, sz, xq, xs, xzero, k, groups, group, 4, res); break;
    }
}
#else
/* float16 bits to float (normal, subnormal, zero; scales are finite: the loader checks them) */
static inline float half_value(uint16_t h) {
    const int exponent = (h >> 10) & 0x1f;
    const float magnitude = exponent ? ldexpf((float)(1024 | (h & 0x3ff)), exponent - 25) : ldexpf((float)(h & 0x3ff), -24);
    return (h & 0x8000) ? -magnitude : magnitude;
}

/* The same sums without VNNI: exact integer block products, then the same float steps. */
static void tile(const uint8_t *w, const uint16_t *sz, const int8_t *xq, const float *xs, const float *xzero, int64_t k,
                 int64_t groups, int64_t group, int rows, float *res) {
    const int64_t blocks = k / BLOCK, group_blocks = group / BLOCK;
    for (int i = 0; i < rows * TILE; ++i) res[i] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
        const uint16_t *s = sz + g * 64;
        for (int64_t b = g * group_blocks; b < (g + 1) * group_blocks; ++b) {
            const uint8_t *wb = w + b * (BLOCK / 4) * 128;
            for (int r = 0; r < rows; ++r) {
                int32_t acc[TILE] = {0};
                const int8_t *xb = xq + r * k + b * BLOCK;
                for (int q = 0; q < BLOCK / 4; ++q)
                    for (int j = 0; j < TILE; ++j)
                        for (int i = 0; i < 4; ++i) acc[j] += (int32_t)wb[q * 128 + j * 4 + i] * (int32_t)xb[q * 4 + i];
                const float xsb = xs[r * blocks + b];
                for (int j = 0; j < TILE; ++j) res[r * TILE + j] += half_value(s[j]) * xsb * (float)acc[j];
            }
        }
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < TILE; ++j) res[r * TILE + j] -= half_value(s[j]) * half_value(s[32 + j]) * xzero[r * groups + g];
    }
}
#endif

/* One row's activations as int8 blocks: xq [k], xs [k/BLOCK] (scale per block), xzero [groups]
 * (Σ_b scale_b · Σ xq over each group's blocks, which the zero points multiply). */
static void quantize_row(const float *x, int64_t k, int64_t group, int8_t *xq, float *xs, float *xzero) {
    const int64_t group_blocks = group / BLOCK;
    for (int64_t b = 0; b < k / BLOCK; ++b) {
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; ++i) amax = fmaxf(amax, fabsf(x[b * BLOCK + i]));
        const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < BLOCK; ++i) {
            const int32_t v = (int32_t)nearbyintf(x[b * BLOCK + i] * inv);
            xq[b * BLOCK + i] = (int8_t)v;
            total += v;
        }
        xs[b] = scale;
        if (b % group_blocks == 0) xzero[b / group_blocks] = 0.0f;
        xzero[b / group_blocks] += scale * (float)total;
    }
}

/* y [m, n] = x [m, k] · W (+ bias [n], float32). w: the packed codes, sz: scales and zeros (float16),
 * order: the input order (int64 [k]) or NULL. Returns 0, 1 where the shapes do not fit the layout
 * (n % 32, group % 32, k % group), 2 out of memory. */
#define DEFINE_MATMUL(NAME, T, TO_FLOAT, FROM_FLOAT)                                                           \
int NAME(const T *x, int64_t m, int64_t k, int64_t n, const uint8_t *w, const uint16_t *sz, int64_t group,       \
         const int64_t *order, const float *bias, T *y) {                                                     \
    if (n % TILE || group % BLOCK || k % group) return 1;                                                     \
    const int64_t groups = k / group, blocks = k / BLOCK, tiles = n / TILE, row_blocks = (m + ROWS - 1) / ROWS; \
    int8_t *xq = (int8_t *)malloc((size_t)(m * k));                                                           \
    float *xs = (float *)malloc(sizeof(float) * m * blocks);                                                  \
    float *xzero = (float *)malloc(sizeof(float) * m * groups);                                               \
    float *xf = (float *)malloc(sizeof(float) * m * k);                                                       \
    if (xq == NULL || xs == NULL || xzero == NULL || xf == NULL) {                                            \
        free(xq); free(xs); free(xzero); free(xf); return 2;                                                  \
    }                                                                                                         \
    _Pragma("omp parallel")                                                                                   \
    {                                                                                                         \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int64_t r = 0; r < m; ++r) {                                                                     \
            for (int64_t i = 0; i < k; ++i) xf[r * k + i] = TO_FLOAT(x + r * k, order ? order[i] : i);        \
            quantize_row(xf + r * k, k, group, xq + r * k, xs + r * blocks, xzero + r * groups);              \
        }                                                                                                     \
        _Pragma("omp for schedule(static) collapse(2)")                                                       \
        for (int64_t t = 0; t < tiles; ++t) {                                                                 \
            for (int64_t b = 0; b < row_blocks; ++b) {                                                        \
                float res[ROWS * TILE];                                                                       \
                const int64_t r0 = b * ROWS;                                                                  \
                const int rows = (int)(m - r0 < ROWS ? m - r0 : ROWS);                                        \
                tile(w + t * k * TILE, sz + t * groups * 64, xq + r0 * k, xs + r0 * blocks,                   \
                     xzero + r0 * groups, k, groups, group, rows, res);                                       \
                for (int r = 0; r < rows; ++r) {                                                              \
                    T *yr = y + (r0 + r) * n + t * TILE;                                                      \
                    for (int j = 0; j < TILE; ++j)                                                            \
                        yr[j] = FROM_FLOAT(res[r * TILE + j] + (bias ? bias[t * TILE + j] : 0.0f));           \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    free(xq); free(xs); free(xzero); free(xf);                                                                \
    return 0;                                                                                                 \
}

#define F32_LOAD(p, i) ((p)[i])
#define F32_STORE(f) (f)
#define BF16_LOAD(p, i) bf16_value((p)[i])
#define BF16_STORE(f) bf16_round(f)
DEFINE_MATMUL(int8_matmul_f32, float, F32_LOAD, F32_STORE)
DEFINE_MATMUL(int8_matmul_bf16, uint16_t, BF16_LOAD, BF16_STORE)
