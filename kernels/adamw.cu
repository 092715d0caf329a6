/*
 * adamw.cu: the fused AdamW update of one parameter tensor. CPU counterpart: crates/eslm-gpt2/src/optim.rs
 * (adamw_update_slice; the constants are its AdamWStep).
 *
 *     g = grad_scale * g (global-norm clipping fused into the update)
 *     m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
 *     p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
 *
 * with step_size = lr / (1 - b1^t), inv_sqrt_bc2 = 1 / sqrt(1 - b2^t), and decay = 1 - lr * wd for tensors whose
 * ParamKind decays (matrices, embeddings), 1 otherwise (the host passes the flag's factor). One pass over p, g,
 * m, v (28 bytes per parameter). IEEE sqrtf and division (no fast math).
 *
 * Launch: ESLM_ADAMW_THREADS threads per block, grid-stride.
 */
#include <math.h>

#include "common.cuh"

#define ADAMW_THREADS ESLM_ADAMW_THREADS

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_update(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
             uint64_t len, float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay,
             float grad_scale) {
    ESLM_REQUIRE_BLOCK(ADAMW_THREADS);
    for (uint64_t i = gs_start(); i < len; i += gs_stride()) {
        const float gi = g[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) * inv_sqrt_bc2 + eps;
        p[i] = p[i] * decay - step_size * mi / denom;
    }
}
