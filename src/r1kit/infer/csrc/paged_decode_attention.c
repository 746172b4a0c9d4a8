/* Decode attention straight from the paged KV pool (see r1kit/infer/decode_attention.py).
 *
 * One query token per sequence. For sequence s and KV head h, the G = Hq / Hkv query heads of that
 * group read the keys and values of positions [lowest[s], contexts[s]) where they live in the pool:
 * position p is slot tables[s][p / block_size] * block_size + p % block_size, and a slot holds
 * Hkv × D values. Nothing is copied out of the pool, and each key and value row is read once for
 * all G heads of its group. Scores go to a per-thread buffer; softmax in float; out = Σ softmax · v.
 * Tasks (s, h) are spread over the OpenMP threads of the runtime torch loaded.
 *
 * paged_decode_rope_attention_* does a decode layer's whole step between the q/k/v projection and the
 * output projection in that one call: from the fused projection's row [Hq + 2·Hkv heads] of each
 * sequence it rotates q and k (RoPE, "rotate half", sin's first half negated as the model passes it),
 * writes k and v into the sequence's new slot, and attends. Each task (s, h) writes only its own head
 * of its own sequence's slot before reading that head's keys, so tasks need no barrier.
 *
 * paged_decode_hybrid_* is a hybrid layer's decode step: each task attends its local branch (positions
 * [lowest[s], contexts[s]) of k/v) and, unless skip[s] (the hard gate sent the sequence to the local
 * branch alone), its global branch over a second range (gk/gv through gtables: the same pool from 0,
 * or the pooled entries [0, gcontexts[s]) of the compressed cache), then mixes them per query head,
 * out = w·local + (1 − w)·global with w = gate[s, head]. A skipped sequence reads no global key.
 * A branch with no position gives zeros (a query before the first complete pooled run).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_GROUP 64

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_value(p[i]); }
static inline float round_f32(float f) { return f; }
static inline uint16_t to_bf16(float f) { return bf16_round(f); }
static inline float round_bf16(float f) { return bf16_value(bf16_round(f)); }
static inline float store_f32(float f) { return f; }

#define DEFINE_TASK(NAME, KV_T, LOAD)                                                                     \
static inline __attribute__((always_inline)) void NAME(                                                 \
    const float *restrict qs, const KV_T *restrict k, const KV_T *restrict v, float *restrict os,       \
    const int64_t *restrict table, int64_t lo, int64_t n, int64_t group, int64_t hkv, int64_t h,        \
    const int64_t dim, int64_t block_size, float scale, float *restrict scores) {                       \
    for (int64_t t = 0; t < n; ++t) {                                                                   \
        const int64_t p = lo + t;                                                                       \
        const KV_T *restrict kr = k + ((table[p / block_size] * block_size + p % block_size) * hkv + h) * dim; \
        for (int64_t g = 0; g < group; ++g) {                                                           \
            const float *restrict qg = qs + g * dim;                                                    \
            float acc = 0.0f;                                                                           \
            for (int64_t d = 0; d < dim; ++d) acc += qg[d] * LOAD(kr, d);                               \
            scores[g * n + t] = acc * scale;                                                            \
        }                                                                                               \
    }                                                                                                   \
    float inv_sum[MAX_GROUP];                                                                           \
    for (int64_t g = 0; g < group; ++g) {                                                               \
        float *restrict sg = scores + g * n, top = sg[0], sum = 0.0f;                                   \
        for (int64_t t = 1; t < n; ++t) top = sg[t] > top ? sg[t] : top;                                \
        for (int64_t t = 0; t < n; ++t) { sg[t] = expf(sg[t] - top); sum += sg[t]; }                    \
        inv_sum[g] = 1.0f / sum;                                                                        \
    }                                                                                                   \
    memset(os, 0, sizeof(float) * group * dim);                                                         \
    for (int64_t t = 0; t < n; ++t) {                                                                   \
        const int64_t p = lo + t;                                                                       \
        const KV_T *restrict vr = v + ((table[p / block_size] * block_size + p % block_size) * hkv + h) * dim; \
        for (int64_t g = 0; g < group; ++g) {                                                           \
            const float w = scores[g * n + t];                                                          \
            float *restrict og = os + g * dim;                                                          \
            for (int64_t d = 0; d < dim; ++d) og[d] += w * LOAD(vr, d);                                 \
        }                                                                                               \
    }                                                                                                   \
    for (int64_t g = 0; g < group; ++g)                                                                 \
        for (int64_t d = 0; d < dim; ++d) os[g * dim + d] *= inv_sum[g];                                \
}

/* One task's attention, growing the thread's score buffer as needed (1: out of memory). The head
 * dimension is a compile-time constant for 64 and 128, so their loops unroll fully. */
#define DEFINE_ATTEND(NAME, TASK, KV_T)                                                                 \
static inline int NAME(const float *qs, const KV_T *k, const KV_T *v, float *os, const int64_t *table,  \
                       int64_t lo, int64_t n, int64_t group, int64_t hkv, int64_t h, int64_t dim,       \
                       int64_t block_size, float scale, float **scores, int64_t *capacity) {            \
    if (n * group > *capacity) {                                                                        \
        free(*scores);                                                                                  \
        *capacity = n * group;                                                                          \
        *scores = (float *)malloc(sizeof(float) * *capacity);                                           \
        if (*scores == NULL) { *capacity = 0; return 1; }                                               \
    }                                                                                                   \
    if (dim == 64)                                                                                      \
        TASK(qs, k, v, os, table, lo, n, group, hkv, h, 64, block_size, scale, *scores);                \
    else if (dim == 128)                                                                                \
        TASK(qs, k, v, os, table, lo, n, group, hkv, h, 128, block_size, scale, *scores);               \
    else                                                                                                \
        TASK(qs, k, v, os, table, lo, n, group, hkv, h, dim, block_size, scale, *scores);               \
    return 0;                                                                                           \
}

#define DEFINE_KERNEL(NAME, ATTEND, KV_T)                                                               \
int NAME(const float *q, const KV_T *k, const KV_T *v, float *out, const int64_t *tables,               \
         int64_t table_width, const int64_t *contexts, const int64_t *lowest, int64_t num_seqs,         \
         int64_t hq, int64_t hkv, int64_t dim, int64_t block_size, float scale) {                       \
    const int64_t group = hq / hkv;                                                                     \
    if (group > MAX_GROUP || group * hkv != hq) return 1;                                               \
    int failed = 0;                                                                                     \
    _Pragma("omp parallel")                                                                             \
    {                                                                                                   \
        float *scores = NULL;                                                                           \
        int64_t capacity = 0;                                                                           \
        _Pragma("omp for schedule(dynamic, 1)")                                                         \
        for (int64_t task = 0; task < num_seqs * hkv; ++task) {                                         \
            const int64_t s = task / hkv, h = task % hkv;                                               \
            const int64_t lo = lowest[s], n = contexts[s] - lo;                                         \
            const float *qs = q + (s * hq + h * group) * dim;                                           \
            float *os = out + (s * hq + h * group) * dim;                                               \
            if (n <= 0) { memset(os, 0, sizeof(float) * group * dim); continue; }                       \
            if (ATTEND(qs, k, v, os, tables + s * table_width, lo, n, group, hkv, h, dim, block_size, scale,\
                       &scores, &capacity))                                                             \
                failed = 1;                                                                             \
        }                                                                                               \
        free(scores);                                                                                   \
    }                                                                                                   \
    return failed ? 2 : 0;                                                                              \
}

DEFINE_TASK(task_f32, float, load_f32)
DEFINE_TASK(task_bf16, uint16_t, load_bf16)
DEFINE_ATTEND(attend_f32, task_f32, float)
DEFINE_ATTEND(attend_bf16, task_bf16, uint16_t)
DEFINE_KERNEL(paged_decode_attention_f32, attend_f32, float)
DEFINE_KERNEL(paged_decode_attention_bf16, attend_bf16, uint16_t)

/* rope(x)[d] = x[d]·cos[d] + x[d ± D/2]·sin[d] into float, each product and the sum rounded to the
 * element type as PyTorch's `x * cos + x.roll(D/2) * sin` rounds them, and with no fused multiply-add
 * (-ffast-math would contract one here), so float32 K/V match the two-call path bit for bit too. */
#define DEFINE_ROPE(NAME, T, LOAD, ROUND)                                                               \
static __attribute__((noinline, optimize("fp-contract=off"))) void NAME(const T *x, const T *c, const T *sn,\
                                                                      int64_t dim, float *out) {        \
    const int64_t half = dim / 2;                                                                       \
    for (int64_t d = 0; d < dim; ++d) {                                                                 \
        const int64_t o = d < half ? d + half : d - half;                                               \
        const float a = ROUND(LOAD(x, d) * LOAD(c, d)), b = ROUND(LOAD(x, o) * LOAD(sn, d));            \
        out[d] = ROUND(a + b);                                                                          \
    }                                                                                                   \
}

DEFINE_ROPE(rope_f32, float, load_f32, round_f32)
DEFINE_ROPE(rope_bf16, uint16_t, load_bf16, round_bf16)

#define DEFINE_FUSED(NAME, ATTEND, ROPE, T, STORE)                                                  \
int NAME(const T *qkv, const T *cos, const T *sin, T *k_pool, T *v_pool, const int64_t *slots, T *out,   \
         const int64_t *tables, int64_t table_width, const int64_t *contexts, const int64_t *lowest,    \
         int64_t num_seqs, int64_t hq, int64_t hkv, int64_t dim, int64_t block_size, float scale) {     \
    const int64_t group = hq / hkv, width = (hq + 2 * hkv) * dim;                                       \
    if (group > MAX_GROUP || group * hkv != hq || dim % 2) return 1;                                    \
    int failed = 0;                                                                                     \
    _Pragma("omp parallel")                                                                             \
    {                                                                                                   \
        float *scores = NULL;                                                                           \
        int64_t capacity = 0;                                                                           \
        float *qs = (float *)malloc(sizeof(float) * group * dim), *os = (float *)malloc(sizeof(float) * group * dim);\
        float *kr = (float *)malloc(sizeof(float) * dim);                                               \
        _Pragma("omp for schedule(dynamic, 1)")                                                         \
        for (int64_t task = 0; task < num_seqs * hkv; ++task) {                                         \
            if (qs == NULL || os == NULL || kr == NULL) { failed = 1; continue; }                       \
            const int64_t s = task / hkv, h = task % hkv;                                               \
            const T *row = qkv + s * width, *c = cos + s * dim, *sn = sin + s * dim;                    \
            const T *kin = row + (hq + h) * dim, *vin = row + (hq + hkv + h) * dim;                     \
            T *kout = k_pool + (slots[s] * hkv + h) * dim, *vout = v_pool + (slots[s] * hkv + h) * dim; \
            ROPE(kin, c, sn, dim, kr);                                                                  \
            for (int64_t d = 0; d < dim; ++d) {                                                         \
                kout[d] = STORE(kr[d]);                                                                 \
                vout[d] = vin[d];                                                                       \
            }                                                                                           \
            for (int64_t g = 0; g < group; ++g) ROPE(row + (h * group + g) * dim, c, sn, dim, qs + g * dim);\
            const int64_t lo = lowest[s], n = contexts[s] - lo;                                         \
            T *dst = out + (s * hq + h * group) * dim;                                                  \
            if (n <= 0) { memset(dst, 0, sizeof(T) * group * dim); continue; }                          \
            if (ATTEND(qs, k_pool, v_pool, os, tables + s * table_width, lo, n, group, hkv, h, dim, block_size,\
                       scale, &scores, &capacity)) { failed = 1; continue; }                            \
            for (int64_t i = 0; i < group * dim; ++i) dst[i] = STORE(os[i]);                            \
        }                                                                                               \
        free(scores);                                                                                   \
        free(qs);                                                                                       \
        free(os);                                                                                       \
        free(kr);                                                                                       \
    }                                                                                                   \
    return failed ? 2 : 0;                                                                              \
}

DEFINE_FUSED(paged_decode_rope_attention_f32, attend_f32, rope_f32, float, store_f32)
DEFINE_FUSED(paged_decode_rope_attention_bf16, attend_bf16, rope_bf16, uint16_t, to_bf16)

#define DEFINE_HYBRID(NAME, ATTEND, KV_T)                                                                 \
int NAME(const float *q, const KV_T *k, const KV_T *v, const int64_t *tables, int64_t table_width,      \
         const int64_t *contexts, const int64_t *lowest, int64_t block_size,                            \
         const KV_T *gk, const KV_T *gv, const int64_t *gtables, int64_t gtable_width,                  \
         const int64_t *gcontexts, const int64_t *glowest, int64_t gblock_size,                         \
         const float *gate, const int64_t *skip, float *out, int64_t num_seqs, int64_t hq, int64_t hkv,   \
         int64_t dim, float scale) {                                                                    \
    const int64_t group = hq / hkv;                                                                     \
    if (group > MAX_GROUP || group * hkv != hq) return 1;                                               \
    int failed = 0;                                                                                     \
    _Pragma("omp parallel")                                                                             \
    {                                                                                                   \
        float *scores = NULL;                                                                           \
        int64_t capacity = 0;                                                                           \
        float *glob = (float *)malloc(sizeof(float) * group * dim);                                     \
        _Pragma("omp for schedule(dynamic, 1)")                                                         \
        for (int64_t task = 0; task < num_seqs * hkv; ++task) {                                         \
            if (glob == NULL) { failed = 1; continue; }                                                 \
            const int64_t s = task / hkv, h = task % hkv;                                               \
            const float *qs = q + (s * hq + h * group) * dim;                                           \
            float *os = out + (s * hq + h * group) * dim;                                               \
            const int64_t lo = lowest[s], n = contexts[s] - lo;                                         \
            if (n <= 0) memset(os, 0, sizeof(float) * group * dim);                                     \
            else if (ATTEND(qs, k, v, os, tables + s * table_width, lo, n, group, hkv, h, dim, block_size, \
                            scale, &scores, &capacity)) { failed = 1; continue; }                       \
            if (skip[s]) continue;                                                                      \
            const int64_t glo = glowest[s], gn = gcontexts[s] - glo;                                    \
            if (gn <= 0) memset(glob, 0, sizeof(float) * group * dim);                                  \
            else if (ATTEND(qs, gk, gv, glob, gtables + s * gtable_width, glo, gn, group, hkv, h, dim,  \
                            gblock_size, scale, &scores, &capacity)) { failed = 1; continue; }          \
            for (int64_t g = 0; g < group; ++g) {                                                       \
                const float w = gate[s * hq + h * group + g];                                           \
                for (int64_t d = 0; d < dim; ++d)                                                       \
                    os[g * dim + d] = w * os[g * dim + d] + (1.0f - w) * glob[g * dim + d];             \
            }                                                                                           \
        }                                                                                               \
        free(scores);                                                                                   \
        free(glob);                                                                                     \
    }                                                                                                   \
    return failed ? 2 : 0;                                                                              \
}

DEFINE_HYBRID(paged_decode_hybrid_f32, attend_f32, float)
DEFINE_HYBRID(paged_decode_hybrid_bf16, attend_bf16, uint16_t)
