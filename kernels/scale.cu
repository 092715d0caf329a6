/*
 * scale.cu: in-place row scaling. CPU counterpart: crates/eslm-gpt2/src/backend/cpu.rs (Cpu::scale_rows).
 *
 *     scale_rows:  x[j, :] *= weights[j]           (compact [K, width]: importance weights of the kept rows)
 *
 * (Gradient clipping needs no kernel of its own: its factor is applied inside adamw.cu.)
 *
 * Launch: ESLM_EW_THREADS threads per block, grid-stride.
 */
#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS

extern "C" __global__ void __launch_bounds__(EW_THREADS)
scale_rows(float* __restrict__ x, const float* __restrict__ weights, uint64_t k, uint64_t width) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t i = gs_start(); i < total; i += gs_stride()) x[i] *= weights[i / width];
}
