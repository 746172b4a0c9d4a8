/* 4-bit GPTQ matmul for the CPU: y = x · dequant(W) (+ bias), read from a layout made for AVX512-BF16
 * (see r1kit/quant/cpu_int4.py, which packs it and calls this).
 *
 * Layout. Outputs go in tiles of 32 columns; a tile's weights are K/2 records of 32 bytes, one per pair
 * of input rows (2p, 2p+1): byte 2j + r holds the codes of row 2p + r for column j (low nibble) and
 * column 16 + j (high nibble). Widened to 16-bit lanes, the low nibbles are then the 16 (row 2p, row
 * 2p+1) pairs of columns 0..15 in the order vdpbf16ps multiplies pairs, and the high nibbles those of
 * columns 16..31: one 32-byte load, a widen, a mask, a shift and two 16-entry table lookups (code to
 * bfloat16) feed two dot-product instructions, 64 multiply-adds. A tile reads its weights front to back.
 * Per tile and group: 32 scales then 32 zero points, float16 (GPTQ's scales exactly; zeros are small
 * integers). For a group g: y = scale · (Σ x·q − zero · Σ x), so the codes need no offset in the loop.
 *
 * Activations are rounded to bfloat16 (as torch's int4 CPU kernel does) and summed in float32; x may be
 * float32 or bfloat16 and y comes back in the same type, so callers cast nothing. An input order
 * (act-order checkpoints) gathers x's columns as they are rounded. Rows go four at a time through a
 * tile while its weights sit in L1. Tiles (and row blocks) are spread over the OpenMP threads of the
 * runtime torch loaded.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4_tile.h"

int int4_matmul_available(void) { return R1KIT_HAVE_INT4; }

/* y [m, n] = x [m, k] · W (+ bias [n], float32). w: the packed codes, sz: scales and zeros (float16),
 * order: the input order (int64 [k]) or NULL. Returns 0, 1 where the shapes do not fit the layout
 * (n % 32, k % group, group % 4), 2 out of memory, 3 no kernel on this CPU. */
#define DEFINE_MATMUL(NAME, T, TO_FLOAT, FROM_FLOAT)                                                          \
int NAME(const T *x, int64_t m, int64_t k, int64_t n, const uint8_t *w, const uint16_t *sz, int64_t group,    \
         const int64_t *order, const float *bias, T *y) {                                                     \
    if (!R1KIT_HAVE_INT4) return 3;                                                                           \
    if (n % 32 || group % 4 || k % group) return 1;                                                           \
    const int64_t pairs = k / 2, groups = k / group, tiles = n / 32, blocks = (m + INT4_ROWS - 1) / INT4_ROWS; \
    uint32_t *x2 = (uint32_t *)malloc(sizeof(uint32_t) * m * pairs);                                          \
    float *xsum = (float *)malloc(sizeof(float) * m * groups), *xf = (float *)malloc(sizeof(float) * m * k);  \
    if (x2 == NULL || xsum == NULL || xf == NULL) { free(x2); free(xsum); free(xf); return 2; }               \
    _Pragma("omp parallel")                                                                                   \
    {                                                                                                         \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int64_t r = 0; r < m; ++r) {                                                                     \
            for (int64_t i = 0; i < k; ++i) xf[r * k + i] = TO_FLOAT(x + r * k, i);                           \
            int4_prepare_row(xf + r * k, k, group, order, x2 + r * pairs, xsum + r * groups);                 \
        }                                                                                                     \
        _Pragma("omp for schedule(static) collapse(2)")                                                       \
        for (int64_t t = 0; t < tiles; ++t) {                                                                 \
            for (int64_t b = 0; b < blocks; ++b) {                                                            \
                float res[INT4_ROWS * 32];                                                                    \
                const int64_t r0 = b * INT4_ROWS;                                                             \
                const int rows = (int)(m - r0 < INT4_ROWS ? m - r0 : INT4_ROWS);                              \
                TILE(w + t * pairs * 32, sz + t * groups * 64, x2 + r0 * pairs, xsum + r0 * groups, pairs,    \
                     groups, group / 2, rows, res);                                                           \
                for (int r = 0; r < rows; ++r) {                                                              \
                    T *yr = y + (r0 + r) * n + t * 32;                                                        \
                    for (int j = 0; j < 32; ++j)                                                              \
                        yr[j] = FROM_FLOAT(res[r * 32 + j] + (bias ? bias[t * 32 + j] : 0.0f));               \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    free(x2); free(xsum); free(xf);                                                                           \
    return 0;                                                                                                 \
}

#if R1KIT_HAVE_INT4
#define TILE int4_tile
#else
#define TILE(...) ((void)0)
#endif
DEFINE_MATMUL(int4_matmul_f32, float, load_f32, store_f32)
DEFINE_MATMUL(int4_matmul_bf16, uint16_t, load_bf16, to_bf16)
