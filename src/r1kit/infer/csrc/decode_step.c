/* One decode step of one sequence through the whole model in one call (see r1kit/infer/decode_step.py).
 *
 * At batch 1 a thin, deep model is a chain of small matrix-vector products: a per-layer round trip
 * through Python and a dispatch per operation costs as much as streaming a layer's weights. Here
 * the step runs in one OpenMP region: the embedding row, then for each layer RMSNorm, the fused
 * q/k/v product (+ bias), RoPE, the K/V write into the paged pool and attention (the tasks of
 * paged_attention.h), the output product added to the residual, RMSNorm, the fused gate/up product
 * with SiLU(gate)·up, the down product added to the residual; then the final norm and the output
 * head. Every product reads its weight as one stream (blocks of rows); the threads split the output rows
 * (the gate/up product splits the neurons, each thread reading a neuron's gate row and up row), and
 * each thread normalises the residual itself (a few hundred values) so no barrier waits on a norm.
 * Values are rounded to the model's element type where PyTorch's modules round them (bfloat16:
 * after each product, norm, activation and residual add), accumulations are in float.
 *
 * layers: per layer 10 pointers (input norm, q/k/v weight, q/k/v bias or 0, output weight, post norm,
 * gate weight, up weight, down weight, K pool, V pool) and 2 integers (its table group, 1 for a local
 * layer); per step: the token, cos/sin [D], each group's block table and new slot. Weights are laid
 * out in blocks of ROWS rows (decode_step.py's `interleave`); the embedding table is plain.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "paged_attention.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PTRS_PER_LAYER 10
#define ROWS 4

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* dot products with x of one block of ROWS rows of a weight laid out in blocks (see decode_step.py's
 * `interleave`): for each run of 16 input features, the block's ROWS rows side by side, so a block is
 * one sequential stream of memory; `in` is a multiple of 16 */
#ifdef __AVX512F__
static inline __m512 wload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 wload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define DEFINE_DOT(NAME, W_T, WLOAD)                                                                      \
static inline void NAME(const W_T *restrict w, int64_t in, const float *restrict x, float *out) {         \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                         \
    for (int64_t i = 0; i < in; i += 16) {                                                              \
        const __m512 xv = _mm512_loadu_ps(x + i);                                                       \
        const W_T *restrict b = w + ROWS * i;                                                           \
        a0 = _mm512_fmadd_ps(WLOAD(b), xv, a0);                                                         \
        a1 = _mm512_fmadd_ps(WLOAD(b + 16), xv, a1);                                                    \
        a2 = _mm512_fmadd_ps(WLOAD(b + 32), xv, a2);                                                    \
        a3 = _mm512_fmadd_ps(WLOAD(b + 48), xv, a3);                                                    \
    }                                                                                                   \
    out[0] = _mm512_reduce_add_ps(a0);                                                                  \
    out[1] = _mm512_reduce_add_ps(a1);                                                                  \
    out[2] = _mm512_reduce_add_ps(a2);                                                                  \
    out[3] = _mm512_reduce_add_ps(a3);                                                                  \
}
DEFINE_DOT(dot4_f32, float, wload_f32)
DEFINE_DOT(dot4_bf16, uint16_t, wload_bf16)
#else
#define DEFINE_DOT(NAME, W_T, LOAD)                                                                       \
static inline void NAME(const W_T *restrict w, int64_t in, const float *restrict x, float *out) {         \
    float acc[ROWS] = {0.0f};                                                                           \
    for (int64_t i = 0; i < in; i += 16)                                                                \
        for (int r = 0; r < ROWS; ++r)                                                                  \
            for (int64_t j = 0; j < 16; ++j) acc[r] += LOAD(w + ROWS * i + 16 * r, j) * x[i + j];       \
    for (int r = 0; r < ROWS; ++r) out[r] = acc[r];                                                     \
}
DEFINE_DOT(dot4_f32, float, load_f32)
DEFINE_DOT(dot4_bf16, uint16_t, load_bf16)
#endif

/* the rows after the last whole block are stored plain, row after row */
static inline void dot1_f32(const float *w, int64_t in, const float *x, float *out) {
    float acc = 0.0f;
    for (int64_t i = 0; i < in; ++i) acc += w[i] * x[i];
    *out = acc;
}
static inline void dot1_bf16(const uint16_t *w, int64_t in, const float *x, float *out) {
    float acc = 0.0f;
    for (int64_t i = 0; i < in; ++i) acc += bf16_value(w[i]) * x[i];
    *out = acc;
}

#define DEFINE_STEP(NAME, T, LOAD, ROUND, STORE, DOT4, DOT1, ATTEND, ROPE)                                \
/* y = x·rsqrt(mean(x²) + eps), rounded, then ·w, rounded (the model's RMSNorm), into float */          \
static inline void NAME##_norm(const T *x, const T *w, float *y, int64_t d, float eps) {                 \
    float squares = 0.0f;                                                                               \
    for (int64_t i = 0; i < d; ++i) squares += LOAD(x, i) * LOAD(x, i);                                 \
    const float inv = 1.0f / sqrtf(squares / (float)d + eps);                                           \
    for (int64_t i = 0; i < d; ++i) y[i] = ROUND(LOAD(w, i) * ROUND(LOAD(x, i) * inv));                 \
}                                                                                                       \
/* rows [0, rows) of w·x (+ bias), split over the team; rows a multiple of ROWS go four at a time.     \
 * mode 0: y = round(acc + bias); mode 1: y = round(y + round(acc)) (a residual add) */                 \
static inline void NAME##_gemv(const T *w, const T *bias, const float *x, T *y, int64_t rows, int64_t in, int mode) { \
    const int64_t blocks = rows / ROWS;                                                                 \
    _Pragma("omp for schedule(static) nowait")                                                          \
    for (int64_t b = 0; b < blocks; ++b) {                                                              \
        float acc[ROWS];                                                                                \
        DOT4(w + b * ROWS * in, in, x, acc);                                                            \
        for (int r = 0; r < ROWS; ++r) {                                                                \
            const int64_t o = b * ROWS + r;                                                             \
            y[o] = mode ? STORE(LOAD(y, o) + ROUND(acc[r])) : STORE(acc[r] + (bias ? LOAD(bias, o) : 0.0f)); \
        }                                                                                               \
    }                                                                                                   \
    _Pragma("omp for schedule(static)")                                                                 \
    for (int64_t o = blocks * ROWS; o < rows; ++o) {                                                    \
        float acc;                                                                                      \
        DOT1(w + o * in, in, x, &acc);                                                                  \
        y[o] = mode ? STORE(LOAD(y, o) + ROUND(acc)) : STORE(acc + (bias ? LOAD(bias, o) : 0.0f));      \
    }                                                                                                   \
}                                                                                                       \
/* hid[j] = silu(gate_j·x)·(up_j·x) for the neurons j of [0, ffn), split over the team */              \
static inline void NAME##_gate_up(const T *wg, const T *wu, const float *x, T *hid, int64_t ffn, int64_t in) { \
    const int64_t blocks = ffn / ROWS;                                                                  \
    _Pragma("omp for schedule(static) nowait")                                                          \
    for (int64_t b = 0; b < blocks; ++b) {                                                              \
        float g[ROWS], u[ROWS];                                                                         \
        DOT4(wg + b * ROWS * in, in, x, g);                                                             \
        DOT4(wu + b * ROWS * in, in, x, u);                                                             \
        for (int r = 0; r < ROWS; ++r) hid[b * ROWS + r] = STORE(ROUND(silu(ROUND(g[r]))) * ROUND(u[r])); \
    }                                                                                                   \
    _Pragma("omp for schedule(static)")                                                                 \
    for (int64_t j = blocks * ROWS; j < ffn; ++j) {                                                     \
        float g, u;                                                                                     \
        DOT1(wg + j * in, in, x, &g);                                                                   \
        DOT1(wu + j * in, in, x, &u);                                                                   \
        hid[j] = STORE(ROUND(silu(ROUND(g))) * ROUND(u));                                               \
    }                                                                                                   \
}                                                                                                       \
int NAME(const int64_t *layers, const int64_t *kinds, int64_t num_layers, int64_t token, const T *embed, \
         const T *final_norm, const T *head, int64_t vocab, const T *cos, const T *sin,                 \
         const int64_t *table0, int64_t slot0, const int64_t *table1, int64_t slot1,                    \
         int64_t context, int64_t lowest_global, int64_t lowest_local, T *logits,                       \
         int64_t d, int64_t hq, int64_t hkv, int64_t dim, int64_t ffn, int64_t block_size, float eps,  \
         float scale) {                                                                                 \
    const int64_t group = hq / hkv, width = (hq + 2 * hkv) * dim, widest = d > ffn ? (d > hq * dim ? d : hq * dim) : (ffn > hq * dim ? ffn : hq * dim); \
    if (group > MAX_GROUP || group * hkv != hq || dim % 2) return 1;                                    \
    T *x = (T *)malloc(sizeof(T) * d), *qkv = (T *)malloc(sizeof(T) * width);                           \
    T *att = (T *)malloc(sizeof(T) * hq * dim), *hid = (T *)malloc(sizeof(T) * ffn);                    \
    if (!x || !qkv || !att || !hid) { free(x); free(qkv); free(att); free(hid); return 2; }             \
    memcpy(x, embed + token * d, sizeof(T) * d);                                                        \
    int failed = 0;                                                                                     \
    _Pragma("omp parallel")                                                                             \
    {                                                                                                   \
        float *xf = (float *)malloc(sizeof(float) * widest), *scores = NULL;                            \
        float *qs = (float *)malloc(sizeof(float) * group * dim), *os = (float *)malloc(sizeof(float) * group * dim); \
        float *kr = (float *)malloc(sizeof(float) * dim);                                               \
        int64_t capacity = 0;                                                                           \
        int mine = !xf || !qs || !os || !kr;                                                            \
        _Pragma("omp atomic")                                                                           \
        failed |= mine;                                                                                 \
        _Pragma("omp barrier")                                                                          \
        /* read once, after the barrier: every thread takes the same branch, none waits alone at one */ \
        const int ready = !failed;                                                                      \
        for (int64_t l = 0; l < (ready ? num_layers : 0); ++l) {                                        \
            const int64_t *p = layers + l * PTRS_PER_LAYER;                                             \
            const T *in_norm = (const T *)p[0], *wqkv = (const T *)p[1], *bqkv = (const T *)p[2];       \
            const T *wo = (const T *)p[3], *post_norm = (const T *)p[4], *wgate = (const T *)p[5], *wup = (const T *)p[6]; \
            const T *wdown = (const T *)p[7];                                                           \
            T *kp = (T *)p[8], *vp = (T *)p[9];                                                         \
            const int64_t *table = kinds[2 * l] ? table1 : table0, slot = kinds[2 * l] ? slot1 : slot0; \
            const int64_t lo = kinds[2 * l + 1] ? lowest_local : lowest_global, n = context - lo;       \
            NAME##_norm(x, in_norm, xf, d, eps);                                                        \
            NAME##_gemv(wqkv, bqkv, xf, qkv, width, d, 0);                                              \
            _Pragma("omp for schedule(static)")                                                         \
            for (int64_t h = 0; h < hkv; ++h) {                                                         \
                T *kout = kp + (slot * hkv + h) * dim, *vout = vp + (slot * hkv + h) * dim;             \
                ROPE(qkv + (hq + h) * dim, cos, sin, dim, kr);                                          \
                for (int64_t i = 0; i < dim; ++i) {                                                     \
                    kout[i] = STORE(kr[i]);                                                             \
                    vout[i] = qkv[(hq + hkv + h) * dim + i];                                            \
                }                                                                                       \
                for (int64_t g = 0; g < group; ++g) ROPE(qkv + (h * group + g) * dim, cos, sin, dim, qs + g * dim); \
                T *dst = att + h * group * dim;                                                         \
                if (n <= 0) { memset(dst, 0, sizeof(T) * group * dim); continue; }                      \
                if (ATTEND(qs, kp, vp, os, table, lo, n, group, hkv, h, dim, block_size, scale, &scores, &capacity)) { \
                    _Pragma("omp atomic")                                                               \
                    failed |= 1;                                                                        \
                    continue;                                                                           \
                }                                                                                       \
                for (int64_t i = 0; i < group * dim; ++i) dst[i] = STORE(os[i]);                        \
            }                                                                                           \
            for (int64_t i = 0; i < hq * dim; ++i) xf[i] = LOAD(att, i);                                \
            NAME##_gemv(wo, NULL, xf, x, d, hq * dim, 1);                                               \
            NAME##_norm(x, post_norm, xf, d, eps);                                                      \
            NAME##_gate_up(wgate, wup, xf, hid, ffn, d);                                                       \
            for (int64_t i = 0; i < ffn; ++i) xf[i] = LOAD(hid, i);                                     \
            NAME##_gemv(wdown, NULL, xf, x, d, ffn, 1);                                                 \
        }                                                                                               \
        if (ready) {                                                                                    \
            NAME##_norm(x, final_norm, xf, d, eps);                                                     \
            NAME##_gemv(head, NULL, xf, logits, vocab, d, 0);                                           \
        }                                                                                               \
        free(xf); free(qs); free(os); free(kr); free(scores);                                           \
    }                                                                                                   \
    free(x); free(qkv); free(att); free(hid);                                                           \
    return failed ? 2 : 0;                                                                              \
}

DEFINE_STEP(decode_step_f32, float, load_f32, round_f32, store_f32, dot4_f32, dot1_f32, attend_f32, rope_f32)
DEFINE_STEP(decode_step_bf16, uint16_t, load_bf16, round_bf16, to_bf16, dot4_bf16, dot1_bf16, attend_bf16, rope_bf16)
