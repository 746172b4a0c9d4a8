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
#include "int8_tile.h"

/* 1 where the integer products run on AVX512-VNNI, 0 where the portable loop does */
int int8_matmul_vnni(void) { return R1KIT_HAVE_VNNI; }

/* y [m, n] = x [m, k] · W (+ bias [n], float32). w: the packed codes, sz: scales and zeros (float16),
 * order: the input order (int64 [k]) or NULL. Returns 0, 1 where the shapes do not fit the layout
 * (n % 32, group % 32, k % group), 2 out of memory. */
#define DEFINE_MATMUL(NAME, T, TO_FLOAT, FROM_FLOAT)                                                          \
int NAME(const T *x, int64_t m, int64_t k, int64_t n, const uint8_t *w, const uint16_t *sz, int64_t group,    \
         const int64_t *order, const float *bias, T *y) {                                                     \
    if (n % INT8_TILE || group % INT8_BLOCK || k % group) return 1;                                           \
    const int64_t groups = k / group, blocks = k / INT8_BLOCK, tiles = n / INT8_TILE, row_blocks = (m + INT8_ROWS - 1) / INT8_ROWS; \
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
            int8_quantize_row(xf + r * k, k, group, xq + r * k, xs + r * blocks, xzero + r * groups);         \
        }                                                                                                     \
        _Pragma("omp for schedule(static) collapse(2)")                                                       \
        for (int64_t t = 0; t < tiles; ++t) {                                                                 \
            for (int64_t b = 0; b < row_blocks; ++b) {                                                        \
                float res[INT8_ROWS * INT8_TILE];                                                             \
                const int64_t r0 = b * INT8_ROWS;                                                             \
                const int rows = (int)(m - r0 < INT8_ROWS ? m - r0 : INT8_ROWS);                              \
                int8_tile(w + t * k * INT8_TILE, sz + t * groups * 64, xq + r0 * k, xs + r0 * blocks,         \
                     xzero + r0 * groups, k, groups, group, rows, res);                                       \
                for (int r = 0; r < rows; ++r) {                                                              \
                    T *yr = y + (r0 + r) * n + t * INT8_TILE;                                                 \
                    for (int j = 0; j < INT8_TILE; ++j)                                                       \
                        yr[j] = FROM_FLOAT(res[r * INT8_TILE + j] + (bias ? bias[t * INT8_TILE + j] : 0.0f)); \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    free(xq); free(xs); free(xzero); free(xf);                                                                \
    return 0;                                                                                                 \
}

DEFINE_MATMUL(int8_matmul_f32, float, load_f32, store_f32)
DEFINE_MATMUL(int8_matmul_bf16, uint16_t, load_bf16, to_bf16)
