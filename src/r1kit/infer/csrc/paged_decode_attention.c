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
#include "paged_attention.h"

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

DEFINE_KERNEL(paged_decode_attention_f32, attend_f32, float)
DEFINE_KERNEL(paged_decode_attention_bf16, attend_bf16, uint16_t)

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
