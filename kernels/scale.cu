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

/* bf16 twin: x in bf16, the weights f32 (common.cuh, ESLM_TWINS). */
#define SCALE_PARAMS(A) A *__restrict__ x, const float *__restrict__ weights, uint64_t k, uint64_t width
template <typename A>
__device__ __forceinline__ void scale_rows_t(SCALE_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t i = gs_start(); i < total; i += gs_stride()) st(x + i, ld(x + i) * weights[i / width]);
}
ESLM_TWINS(scale_rows, EW_THREADS, SCALE_PARAMS, (x, weights, k, width))
