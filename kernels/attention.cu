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

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_softmax_forward(float* __restrict__ att, uint64_t rows, uint64_t t, float scale) {
    ESLM_REQUIRE_BLOCK(ATT_THREADS);
    const uint64_t r = (uint64_t)blockIdx.x * ATT_WARPS + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (r >= rows) return;
    const uint64_t i = r % t;
    float* p = att + r * t;
    float m = -INFINITY;
    for (uint64_t j = lane; j <= i; j += 32) m = fmaxf(m, p[j] * scale);
    m = warp_max(m);
    float s = 0.0f;
    for (uint64_t j = lane; j <= i; j += 32) {
        const float e = expf(p[j] * scale - m);
        p[j] = e;
        s += e;
    }
    const float inv = 1.0f / warp_sum(s);
    for (uint64_t j = lane; j < t; j += 32) p[j] = j <= i ? p[j] * inv : 0.0f;
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_softmax_backward(float* __restrict__ datt, const float* __restrict__ att, uint64_t rows, uint64_t t,
                           float scale) {
    ESLM_REQUIRE_BLOCK(ATT_THREADS);
    const uint64_t r = (uint64_t)blockIdx.x * ATT_WARPS + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (r >= rows) return;
    const uint64_t i = r % t;
    float* d = datt + r * t;
    const float* p = att + r * t;
    float dot = 0.0f;
    for (uint64_t j = lane; j <= i; j += 32) dot += p[j] * d[j];
    dot = warp_sum(dot);
    for (uint64_t j = lane; j < t; j += 32) d[j] = j <= i ? p[j] * (d[j] - dot) * scale : 0.0f;
}
