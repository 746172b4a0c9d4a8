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
 * A product (q/k/v, output, gate/up, down, the head) is PRODUCT_FIELDS integers: its kind (0: float
 * weights of the model's type in blocks of ROWS rows, decode_step.py's `interleave`; 4 or 8: GPTQ codes
 * in the layout of r1kit's int4 or int8 CPU kernel, whose tiles it calls, int4_tile.h and int8_tile.h),
 * the weight, the scales and zeros, the input order or 0, the group size, a float32 bias or 0. A gate/up
 * product holds the gate's rows then the up's. A quantized product's input row is prepared (rounded to
 * bfloat16 pairs, or quantized to int8 blocks) by every thread for itself, as the norms are.
 * layers: per layer 4 pointers (input norm, post norm, K pool, V pool) and 4 products (q/k/v, output,
 * gate/up, down); kinds: per layer 2 integers (its table group, 1 for a local layer); per step: the
 * token, cos/sin [D], each group's block table and new slot. The embedding table is plain.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4_tile.h"
#include "int8_tile.h"
#include "paged_attention.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PRODUCT_FIELDS 6
#define LAYER_FIELDS (4 + 4 * PRODUCT_FIELDS)
#define ROWS 4
enum { FLOAT = 0, INT4 = 4, INT8 = 8 };

/* one thread's buffers: its float input row and that row as a quantized product reads it */
typedef struct {
    float *xf, *gathered, *xsum, *xs, *xzero;
    uint32_t *x2;
    int8_t *xq;
} Scratch;

static int scratch_alloc(Scratch *s, int64_t widest) {
    s->xf = (float *)malloc(sizeof(float) * widest);
    s->gathered = (float *)malloc(sizeof(float) * widest);
    s->xsum = (float *)malloc(sizeof(float) * widest);
    s->xs = (float *)malloc(sizeof(float) * widest);
    s->xzero = (float *)malloc(sizeof(float) * widest);
    s->x2 = (uint32_t *)malloc(sizeof(uint32_t) * widest);
    s->xq = (int8_t *)malloc((size_t)widest);
    return s->xf && s->gathered && s->xsum && s->xs && s->xzero && s->x2 && s->xq;
}

static void scratch_free(Scratch *s) {
    free(s->xf); free(s->gathered); free(s->xsum); free(s->xs); free(s->xzero); free(s->x2); free(s->xq);
}

/* the thread's input row x [in] as product p's kernel reads it (nothing to do for float weights) */
static inline void prepare(const int64_t *p, const float *x, int64_t in, Scratch *s) {
    const int64_t group = p[4];
    const int64_t *order = (const int64_t *)p[3];
    if (p[0] == INT4) {
        int4_prepare_row(x, in, group, order, s->x2, s->xsum);
    } else if (p[0] == INT8) {
        const float *row = x;
        if (order) {
            for (int64_t i = 0; i < in; ++i) s->gathered[i] = x[order[i]];
            row = s->gathered;
        }
        int8_quantize_row(row, in, group, s->xq, s->xs, s->xzero);
    }
}

/* res [32] = tile t of product p (prepared input `s`, `in` features), before its bias */
static inline void quant_tile(const int64_t *p, int64_t t, int64_t in, const Scratch *s, float *res) {
    const uint8_t *w = (const uint8_t *)p[1];
    const uint16_t *sz = (const uint16_t *)p[2];
    const int64_t group = p[4], groups = in / group;
    if (p[0] == INT8) {
        int8_tile(w + t * in * INT8_TILE, sz + t * groups * 64, s->xq, s->xs, s->xzero, in, groups, group, 1, res);
        return;
    }
#if R1KIT_HAVE_INT4
    int4_tile(w + t * (in / 2) * 32, sz + t * groups * 64, s->x2, s->xsum, in / 2, groups, group / 2, 1, res);
#else
    for (int j = 0; j < 32; ++j) res[j] = NAN;  /* unreachable: decode_step.py builds no int4 product here */
#endif
}

/* 1 where this library runs int4 products (the CPU has AVX512-BF16) */
int decode_step_int4(void) { return R1KIT_HAVE_INT4; }

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
static inline void NAME##_gemv(const T *w, const float *bias, const float *x, T *y, int64_t rows, int64_t in, int mode) { \
    const int64_t blocks = rows / ROWS;                                                                 \
    _Pragma("omp for schedule(static) nowait")                                                          \
    for (int64_t b = 0; b < blocks; ++b) {                                                              \
        float acc[ROWS];                                                                                \
        DOT4(w + b * ROWS * in, in, x, acc);                                                            \
        for (int r = 0; r < ROWS; ++r) {                                                                \
            const int64_t o = b * ROWS + r;                                                             \
            y[o] = mode ? STORE(LOAD(y, o) + ROUND(acc[r])) : STORE(acc[r] + (bias ? bias[o] : 0.0f)); \
        }                                                                                               \
    }                                                                                                   \
    _Pragma("omp for schedule(static)")                                                                 \
    for (int64_t o = blocks * ROWS; o < rows; ++o) {                                                    \
        float acc;                                                                                      \
        DOT1(w + o * in, in, x, &acc);                                                                  \
        y[o] = mode ? STORE(LOAD(y, o) + ROUND(acc)) : STORE(acc + (bias ? bias[o] : 0.0f));      \
    }                                                                                                   \
}                                                                                                       \
/* rows [0, rows) of product p applied to the thread's input s->xf [in], written as _gemv writes them */ \
static inline void NAME##_product(const int64_t *p, Scratch *s, T *y, int64_t rows, int64_t in, int mode) { \
    const float *bias = (const float *)p[5];                                                            \
    if (p[0] == FLOAT) {                                                                                \
        NAME##_gemv((const T *)p[1], bias, s->xf, y, rows, in, mode);                                   \
        return;                                                                                         \
    }                                                                                                   \
    prepare(p, s->xf, in, s);                                                                           \
    _Pragma("omp for schedule(static)")                                                                 \
    for (int64_t t = 0; t < rows / 32; ++t) {                                                           \
        float res[32];                                                                                  \
        quant_tile(p, t, in, s, res);                                                                   \
        for (int j = 0; j < 32; ++j) {                                                                  \
            const int64_t o = t * 32 + j;                                                               \
            y[o] = mode ? STORE(LOAD(y, o) + ROUND(res[j])) : STORE(res[j] + (bias ? bias[o] : 0.0f));  \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
/* hid[j] = silu(gate_j·x)·(up_j·x) for the neurons j of [0, ffn), split over the team; p: the gate    \
 * rows then the up rows, without bias */                                                               \
static inline void NAME##_gate_up(const int64_t *p, Scratch *s, T *hid, int64_t ffn, int64_t in) {      \
    if (p[0] != FLOAT) {                                                                                \
        prepare(p, s->xf, in, s);                                                                       \
        _Pragma("omp for schedule(static)")                                                             \
        for (int64_t t = 0; t < ffn / 32; ++t) {                                                        \
            float g[32], u[32];                                                                         \
            quant_tile(p, t, in, s, g);                                                                 \
            quant_tile(p, ffn / 32 + t, in, s, u);                                                      \
            for (int j = 0; j < 32; ++j) hid[t * 32 + j] = STORE(ROUND(silu(ROUND(g[j]))) * ROUND(u[j])); \
        }                                                                                               \
        return;                                                                                         \
    }                                                                                                   \
    const T *wg = (const T *)p[1], *wu = wg + ffn * in;                                                 \
    const float *x = s->xf;                                                                             \
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
         const T *final_norm, const int64_t *head, int64_t vocab, const T *cos, const T *sin,           \
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
        Scratch s;                                                                                      \
        float *scores = NULL;                                                                           \
        float *qs = (float *)malloc(sizeof(float) * group * dim), *os = (float *)malloc(sizeof(float) * group * dim); \
        float *kr = (float *)malloc(sizeof(float) * dim);                                               \
        int64_t capacity = 0;                                                                           \
        int mine = !scratch_alloc(&s, widest) || !qs || !os || !kr;                                     \
        _Pragma("omp atomic")                                                                           \
        failed |= mine;                                                                                 \
        _Pragma("omp barrier")                                                                          \
        /* read once, after the barrier: every thread takes the same branch, none waits alone at one */ \
        const int ready = !failed;                                                                      \
        for (int64_t l = 0; l < (ready ? num_layers : 0); ++l) {                                        \
            const int64_t *p = layers + l * LAYER_FIELDS, *products = p + 4;                            \
            const T *in_norm = (const T *)p[0], *post_norm = (const T *)p[1];                           \
            T *kp = (T *)p[2], *vp = (T *)p[3];                                                         \
            const int64_t *table = kinds[2 * l] ? table1 : table0, slot = kinds[2 * l] ? slot1 : slot0; \
            const int64_t lo = kinds[2 * l + 1] ? lowest_local : lowest_global, n = context - lo;       \
            NAME##_norm(x, in_norm, s.xf, d, eps);                                                      \
            NAME##_product(products, &s, qkv, width, d, 0);                                             \
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
            for (int64_t i = 0; i < hq * dim; ++i) s.xf[i] = LOAD(att, i);                              \
            NAME##_product(products + PRODUCT_FIELDS, &s, x, d, hq * dim, 1);                           \
            NAME##_norm(x, post_norm, s.xf, d, eps);                                                    \
            NAME##_gate_up(products + 2 * PRODUCT_FIELDS, &s, hid, ffn, d);                             \
            for (int64_t i = 0; i < ffn; ++i) s.xf[i] = LOAD(hid, i);                                   \
            NAME##_product(products + 3 * PRODUCT_FIELDS, &s, x, d, ffn, 1);                            \
        }                                                                                               \
        if (ready) {                                                                                    \
            NAME##_norm(x, final_norm, s.xf, d, eps);                                                   \
            NAME##_product(head, &s, logits, vocab, d, 0);                                              \
        }                                                                                               \
        scratch_free(&s); free(qs); free(os); free(kr); free(scores);                                   \
    }                                                                                                   \
    free(x); free(qkv); free(att); free(hid);                                                           \
    return failed ? 2 : 0;                                                                              \
}

DEFINE_STEP(decode_step_f32, float, load_f32, round_f32, store_f32, dot4_f32, dot1_f32, attend_f32, rope_f32)
DEFINE_STEP(decode_step_bf16, uint16_t, load_bf16, round_bf16, to_bf16, dot4_bf16, dot1_bf16, attend_bf16, rope_bf16)
