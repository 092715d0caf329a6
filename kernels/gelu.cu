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
 * Launch: ESLM_EW_THREADS threads per block, grid-stride. Each kernel has a bf16-activation twin NAME_bf16 (common.cuh, ESLM_TWINS).
 */
#include <math.h>

#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS
#define GELU_S 0.7978845608028654f
#define GELU_C 0.044715f

#define GELU_FORWARD_PARAMS(A) A *__restrict__ y, const A *__restrict__ x, uint64_t len
template <typename A>
__device__ __forceinline__ void gelu_forward_t(GELU_FORWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    for (uint64_t i = gs_start(); i < len; i += gs_stride()) {
        const float v = ld(x + i);
        const float u = GELU_S * (v + GELU_C * v * v * v);
        st(y + i, 0.5f * v * (1.0f + tanhf(u)));
    }
}
ESLM_TWINS(gelu_forward, EW_THREADS, GELU_FORWARD_PARAMS, (y, x, len))

#define GELU_BACKWARD_PARAMS(A)                                                                                \
    A *__restrict__ dx, const A *__restrict__ dy, const A *__restrict__ x, const uint32_t *__restrict__ rows,   \
        uint64_t k, uint64_t width
template <typename A>
__device__ __forceinline__ void gelu_backward_t(GELU_BACKWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        const float v = ld(x + dense_row(rows, j) * width + col);
        const float u = GELU_S * (v + GELU_C * v * v * v);
        const float th = tanhf(u);
        const float local =
            0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_S * (1.0f + 3.0f * GELU_C * v * v);
        st(dx + idx, ld(dy + idx) * local);
    }
}
ESLM_TWINS(gelu_backward, EW_THREADS, GELU_BACKWARD_PARAMS, (dx, dy, x, rows, k, width))
