/*
 * attention.cu: the causal softmax of multi-head attention, forward and backward. CPU counterpart:
 * crates/eslm-gpt2/src/ops/attention.rs.
 *
 * llm.c style: the products S = Q K^T, Y = P V and, backward, dP = dY V^T, dQ = dS K, dK = dS^T Q, dV = P^T dY
 * are cuBLAS strided-batched SGEMMs (crates/eslm-gpt2/src/backend/cuda/mod.rs, batched over the heads of one
 * sequence); these kernels do the row-wise parts in place on the [B, H, T, T] buffer, one warp per row
 * (row r = ((b * H + h) * T + i), query position i = r mod T):
 *
 *     softmax forward (att holds S on entry, P on exit; stored for the backward like the CPU backend):
 *         P[i, j] = exp(S[i, j] * scale - m) / sum_{j' <= i} exp(S[i, j'] * scale - m)   (j <= i),  0 (j > i)
 *         with m = max_{j <= i} S[i, j] * scale, scale = 1 / sqrt(hs)
 *     softmax backward (datt holds dP on entry, dS on exit):
 *         dS[i, j] = P[i, j] * (dP[i, j] - sum_j' P[i, j'] dP[i, j']) * scale   (j <= i),  0 (j > i)
 *
 * Launch: ESLM_ATT_THREADS threads per block (ESLM_ATT_THREADS / 32 rows), grid ceil(rows / warps).
 */
#include <math.h>

#include "common.cuh"

#define ATT_THREADS ESLM_ATT_THREADS
#define ATT_WARPS (ATT_THREADS / 32)
static_assert(ATT_THREADS % 32 == 0, "attention: whole warps");

/* bf16 twins (common.cuh, ESLM_TWINS): att / datt in bf16. The forward keeps the unnormalised exponentials in
 * registers' precision only through the row sum: each e is stored (rounded) and re-read for the final scaling,
 * as in the f32 kernel, so the bf16 probabilities are round(round(e) / s). */
#define SOFTMAX_FORWARD_PARAMS(A) A *__restrict__ att, uint64_t rows, uint64_t t, float scale
template <typename A>
__device__ __forceinline__ void attention_softmax_forward_t(SOFTMAX_FORWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(ATT_THREADS);
    const uint64_t r = (uint64_t)blockIdx.x * ATT_WARPS + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (r >= rows) return;
    const uint64_t i = r % t;
    A* p = att + r * t;
    float m = -INFINITY;
    for (uint64_t j = lane; j <= i; j += 32) m = fmaxf(m, ld(p + j) * scale);
    m = warp_max(m);
    float s = 0.0f;
    for (uint64_t j = lane; j <= i; j += 32) {
        const float e = expf(ld(p + j) * scale - m);
        st(p + j, e);
        s += e;
    }
    const float inv = 1.0f / warp_sum(s);
    for (uint64_t j = lane; j < t; j += 32) st(p + j, j <= i ? ld(p + j) * inv : 0.0f);
}
ESLM_TWINS(attention_softmax_forward, ATT_THREADS, SOFTMAX_FORWARD_PARAMS, (att, rows, t, scale))

#define SOFTMAX_BACKWARD_PARAMS(A)                                                                             \
    A *__restrict__ datt, const A *__restrict__ att, uint64_t rows, uint64_t t, float scale
template <typename A>
__device__ __forceinline__ void attention_softmax_backward_t(SOFTMAX_BACKWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(ATT_THREADS);
    const uint64_t r = (uint64_t)blockIdx.x * ATT_WARPS + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (r >= rows) return;
    const uint64_t i = r % t;
    A* d = datt + r * t;
    const A* p = att + r * t;
    float dot = 0.0f;
    for (uint64_t j = lane; j <= i; j += 32) dot += ld(p + j) * ld(d + j);
    dot = warp_sum(dot);
    for (uint64_t j = lane; j < t; j += 32) st(d + j, j <= i ? ld(p + j) * (ld(d + j) - dot) * scale : 0.0f);
}
ESLM_TWINS(attention_softmax_backward, ATT_THREADS, SOFTMAX_BACKWARD_PARAMS, (datt, att, rows, t, scale))
