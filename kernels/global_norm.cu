/*
 * global_norm.cu: the sum of squares of the gradient buffer in f64 (the global gradient norm). CPU counterpart:
 * crates/eslm-gpt2/src/backend/cpu.rs (Cpu::sum_squares) and crates/eslm-gpt2/src/optim.rs (grad_norm).
 *
 *     sum_squares_partial:  partial[b] = sum over the elements block b visits of (double)x^2
 *                           (a FIXED grid of ESLM_NORM_BLOCKS blocks, grid-stride, shared-memory tree per block)
 *     sum_squares_final:    out[0] = the partials added by one block in a fixed tree
 *
 * The grid, the element-to-thread map and both trees are fixed, so the result is reproducible run to run (not
 * bitwise equal to the CPU's chunked sum: a different order, f64 rounding only).
 *
 * Launch: ESLM_NORM_BLOCKS x ESLM_NORM_THREADS, then 1 x ESLM_NORM_THREADS.
 */
#include "common.cuh"

#define NORM_THREADS ESLM_NORM_THREADS
static_assert((NORM_THREADS & (NORM_THREADS - 1)) == 0, "global_norm: a power-of-two tree");

__device__ __forceinline__ double block_tree_sum(double v) {
    __shared__ double sh[NORM_THREADS];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = NORM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
sum_squares_partial(double* __restrict__ partial, const float* __restrict__ x, uint64_t len) {
    ESLM_REQUIRE_BLOCK(NORM_THREADS);
    double acc = 0.0;
    for (uint64_t i = gs_start(); i < len; i += gs_stride()) {
        const double v = (double)x[i];
        acc += v * v;
    }
    const double total = block_tree_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
sum_squares_final(double* __restrict__ out, const double* __restrict__ partial, uint64_t blocks) {
    ESLM_REQUIRE_BLOCK(NORM_THREADS);
    double acc = 0.0;
    for (uint64_t b = threadIdx.x; b < blocks; b += NORM_THREADS) acc += partial[b];
    const double total = block_tree_sum(acc);
    if (threadIdx.x == 0) out[0] = total;
}
