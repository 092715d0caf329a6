/*
 * gelu.cu: GELU, tanh form (GPT-2's). CPU counterpart: crates/eslm-gpt2/src/ops/gelu.rs.
 *
 *     y = 0.5 x (1 + tanh(u)),  u = s (x + 0.044715 x^3),  s = sqrt(2 / pi)
 *     dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) s (1 + 3 * 0.044715 x^2)
 *
 * The backward runs on the kept rows: dy, dx compact [K, width], x dense (i = rows[j], or j when rows is null).
 * tanhf here; the CPU uses a rational approximation (ops::fast_tanh_f32, |error| < 1e-6), so results agree to
 * f32 rounding plus that error.
 *
 * Launch: ESLM_EW_THREADS threads per block, grid-stride.
 */
#include <math.h>

#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS
#define GELU_S 0.7978845608028654f
#define GELU_C 0.044715f

extern "C" __global__ void __launch_bounds__(EW_THREADS)
gelu_forward(float* __restrict__ y, const float* __restrict__ x, uint64_t len) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    for (uint64_t i = gs_start(); i < len; i += gs_stride()) {
        const float v = x[i];
        const float u = GELU_S * (v + GELU_C * v * v * v);
        y[i] = 0.5f * v * (1.0f + tanhf(u));
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
gelu_backward(float* __restrict__ dx, const float* __restrict__ dy, const float* __restrict__ x,
              const uint32_t* __restrict__ rows, uint64_t k, uint64_t width) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        const float v = x[dense_row(rows, j) * width + col];
        const float u = GELU_S * (v + GELU_C * v * v * v);
        const float th = tanhf(u);
        const float local =
            0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_S * (1.0f + 3.0f * GELU_C * v * v);
        dx[idx] = dy[idx] * local;
    }
}
