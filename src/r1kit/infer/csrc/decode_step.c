/* One decode step of a batch of sequences through the whole model in one call (see r1kit/infer/decode_step.py).
 *
 * A thin, deep model decoding a few sequences is a chain of small matrix products: a per-layer round
 * trip through Python and a dispatch per operation costs as much as streaming a layer's weights. Here
 * the step runs in one OpenMP region: the embedding rows, then for each layer RMSNorm, the fused
 * q/k/v product (+ bias), RoPE, the K/V write into the paged pool and attention (the tasks of
 * paged_attention.h, one per sequence and KV head), the output product added to the residual, RMSNorm,
 * the fused gate/up product with SiLU(gate)·up, the down product added to the residual; then the final
 * norm and the output head. Every product reads its weight as one stream (panels of rows, each read
 * once for up to FLOAT_ROWS sequences, the rest re-reading it from cache; a quantized product's tiles
 * once for QUANT_ROWS); the threads split the output rows, and each thread normalises the residuals
 * (and applies SwiGLU to the gate/up products) itself, a few hundred values a sequence, so no barrier
 * waits on them. Values are rounded to the model's element type where PyTorch's modules round them
 * (bfloat16: after each product, norm, activation and residual add), accumulations are in float, and
 * each sum runs in one order whatever the batch, so a sequence's logits do not depend on its batch.
 *
 * A product (q/k/v, output, gate/up, down, the head) is PRODUCT_FIELDS integers: its kind (0: float
 * weights of the model's type in panels of PANEL rows, decode_step.py's `interleave`; 4 or 8: GPTQ codes
 * in the layout of r1kit's int4 or int8 CPU kernel, whose tiles it calls, int4_tile.h and int8_tile.h),
 * the weight, the scales and zeros, the input order or 0, the group size, a float32 bias or 0. A gate/up
 * product holds the gate's rows then the up's. A quantized product's input rows are prepared (rounded
 * to bfloat16 pairs, or quantized to int8 blocks) by every thread for itself, as the norms are.
 * layers: per layer 4 pointers (input norm, post norm, K pool, V pool) and 4 products (q/k/v, output,
 * gate/up, down); kinds: per layer 2 integers (its table group, 1 for a local layer); per step: each
 * sequence's SEQ_FIELDS integers, its cos/sin [D] and its block table in each group (rows of a table
 * `stride` wide). The embedding table is plain.
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
#define SEQ_FIELDS 6    /* per sequence: token, context length, lowest global and local position, new slot in each group */
#define PANEL 16        /* weight rows per panel of a float product (one vector of outputs) */
#define FLOAT_ROWS 8    /* sequences per pass over a panel: two accumulators each, 16 of the 32 vector registers */
#define QUANT_ROWS 4    /* sequences per pass over a tile of a quantized product (the int4/int8 tiles' most) */
enum { FLOAT = 0, INT4 = 4, INT8 = 8 };

/* one thread's buffers: its float input rows (one per sequence) and those rows as a quantized product reads them */
typedef struct {
    float *xf, *gathered, *xsum, *xs, *xzero;
    uint32_t *x2;
    int8_t *xq;
} Scratch;

static int scratch_alloc(Scratch *s, int64_t batch, int64_t widest) {
    const size_t n = (size_t)(batch * widest);
    s->xf = (float *)malloc(sizeof(float) * n);
    s->gathered = (float *)malloc(sizeof(float) * widest);
    s->xsum = (float *)malloc(sizeof(float) * n);
    s->xs = (float *)malloc(sizeof(float) * n);
    s->xzero = (float *)malloc(sizeof(float) * n);
    s->x2 = (uint32_t *)malloc(sizeof(uint32_t) * n);
    s->xq = (int8_t *)malloc(n);
    return s->xf && s->gathered && s->xsum && s->xs && s->xzero && s->x2 && s->xq;
}

static void scratch_free(Scratch *s) {
    free(s->xf); free(s->gathered); free(s->xsum); free(s->xs); free(s->xzero); free(s->x2); free(s->xq);
}

/* the thread's input rows x [batch, in] as product p's kernel reads them (nothing to do for float weights) */
static inline void prepare(const int64_t *p, const float *x, int64_t batch, int64_t in, Scratch *s) {
    const int64_t group = p[4], groups = group ? in / group : 0;
    const int64_t *order = (const int64_t *)p[3];
    for (int64_t r = 0; r < batch; ++r) {
        const float *row = x + r * in;
        if (p[0] == INT4) {
            int4_prepare_row(row, in, group, order, s->x2 + r * (in / 2), s->xsum + r * groups);
        } else if (p[0] == INT8) {
            if (order) {
                for (int64_t i = 0; i < in; ++i) s->gathered[i] = row[order[i]];
                row = s->gathered;
            }
            int8_quantize_row(row, in, group, s->xq + r * in, s->xs + r * (in / INT8_BLOCK), s->xzero + r * groups);
        }
    }
}

/* res [n, 32] = tile t of product p for the prepared rows [r0, r0 + n) (`in` features), before its bias */
static inline void quant_tile(const int64_t *p, int64_t t, int64_t in, const Scratch *s, int64_t r0, int n, float *res) {
    const uint8_t *w = (const uint8_t *)p[1];
    const uint16_t *sz = (const uint16_t *)p[2];
    const int64_t group = p[4], groups = in / group;
    if (p[0] == INT8) {
        int8_tile(w + t * in * INT8_TILE, sz + t * groups * 64, s->xq + r0 * in, s->xs + r0 * (in / INT8_BLOCK), s->xzero + r0 * groups, in,
                  groups, group, n, res);
        return;
    }
#if R1KIT_HAVE_INT4
    int4_tile(w + t * (in / 2) * 32, sz + t * groups * 64, s->x2 + r0 * (in / 2), s->xsum + r0 * groups, in / 2, groups, group / 2, n, res);
#else
    for (int j = 0; j < n * 32; ++j) res[j] = NAN;  /* unreachable: decode_step.py builds no int4 product here */
#endif
}

/* 1 where this library runs int4 products (the CPU has AVX512-BF16) */
int decode_step_int4(void) { return R1KIT_HAVE_INT4; }

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* out [n, PANEL] = one panel of PANEL rows of a float weight (see decode_step.py's `interleave`: for
 * each input feature, the panel's PANEL weights side by side, so a panel is one sequential stream of
 * memory) times the n (1..FLOAT_ROWS) rows of x [n, in]: per feature, one vector of weights and each
 * row's value broadcast, into two accumulators a row (even and odd features: one chain of dependent
 * multiply-adds would bound a lone row). Each sum runs in the same order whatever n is, so a
 * sequence's results do not depend on the batch it decodes in. */
#ifdef __AVX512F__
static inline __m512 wload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 wload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define DEFINE_PANEL(NAME, W_T, WLOAD)                                                                    \
static inline __attribute__((always_inline)) void NAME##_rows(const W_T *restrict w, int64_t in,        \
                                                              const float *restrict x, const int n, float *out) { \
    __m512 even[FLOAT_ROWS], odd[FLOAT_ROWS];                                                           \
    for (int r = 0; r < FLOAT_ROWS; ++r) even[r] = odd[r] = _mm512_setzero_ps();                        \
    for (int64_t i = 0; i < in; i += 2) {                                                               \
        const __m512 w0 = WLOAD(w + i * PANEL), w1 = WLOAD(w + (i + 1) * PANEL);                        \
        for (int r = 0; r < n; ++r) {                                                                   \
            even[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[r * in + i]), even[r]);                      \
            odd[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[r * in + i + 1]), odd[r]);                    \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < n; ++r) _mm512_storeu_ps(out + r * PANEL, _mm512_add_ps(even[r], odd[r]));      \
}
DEFINE_PANEL(panel_f32, float, wload_f32)
DEFINE_PANEL(panel_bf16, uint16_t, wload_bf16)
#else
#define DEFINE_PANEL(NAME, W_T, LOAD)                                                                     \
static inline void NAME##_rows(const W_T *restrict w, int64_t in, const float *restrict x, const int n, float *out) { \
    for (int r = 0; r < n; ++r)                                                                         \
        for (int j = 0; j < PANEL; ++j) {                                                               \
            float even = 0.0f, odd = 0.0f;                                                              \
            for (int64_t i = 0; i < in; i += 2) {                                                       \
                even += LOAD(w, i * PANEL + j) * x[r * in + i];                                         \
                odd += LOAD(w, (i + 1) * PANEL + j) * x[r * in + i + 1];                                \
            }                                                                                           \
            out[r * PANEL + j] = even + odd;                                                            \
        }                                                                                               \
}
DEFINE_PANEL(panel_f32, float, load_f32)
DEFINE_PANEL(panel_bf16, uint16_t, load_bf16)
#endif

/* constant row counts, so the row loops unroll and the accumulators stay in registers */
#define DEFINE_PANEL_SWITCH(NAME, W_T)                                                                   \
static inline void NAME(const W_T *w, int64_t in, const float *x, int n, float *out) {                  \
    switch (n) {                                                                                        \
        case 1: NAME##_rows(w, in, x, 1, out); break;                                                   \
        case 2: NAME##_rows(w, in, x, 2, out); break;                                                   \
        case 3: NAME##_rows(w, in, x, 3, out); break;                                                   \
        case 4: NAME##_rows(w, in, x, 4, out); break;                                                   \
        case 5: NAME##_rows(w, in, x, 5, out); break;                                                   \
        case 6: NAME##_rows(w, in, x, 6, out); break;                                                   \
        case 7: NAME##_rows(w, in, x, 7, out); break;                                                   \
        default: NAME##_rows(w, in, x, 8, out); break;                                                  \
    }                                                                                                   \
}
DEFINE_PANEL_SWITCH(panel_f32, float)
DEFINE_PANEL_SWITCH(panel_bf16, uint16_t)

/* the rows after the last whole panel are stored plain, row after row */
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

static inline int chunk(int64_t batch, int64_t r0, int most) { return batch - r0 < most ? (int)(batch - r0) : most; }

#define DEFINE_STEP(NAME, T, LOAD, ROUND, STORE, DOT, DOT1, ATTEND, ROPE)                                \
/* y = x·rsqrt(mean(x²) + eps), rounded, then ·w, rounded (the model's RMSNorm), into float; for each   \
 * of the batch's rows of x [batch, d] */                                                               \
static inline void NAME##_norm(const T *x, const T *w, float *y, int64_t batch, int64_t d, float eps) {  \
    for (int64_t r = 0; r < batch; ++r, x += d, y += d) {                                               \
        float squares = 0.0f;                                                                           \
        for (int64_t i = 0; i < d; ++i) squares += LOAD(x, i) * LOAD(x, i);                             \
        const float inv = 1.0f / sqrtf(squares / (float)d + eps);                                       \
        for (int64_t i = 0; i < d; ++i) y[i] = ROUND(LOAD(w, i) * ROUND(LOAD(x, i) * inv));             \
    }                                                                                                   \
}                                                                                                       \
/* count outputs [o, o + count) of a product, acc, into y from element i: mode 0: round(acc + bias);    \
 * mode 1: round(y + round(acc)) (a residual add); mode 2: round(acc) kept in float (no bias). The mode \
 * is chosen once, outside the loops, so each loop vectorizes. */                                       \
static inline void NAME##_emit(void *y, int64_t i, const float *acc, const float *bias, int64_t o, int count, int mode) { \
    if (mode == 2) {                                                                                    \
        float *out = (float *)y + i;                                                                    \
        for (int j = 0; j < count; ++j) out[j] = ROUND(acc[j]);                                         \
    } else if (mode == 1) {                                                                             \
        T *out = (T *)y + i;                                                                            \
        for (int j = 0; j < count; ++j) out[j] = STORE(LOAD(out, j) + ROUND(acc[j]));                   \
    } else if (bias) {                                                                                  \
        T *out = (T *)y + i;                                                                            \
        for (int j = 0; j < count; ++j) out[j] = STORE(acc[j] + bias[o + j]);                           \
    } else {                                                                                            \
        T *out = (T *)y + i;                                                                            \
        for (int j = 0; j < count; ++j) out[j] = STORE(acc[j]);                                         \
    }                                                                                                   \
}                                                                                                       \
/* y [batch, rows] = x [batch, in] · w[0, rows)ᵀ (+ bias), the panels split over the team, each read    \
 * once for FLOAT_ROWS sequences */                                                                     \
static inline void NAME##_gemv(const T *w, const float *bias, const float *x, void *y, int64_t batch, int64_t rows, int64_t in, \
                               int mode) {                                                              \
    const int64_t panels = rows / PANEL;                                                                \
    _Pragma("omp for schedule(static) nowait")                                                          \
    for (int64_t b = 0; b < panels; ++b) {                                                              \
        for (int64_t r0 = 0; r0 < batch; r0 += FLOAT_ROWS) {                                            \
            const int n = chunk(batch, r0, FLOAT_ROWS);                                                 \
            float acc[FLOAT_ROWS * PANEL];                                                              \
            DOT(w + b * PANEL * in, in, x + r0 * in, n, acc);                                           \
            for (int r = 0; r < n; ++r) NAME##_emit(y, (r0 + r) * rows + b * PANEL, acc + r * PANEL, bias, b * PANEL, PANEL, mode); \
        }                                                                                               \
    }                                                                                                   \
    _Pragma("omp for schedule(static)")                                                                 \
    for (int64_t o = panels * PANEL; o < rows; ++o)                                                     \
        for (int64_t r = 0; r < batch; ++r) {                                                           \
            float acc;                                                                                  \
            DOT1(w + o * in, in, x + r * in, &acc);                                                     \
            NAME##_emit(y, r * rows + o, &acc, bias, o, 1, mode);                                       \
        }                                                                                               \
}                                                                                                       \
/* outputs [0, rows) of product p applied to the thread's input rows s->xf [batch, in], written into    \
 * y [batch, rows] as _emit writes them */                                                              \
static inline void NAME##_product(const int64_t *p, Scratch *s, void *y, int64_t batch, int64_t rows, int64_t in, int mode) { \
    const float *bias = (const float *)p[5];                                                            \
    if (p[0] == FLOAT) {                                                                                \
        NAME##_gemv((const T *)p[1], bias, s->xf, y, batch, rows, in, mode);                            \
        return;                                                                                         \
    }                                                                                                   \
    prepare(p, s->xf, batch, in, s);                                                                    \
    _Pragma("omp for schedule(static)")                                                                 \
    for (int64_t t = 0; t < rows / 32; ++t) {                                                           \
        for (int64_t r0 = 0; r0 < batch; r0 += QUANT_ROWS) {                                            \
            const int n = chunk(batch, r0, QUANT_ROWS);                                                 \
            float res[QUANT_ROWS * 32];                                                                 \
            quant_tile(p, t, in, s, r0, n, res);                                                        \
            for (int r = 0; r < n; ++r) NAME##_emit(y, (r0 + r) * rows + t * 32, res + r * 32, bias, t * 32, 32, mode); \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
/* out [16] = round(round(silu(round(g))) · round(u)) (the model's SwiGLU, rounded where PyTorch        \
 * rounds it), for 16 neurons: every value takes the same (vectorized) path, so a neuron's value does   \
 * not depend on where it falls in a loop, nor a sequence's logits on its batch */                      \
static __attribute__((noinline)) void NAME##_swiglu16(const float *restrict g, const float *restrict u, float *restrict out) { \
    for (int j = 0; j < 16; ++j) out[j] = ROUND(ROUND(silu(ROUND(g[j]))) * ROUND(u[j]));                \
}                                                                                                       \
/* the down product's input rows x [batch, ffn] from gu [batch, 2, ffn], each row's gate products then    \
 * its up products (ffn a multiple of 16) */                       \
static inline void NAME##_activate(const float *gu, float *x, int64_t batch, int64_t ffn) {             \
    for (int64_t r = 0; r < batch; ++r)                                                                 \
        for (int64_t j = 0; j < ffn; j += 16) NAME##_swiglu16(gu + r * 2 * ffn + j, gu + (r * 2 + 1) * ffn + j, x + r * ffn + j); \
}                                                                                                       \
int NAME(const int64_t *layers, const int64_t *kinds, int64_t num_layers, int64_t batch, const int64_t *seqs, const T *embed, \
         const T *final_norm, const int64_t *head, int64_t vocab, const T *cos, const T *sin,           \
         const int64_t *tables0, int64_t stride0, const int64_t *tables1, int64_t stride1, float *logits, \
         int64_t d, int64_t hq, int64_t hkv, int64_t dim, int64_t ffn, int64_t block_size, float eps,  \
         float scale) {                                                                                 \
    const int64_t group = hq / hkv, width = (hq + 2 * hkv) * dim, widest = d > ffn ? (d > hq * dim ? d : hq * dim) : (ffn > hq * dim ? ffn : hq * dim); \
    if (group > MAX_GROUP || group * hkv != hq || dim % 2) return 1;                                    \
    T *x = (T *)malloc(sizeof(T) * batch * d), *qkv = (T *)malloc(sizeof(T) * batch * width);           \
    T *att = (T *)malloc(sizeof(T) * batch * hq * dim);                                                \
    float *gu = (float *)malloc(sizeof(float) * batch * 2 * ffn);    \
    if (!x || !qkv || !att || !gu) { free(x); free(qkv); free(att); free(gu); return 2; }             \
    for (int64_t r = 0; r < batch; ++r) memcpy(x + r * d, embed + seqs[r * SEQ_FIELDS] * d, sizeof(T) * d); \
    int failed = 0;                                                                                     \
    _Pragma("omp parallel")                                                                             \
    {                                                                                                   \
        Scratch s;                                                                                      \
        float *scores = NULL;                                                                           \
        float *qs = (float *)malloc(sizeof(float) * group * dim), *os = (float *)malloc(sizeof(float) * group * dim); \
        float *kr = (float *)malloc(sizeof(float) * dim);                                               \
        int64_t capacity = 0;                                                                           \
        int mine = !scratch_alloc(&s, batch, widest) || !qs || !os || !kr;                              \
        _Pragma("omp atomic")                                                                           \
        failed |= mine;                                                                                 \
        _Pragma("omp barrier")                                                                          \
        /* read once, after the barrier: every thread takes the same branch, none waits alone at one */ \
        const int ready = !failed;                                                                      \
        for (int64_t l = 0; l < (ready ? num_layers : 0); ++l) {                                        \
            const int64_t *p = layers + l * LAYER_FIELDS, *products = p + 4;                            \
            const T *in_norm = (const T *)p[0], *post_norm = (const T *)p[1];                           \
            T *kp = (T *)p[2], *vp = (T *)p[3];                                                         \
            NAME##_norm(x, in_norm, s.xf, batch, d, eps);                                               \
            NAME##_product(products, &s, qkv, batch, width, d, 0);                                      \
            _Pragma("omp for schedule(static)")                                                         \
            for (int64_t task = 0; task < batch * hkv; ++task) {                                        \
                const int64_t r = task / hkv, h = task % hkv, *seq = seqs + r * SEQ_FIELDS;             \
                const int64_t *table = kinds[2 * l] ? tables1 + r * stride1 : tables0 + r * stride0;    \
                const int64_t slot = kinds[2 * l] ? seq[5] : seq[4];                                    \
                const int64_t lo = kinds[2 * l + 1] ? seq[3] : seq[2], n = seq[1] - lo;                 \
                const T *row = qkv + r * width, *c = cos + r * dim, *sn = sin + r * dim;                \
                T *kout = kp + (slot * hkv + h) * dim, *vout = vp + (slot * hkv + h) * dim;             \
                ROPE(row + (hq + h) * dim, c, sn, dim, kr);                                             \
                for (int64_t i = 0; i < dim; ++i) {                                                     \
                    kout[i] = STORE(kr[i]);                                                             \
                    vout[i] = row[(hq + hkv + h) * dim + i];                                            \
                }                                                                                       \
                for (int64_t g = 0; g < group; ++g) ROPE(row + (h * group + g) * dim, c, sn, dim, qs + g * dim); \
                T *dst = att + (r * hq + h * group) * dim;                                              \
                if (n <= 0) { memset(dst, 0, sizeof(T) * group * dim); continue; }                      \
                if (ATTEND(qs, kp, vp, os, table, lo, n, group, hkv, h, dim, block_size, scale, &scores, &capacity)) { \
                    _Pragma("omp atomic")                                                               \
                    failed |= 1;                                                                        \
                    continue;                                                                           \
                }                                                                                       \
                for (int64_t i = 0; i < group * dim; ++i) dst[i] = STORE(os[i]);                        \
            }                                                                                           \
            for (int64_t i = 0; i < batch * hq * dim; ++i) s.xf[i] = LOAD(att, i);                      \
            NAME##_product(products + PRODUCT_FIELDS, &s, x, batch, d, hq * dim, 1);                    \
            NAME##_norm(x, post_norm, s.xf, batch, d, eps);                                             \
            NAME##_product(products + 2 * PRODUCT_FIELDS, &s, gu, batch, 2 * ffn, d, 2);                \
            NAME##_activate(gu, s.xf, batch, ffn);                                                      \
            NAME##_product(products + 3 * PRODUCT_FIELDS, &s, x, batch, d, ffn, 1);                     \
        }                                                                                               \
        if (ready) {                                                                                    \
            NAME##_norm(x, final_norm, s.xf, batch, d, eps);                                            \
            NAME##_product(head, &s, logits, batch, vocab, d, 2);                                       \
        }                                                                                               \
        scratch_free(&s); free(qs); free(os); free(kr); free(scores);                                   \
    }                                                                                                   \
    free(x); free(qkv); free(att); free(gu);                                                           \
    return failed ? 2 : 0;                                                                              \
}

DEFINE_STEP(decode_step_f32, float, load_f32, round_f32, store_f32, panel_f32, dot1_f32, attend_f32, rope_f32)
DEFINE_STEP(decode_step_bf16, uint16_t, load_bf16, round_bf16, to_bf16, panel_bf16, dot1_bf16, attend_bf16, rope_bf16)
