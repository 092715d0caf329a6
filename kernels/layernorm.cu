/*
 * layernorm.cu: layer normalisation over the last dimension. CPU counterpart: crates/eslm-gpt2/src/ops/layernorm.rs.
 *
 *     forward:  m = mean(x),  r = 1 / sqrt(mean((x - m)^2) + 1e-5),  y = (x - m) * r * w + b;  saves m, r per row
 *     backward on the kept rows (compact dy, dx [K, C]; i = rows[j], or j when rows is null):
 *         n = (x_i - m_i) * r_i,  dn = dy_j * w
 *         dx_j = r_i * (dn - mean(dn) - n * mean(dn * n))          (overwritten)
 *         dw += sum_j dy_j * n,  db += sum_j dy_j                  (accumulated)
 *
 * Forward and dx: one warp per row (warp_sum reductions). The parameter gradients are a deterministic column sum:
 * layernorm_backward_params writes per-chunk partials [chunks, 2C] (ESLM_COLSUM_ROWS rows per chunk; the first C
 * columns for dw, the next C for db), layernorm_reduce_params adds the chunks in order into dw, db.
 *
 * Launch: ESLM_LN_THREADS threads (ESLM_LN_THREADS / 32 rows per block); params: grid (ceil(C / threads), chunks).
 * Every kernel but layernorm_reduce_params has a bf16-activation twin (NAME_bf16: x, y, dy, dx in bf16; w, b,
 * mean, rstd, the partials and the parameter gradients f32; common.cuh, ESLM_TWINS).
 */
#include <math.h>

#include "common.cuh"

#define LN_THREADS ESLM_LN_THREADS
#define LN_WARPS (LN_THREADS / 32)
#define LN_EPS 1e-5f
static_assert(LN_THREADS % 32 == 0, "layernorm: whole warps");

#define LN_FORWARD_PARAMS(A)                                                                                   \
    A *__restrict__ y, float *__restrict__ mean, float *__restrict__ rstd, const A *__restrict__ x,              \
        const float *__restrict__ w, const float *__restrict__ b, uint64_t n, uint64_t c
template <typename A>
__device__ __forceinline__ void layernorm_forward_t(LN_FORWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(LN_THREADS);
    const uint64_t row = (uint64_t)blockIdx.x * LN_WARPS + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (row >= n) return;
    const A* xr = x + row * c;
    const float inv_c = 1.0f / (float)c;
    float s = 0.0f;
    for (uint64_t k = lane; k < c; k += 32) s += ld(xr + k);
    const float m = warp_sum(s) * inv_c;
    float v = 0.0f;
    for (uint64_t k = lane; k < c; k += 32) {
        const float d = ld(xr + k) - m;
        v += d * d;
    }
    const float r = 1.0f / sqrtf(warp_sum(v) * inv_c + LN_EPS);
    A* yr = y + row * c;
    for (uint64_t k = lane; k < c; k += 32) st(yr + k, (ld(xr + k) - m) * r * w[k] + b[k]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}
ESLM_TWINS(layernorm_forward, LN_THREADS, LN_FORWARD_PARAMS, (y, mean, rstd, x, w, b, n, c))

#define LN_DX_PARAMS(A)                                                                                        \
    A *__restrict__ dx, const A *__restrict__ dy, const A *__restrict__ x, const float *__restrict__ mean,       \
        const float *__restrict__ rstd, const float *__restrict__ w, const uint32_t *__restrict__ rows,          \
        uint64_t k, uint64_t c
template <typename A>
__device__ __forceinline__ void layernorm_backward_dx_t(LN_DX_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(LN_THREADS);
    const uint64_t j = (uint64_t)blockIdx.x * LN_WARPS + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (j >= k) return;
    const uint64_t i = dense_row(rows, j);
    const A* xr = x + i * c;
    const A* dyr = dy + j * c;
    const float m = mean[i], r = rstd[i];
    float a = 0.0f, bsum = 0.0f;
    for (uint64_t q = lane; q < c; q += 32) {
        const float nv = (ld(xr + q) - m) * r;
        const float dn = ld(dyr + q) * w[q];
        a += dn;
        bsum += dn * nv;
    }
    const float inv_c = 1.0f / (float)c;
    const float mean_dn = warp_sum(a) * inv_c;
    const float mean_dn_n = warp_sum(bsum) * inv_c;
    A* dxr = dx + j * c;
    for (uint64_t q = lane; q < c; q += 32) {
        const float nv = (ld(xr + q) - m) * r;
        st(dxr + q, r * (ld(dyr + q) * w[q] - mean_dn - nv * mean_dn_n));
    }
}
ESLM_TWINS(layernorm_backward_dx, LN_THREADS, LN_DX_PARAMS, (dx, dy, x, mean, rstd, w, rows, k, c))

/* partial [chunks, 2C]: chunk blockIdx.y covers compact rows [y * ESLM_COLSUM_ROWS, ...). */
#define LN_PARAMS_PARAMS(A)                                                                                    \
    float *__restrict__ partial, const A *__restrict__ dy, const A *__restrict__ x,                             \
        const float *__restrict__ mean, const float *__restrict__ rstd, const uint32_t *__restrict__ rows,       \
        uint64_t k, uint64_t c
template <typename A>
__device__ __forceinline__ void layernorm_backward_params_t(LN_PARAMS_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(LN_THREADS);
    const uint64_t col = (uint64_t)blockIdx.x * LN_THREADS + threadIdx.x;
    if (col >= c) return;
    const uint64_t j0 = (uint64_t)blockIdx.y * ESLM_COLSUM_ROWS;
    const uint64_t j1 = min(k, j0 + ESLM_COLSUM_ROWS);
    float dw = 0.0f, db = 0.0f;
    for (uint64_t j = j0; j < j1; ++j) {
        const uint64_t i = dense_row(rows, j);
        const float g = ld(dy + j * c + col);
        dw += g * ((ld(x + i * c + col) - mean[i]) * rstd[i]);
        db += g;
    }
    partial[blockIdx.y * 2 * c + col] = dw;
    partial[blockIdx.y * 2 * c + c + col] = db;
}
ESLM_TWINS(layernorm_backward_params, LN_THREADS, LN_PARAMS_PARAMS, (partial, dy, x, mean, rstd, rows, k, c))

extern "C" __global__ void __launch_bounds__(LN_THREADS)
layernorm_reduce_params(float* __restrict__ dw, float* __restrict__ db, const float* __restrict__ partial,
                        uint64_t chunks, uint64_t c) {
    ESLM_REQUIRE_BLOCK(LN_THREADS);
    for (uint64_t col = gs_start(); col < c; col += gs_stride()) {
        float aw = 0.0f, ab = 0.0f;
        for (uint64_t q = 0; q < chunks; ++q) {
            aw += partial[q * 2 * c + col];
            ab += partial[q * 2 * c + c + col];
        }
        dw[col] += aw;
        db[col] += ab;
    }
}
