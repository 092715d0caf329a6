/*
 * kd.cu: the distillation gradient (ESLM-KD) of the KEPT rows, compact, and each kept row's loss. CPU counterpart:
 * crates/eslm-kernels/src/kd.rs (kd_row, kd_grad; the formulas and their derivation are there).
 *
 * For output row i, kept row r = kept[i], student logits z = student[r, 0..V), teacher logits u = teacher[r, 0..V),
 * target y = targets[r], weight W, temperature tau > 0:
 *     p = softmax(z), q_s = softmax(z / tau), q_t = softmax(u / tau)
 *     dlogits[i, j] = ((1 - W) (p_j - [j == y]) + W tau (q_s,j - q_t,j)) * scale     (j < V)
 *     dlogits[i, j] = 0                                                                (V <= j < out_stride)
 *     row_loss[i]   = (1 - W) (lse(z) - z_y) + W tau^2 KL(q_t || q_s)
 * One block per kept row, three passes over the row (maxima; sums of exponentials; gradient and KL), all in f64 like
 * the CPU's kd_row_reference (the CPU's fast kd_row uses f32 with f64 sums; both agree to ~1e-5), accumulated per
 * thread and added in a fixed shared-memory tree (reproducible). Bad kept entries (a target outside [0, V)) cannot
 * come from the engine (it checks them on the host); such a row gets zeros and a NaN loss.
 *
 * Launch: k blocks (grid-stride over kept rows) of ESLM_KD_THREADS threads.
 */
#include <math.h>

#include "common.cuh"

#define KD_THREADS ESLM_KD_THREADS
static_assert((KD_THREADS & (KD_THREADS - 1)) == 0, "kd: a power-of-two tree");

/* The block's maximum of v (every thread gets it). */
__device__ __forceinline__ double block_max(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = KD_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    const double out = sh[0];
    __syncthreads();
    return out;
}

/* The block's sum of v in a fixed tree (every thread gets it). */
__device__ __forceinline__ double block_sum(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = KD_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    const double out = sh[0];
    __syncthreads();
    return out;
}


extern "C" __global__ void __launch_bounds__(KD_THREADS)
kd_grad_rows(const float* __restrict__ student, const float* __restrict__ teacher,
             const int32_t* __restrict__ targets, const uint32_t* __restrict__ kept, uint64_t k, uint64_t vocab,
             uint64_t stride, uint64_t out_stride, double kd_weight, double tau, float scale,
             float* __restrict__ dlogits, float* __restrict__ row_loss) {
    ESLM_REQUIRE_BLOCK(KD_THREADS);
    __shared__ double sh[KD_THREADS];
    const double w = kd_weight, t = tau;
    for (uint64_t i = blockIdx.x; i < k; i += gridDim.x) {
        const uint64_t r = kept[i];
        const int32_t y = targets[r];
        const float* __restrict__ z = student + r * stride;
        const float* __restrict__ u = teacher + r * stride;
        float* __restrict__ out = dlogits + i * out_stride;
        if (y < 0 || (uint64_t)y >= vocab) {
            for (uint64_t j = threadIdx.x; j < out_stride; j += KD_THREADS) out[j] = 0.0f;
            if (threadIdx.x == 0) row_loss[i] = NAN;
            continue;
        }
        /* Pass 1: maxima of z and u / tau (in f64, as the CPU; z / tau is monotone in z: its maximum is m1 / tau). */
        double mz = -INFINITY, mu = -INFINITY;
        for (uint64_t j = threadIdx.x; j < vocab; j += KD_THREADS) {
            mz = fmax(mz, (double)z[j]);
            mu = fmax(mu, (double)u[j] / t);
        }
        const double m1 = block_max(mz, sh);
        const double ms = m1 / t;
        const double mt = block_max(mu, sh);
        /* Pass 2: the three sums of exponentials, then the log-sum-exps. */
        double s1 = 0.0, ss = 0.0, st = 0.0;
        for (uint64_t j = threadIdx.x; j < vocab; j += KD_THREADS) {
            const double zj = (double)z[j];
            s1 += exp(zj - m1);
            ss += exp(zj / t - ms);
            st += exp((double)u[j] / t - mt);
        }
        /* As the CPU's lse_scaled: a non-finite maximum is the log-sum-exp itself (all -inf, or a +inf logit). */
        const double sum1 = block_sum(s1, sh), sum_s = block_sum(ss, sh), sum_t = block_sum(st, sh);
        const double lse1 = isfinite(m1) ? m1 + log(sum1) : m1;
        const double lse_s = isfinite(ms) ? ms + log(sum_s) : ms;
        const double lse_t = isfinite(mt) ? mt + log(sum_t) : mt;
        /* Pass 3: the gradient and the KL. */
        double kl = 0.0;
        for (uint64_t j = threadIdx.x; j < vocab; j += KD_THREADS) {
            const double zj = (double)z[j];
            const double p = exp(zj - lse1);
            const double log_qs = zj / t - lse_s;
            const double log_qt = (double)u[j] / t - lse_t;
            const double qs = exp(log_qs), qt = exp(log_qt);
            if (qt > 0.0) kl += qt * (log_qt - log_qs);
            const double onehot = (j == (uint64_t)y) ? 1.0 : 0.0;
            out[j] = (float)(((1.0 - w) * (p - onehot) + w * t * (qs - qt)) * (double)scale);
        }
        for (uint64_t j = vocab + threadIdx.x; j < out_stride; j += KD_THREADS) out[j] = 0.0f;
        const double kl_total = block_sum(kl, sh);
        if (threadIdx.x == 0) row_loss[i] = (float)((1.0 - w) * (lse1 - (double)z[y]) + w * t * t * kl_total);
    }
}
