/*
 * convert.cu: f32 -> bf16 (round to nearest even, NaN kept NaN) for the bf16 matrix products of the CUDA backend
 * (MatmulPrecision::Bf16: each product's two operands are converted into scratch, then multiplied on the tensor
 * cores with f32 accumulation into an f32 result). CPU counterpart: half::bf16::from_f32 (the same rounding),
 * as used by eslm-kernels' bf16 logits (crates/eslm-kernels/src/layout.rs).
 *
 * Launch: ESLM_EW_THREADS threads per block, grid-stride.
 */
#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS

extern "C" __global__ void __launch_bounds__(EW_THREADS)
f32_to_bf16(uint16_t* __restrict__ out, const float* __restrict__ in, uint64_t len) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    for (uint64_t i = gs_start(); i < len; i += gs_stride()) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}
