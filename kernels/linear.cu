/*
 * linear.cu: the bias parts of a linear layer y = x W^T + b (the products are cuBLAS SGEMMs in
 * crates/eslm-gpt2/src/backend/cuda/mod.rs). CPU counterpart: crates/eslm-gpt2/src/ops/linear.rs.
 *
 *     bias_forward:        y[i, :] = b                                  (then the GEMM adds x W^T with beta = 1)
 *     colsum_partial:      partial[q, col] = sum of dy[j, col] over the rows j of chunk q (ESLM_COLSUM_ROWS rows)
 *     colsum_reduce_add:   db[col] += sum over chunks q, in order, of partial[q, col]
 *
 * The bias gradient is a deterministic column sum over the kept rows (compact dy [K, out]).
 *
 * Launch: ESLM_EW_THREADS threads per block; bias_forward grid-stride; colsum_partial grid
 * (ceil(width / threads), chunks); colsum_reduce_add grid-stride over columns.
 */
#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS

/* bf16 twins: y / dy in bf16, b and the partials f32 (common.cuh, ESLM_TWINS). */
#define BIAS_PARAMS(A) A *__restrict__ y, const float *__restrict__ b, uint64_t n, uint64_t width
template <typename A>
__device__ __forceinline__ void bias_forward_t(BIAS_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = n * width;
    for (uint64_t i = gs_start(); i < total; i += gs_stride()) st(y + i, b[i % width]);
}
ESLM_TWINS(bias_forward, EW_THREADS, BIAS_PARAMS, (y, b, n, width))

#define COLSUM_PARAMS(A) float *__restrict__ partial, const A *__restrict__ dy, uint64_t k, uint64_t width
template <typename A>
__device__ __forceinline__ void colsum_partial_t(COLSUM_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t col = (uint64_t)blockIdx.x * EW_THREADS + threadIdx.x;
    if (col >= width) return;
    const uint64_t j0 = (uint64_t)blockIdx.y * ESLM_COLSUM_ROWS;
    const uint64_t j1 = min(k, j0 + ESLM_COLSUM_ROWS);
    float acc = 0.0f;
    for (uint64_t j = j0; j < j1; ++j) acc += ld(dy + j * width + col);
    partial[blockIdx.y * width + col] = acc;
}
ESLM_TWINS(colsum_partial, EW_THREADS, COLSUM_PARAMS, (partial, dy, k, width))

extern "C" __global__ void __launch_bounds__(EW_THREADS)
colsum_reduce_add(float* __restrict__ dst, const float* __restrict__ partial, uint64_t chunks, uint64_t width) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    column_reduce_add_body(dst, partial, chunks, width);
}
