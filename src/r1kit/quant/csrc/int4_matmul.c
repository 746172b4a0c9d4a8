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

#include "bf16.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define R1KIT_HAVE_KERNEL 1
#else
#define R1KIT_HAVE_KERNEL 0
#endif

#define ROWS 4  /* rows per pass over a tile */

int int4_matmul_available(void) { return R1KIT_HAVE_KERNEL; }

#if R1KIT_HAVE_KERNEL
/* One tile (32 columns) for `rows` rows (1..ROWS): res[r][0..31] = Σ_g scale · (Σ_k x·q − zero · Σ_k x). */
static inline __attribute__((always_inline)) void tile_rows(
    const uint8_t *restrict w, const uint16_t *restrict sz, const uint32_t *restrict x2, const float *restrict xsum,
    int64_t pairs, int64_t groups, int64_t group_pairs, const int rows, float *restrict res) {
    __m512i table = _mm512_setzero_si512();
    {
        uint16_t codes[32];
        for (int i = 0; i < 32; ++i) codes[i] = bf16_round((float)(i & 15));
        table = _mm512_loadu_si512(codes);
    }
    const __m512i low4 = _mm512_set1_epi16(0x0f);
    __m512 out_lo[ROWS], out_hi[ROWS];
    for (int r = 0; r < ROWS; ++r) out_lo[r] = out_hi[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        /* two accumulator sets (even and odd pairs): dot-product latency would otherwise bound one row */
        __m512 a_lo[ROWS], a_hi[ROWS], b_lo[ROWS], b_hi[ROWS];
        for (int r = 0; r < ROWS; ++r) a_lo[r] = a_hi[r] = b_lo[r] = b_hi[r] = _mm512_setzero_ps();
        const uint8_t *restrict wg = w + g * group_pairs * 32;
        const uint32_t *restrict xg = x2 + g * group_pairs;
        for (int64_t p = 0; p < group_pairs; p += 2) {
            /* 2 KB ahead of the stream (a prefetch never faults past the end): at decode, where
             * every weight byte comes from memory once, 5-20% faster than the hardware's alone */
            _mm_prefetch((const char *)((uintptr_t)(wg + p * 32) + 2048), _MM_HINT_T0);  /* integer sum: no out-of-bounds pointer */
            const __m512i v0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wg + p * 32)));
            const __m512i v1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wg + p * 32 + 32)));
            const __m512bh lo0 = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v0, low4), table);
            const __m512bh hi0 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v0, 4), table);
            const __m512bh lo1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v1, low4), table);
            const __m512bh hi1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v1, 4), table);
            for (int r = 0; r < rows; ++r) {
                const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)xg[r * pairs + p]);
                const __m512bh x1 = (__m512bh)_mm512_set1_epi32((int)xg[r * pairs + p + 1]);
                a_lo[r] = _mm512_dpbf16_ps(a_lo[r], lo0, x0);
                a_hi[r] = _mm512_dpbf16_ps(a_hi[r], hi0, x0);
                b_lo[r] = _mm512_dpbf16_ps(b_lo[r], lo1, x1);
                b_hi[r] = _mm512_dpbf16_ps(b_hi[r], hi1, x1);
            }
        }
        const uint16_t *restrict s = sz + g * 64;
        const __m512 s_lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
        const __m512 s_hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 16)));
        const __m512 z_lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 32)));
        const __m512 z_hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 48)));
        for (int r = 0; r < rows; ++r) {
            const __m512 total = _mm512_set1_ps(xsum[r * groups + g]);
            out_lo[r] = _mm512_fmadd_ps(s_lo, _mm512_fnmadd_ps(z_lo, total, _mm512_add_ps(a_lo[r], b_lo[r])), out_lo[r]);
            out_hi[r] = _mm512_fmadd_ps(s_hi, _mm512_fnmadd_ps(z_hi, total, _mm512_add_ps(a_hi[r], b_hi[r])), out_hi[r]);
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm512_storeu_ps(res + r * 32, out_lo[r]);
        _mm512_storeu_ps(res + r * 32 + 16, out_hi[r]);
    }
}

static void tile(const uint8_t *w, const uint16_t *sz, const uint32_t *x2, const float *xsum, int64_t pairs, int64_t groups,
                 int64_t group_pairs, int rows, float *res) {
    /* constant row counts, so the row loops unroll and the accumulators stay in registers */
    switch (rows) {
        case 1: tile_rows(w, sz, x2, xsum, pairs, groups, group_pairs, 1, res); break;
        case 2: tile_rows(w, sz, x2, xsum, pairs, groups, group_pairs, 2, res); break;
        case 3: tile_rows(w, sz, x2, xsum, pairs, groups, group_pairs, 3, res); break;
        default: tile_rows(w, sz, x2, xsum, pairs, groups, group_pairs, 4, res); break;
    }
}
#endif

/* y [m, n] = x [m, k] · W (+ bias [n], float32). w: the packed codes, sz: scales and zeros (float16),
 * order: the input order (int64 [k]) or NULL. Returns 0, 1 where the shapes do not fit the layout
 * (n % 32, k % group, group % 4), 2 out of memory, 3 no kernel on this CPU. */
#define DEFINE_MATMUL(NAME, T, TO_FLOAT, FROM_FLOAT)                                                           \
int NAME(const T *x, int64_t m, int64_t k, int64_t n, const uint8_t *w, const uint16_t *sz, int64_t group,       \
         const int64_t *order, const float *bias, T *y) {                                                     \
    if (!R1KIT_HAVE_KERNEL) return 3;                                                                         \
    if (n % 32 || group % 4 || k % group) return 1;                                                           \
    const int64_t pairs = k / 2, groups = k / group, tiles = n / 32, blocks = (m + ROWS - 1) / ROWS;          \
    uint32_t *x2 = (uint32_t *)malloc(sizeof(uint32_t) * m * pairs);                                          \
    float *xsum = (float *)malloc(sizeof(float) * m * groups);                                                \
    if (x2 == NULL || xsum == NULL) { free(x2); free(xsum); return 2; }                                       \
    _Pragma("omp parallel")                                                                                   \
    {                                                                                                         \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int64_t r = 0; r < m; ++r) {                                                                     \
            const T *xr = x + r * k;                                                                          \
            for (int64_t g = 0; g < groups; ++g) {                                                            \
                float total = 0.0f;                                                                           \
                for (int64_t i = g * group; i < (g + 1) * group; i += 2) {                                    \
                    const int64_t c0 = order ? order[i] : i, c1 = order ? order[i + 1] : i + 1;               \
                    const uint16_t h0 = bf16_round(TO_FLOAT(xr, c0)), h1 = bf16_round(TO_FLOAT(xr, c1));      \
                    x2[r * pairs + i / 2] = (uint32_t)h0 | ((uint32_t)h1 << 16);                              \
                    total += bf16_value(h0) + bf16_value(h1);                                                 \
                }                                                                                             \
                xsum[r * groups + g] = total;                                                                 \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("omp for schedule(static) collapse(2)")                                                       \
        for (int64_t t = 0; t < tiles; ++t) {                                                                 \
            for (int64_t b = 0; b < blocks; ++b) {                                                            \
                float res[ROWS * 32];                                                                         \
                const int64_t r0 = b * ROWS;                                                                  \
                const int rows = (int)(m - r0 < ROWS ? m - r0 : ROWS);                                        \
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
    free(x2);                                                                                                 \
    free(xsum);                                                                                               \
    return 0;                                                                                                 \
}

#if R1KIT_HAVE_KERNEL
#define TILE tile
#else
#define TILE(...) ((void)0)
#endif
#define F32_LOAD(p, i) ((p)[i])
#define F32_STORE(f) (f)
#define BF16_LOAD(p, i) bf16_value((p)[i])
#define BF16_STORE(f) bf16_round(f)
DEFINE_MATMUL(int4_matmul_f32, float, F32_LOAD, F32_STORE)
DEFINE_MATMUL(int4_matmul_bf16, uint16_t, BF16_LOAD, BF16_STORE)
