/* Paged decode attention's per-task pieces, shared by the attention kernels
 * (paged_decode_attention.c) and the one-call decode step (decode_step.c): one (sequence, KV head)
 * task's attention read from the pool through its block table, and the rotary embedding rounded as
 * PyTorch rounds it. See paged_decode_attention.c for the layout. */
#ifndef R1KIT_PAGED_ATTENTION_H
#define R1KIT_PAGED_ATTENTION_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_GROUP 64

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

DEFINE_TASK(task_f32, float, load_f32)
DEFINE_TASK(task_bf16, uint16_t, load_bf16)
DEFINE_ATTEND(attend_f32, task_f32, float)
DEFINE_ATTEND(attend_bf16, task_bf16, uint16_t)

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

#endif
