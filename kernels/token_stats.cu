/*
 * token_stats.cu: per-row log-sum-exp, cross-entropy and predictive entropy in ONE pass over each logits row.
 *
 * For a row z[0..V) with target y:
 *     lse     = m + ln s                       m = max_j z_j,  s = sum_j e^{z_j - m}
 *     loss    = lse - z_y
 *     entropy = lse - sum_j softmax(z)_j z_j  = ln s - t / s,   t = sum_j e^{z_j - m} (z_j - m)
 *
 * One pass, one exp per logit: each thread keeps a running (m, s, t). It loads a chunk of logits (UNROLL 16-byte
 * vectors = 16 values), takes the chunk maximum FIRST, and only if that exceeds m rescales its accumulators once
 * (m -> m', d = max(m - m', -128), s' = s e^d, t' = e^d (t + d s)); then it adds e^{z-m} and e^{z-m}(z-m) for each value of
 * the chunk with a single exp each (ex2.approx, see fast_exp_nonpos). (The common online update that rescales
 * per element costs two exps per logit and is exp-unit bound on Hopper.) Per-thread states are merged with the same rule, by warp shuffles and
 * then across warps through shared memory. Accumulation is in f32 (bf16 logits are widened exactly).
 *
 * Layout: logits [N, stride], row r starts at r * stride; columns V..stride (padding) are never read. Any stride
 * works: see common.cuh for the head / 16-byte vector body / tail split.
 *
 * Special values (the CPU backend's policy, src/token_stats.rs): -inf logits contribute 0; a row holding NaN gives
 * NaN lse, loss, entropy; otherwise a row holding +inf gives lse = +inf, loss = +inf - z_y, entropy = NaN; a row
 * of only -inf gives lse = -inf, loss = NaN, entropy = NaN.
 *
 * Ignored rows (target == ignore_index) are not read: valid = 0 and NaN outputs. A target outside [0, V) that is
 * not the ignore value is treated the same way and sets ESLM_STATUS_TARGET_OUT_OF_RANGE in *status (the host
 * wrapper checks targets first, as the CPU backend does, and returns an error instead).
 *
 * The rescale clamps d at -128 before the product: e^-128 is exactly 0 in f32 either way, but an unclamped d can be
 * -inf or so large that d * s overflows (m = -FLT_MAX for a row masked with -FLT_MAX, then a 3e38 logit), and
 * 0 * (-inf) would make t NaN. The CPU reference (src/token_stats.rs) rescales in f64, where m - m' and (m - m') s
 * stay finite for any f32 m, m' and gives the same 0 (crates/eslm-kernels/tests/kernel_emulation.rs emulates this
 * rescale and merge in f32 and checks them on such rows).
 *
 * Launch: grid = min(N, 2^31 - 1) blocks (a grid-stride loop covers the rest), ESLM_TS_THREADS threads per block.
 */
#include <math.h>

#include "common.cuh"

#define TS_THREADS ESLM_TS_THREADS
#define TS_WARPS (TS_THREADS / 32)
static_assert(TS_THREADS % 32 == 0 && TS_WARPS <= 32, "block_merge: one warp merges the warp results");

/* The smallest rescale exponent: e^-128 is 0 in f32 (below the smallest subnormal, 2^-149 = e^-103.3). */
#define ACC_D_MIN (-128.0f)

/* e^d for d in [-128, 0]: one MUFU.EX2 (ex2.approx.ftz, relative error ~2^-22) after one multiply by log2 e.
 * The multiply's rounding adds a relative error of about |d| * 6e-8 to the result; terms with large |d| are
 * themselves tiny (e^-20 = 2e-9), so the error of s = sum e^d stays near 1e-7 relative: well inside the f32
 * accumulation error (the parity tests allow 1e-5). Results below 2^-126 flush to 0 (as the CPU's exp does).
 * expf() would cost about 8 more instructions per logit, which on Hopper makes the bf16 kernel issue-bound. */
__device__ __forceinline__ float fast_exp_nonpos(float d) {
    float p;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(p) : "f"(d * 1.4426950408889634f));
    return p;
}

/* Running state of a (partial) row: max m, s = sum e^{z-m}, t = sum e^{z-m} (z-m). Empty: m = -inf, s = t = 0. */
struct Acc {
    float m, s, t;
};

/* Adds n values (already in registers) to a: chunk max first, at most one rescale, then one exp per value. */
template <int N>
__device__ __forceinline__ void acc_chunk(Acc& a, const float* z, bool& nan) {
    float cmax = z[0];
    bool cnan = z[0] != z[0];
#pragma unroll
    for (int i = 1; i < N; i++) {
        cmax = fmaxf(cmax, z[i]); /* fmaxf ignores NaN */
        cnan |= z[i] != z[i];
    }
    nan |= cnan;
    if (cmax > a.m) { /* false for a NaN-only chunk */
        if (a.m > -INFINITY) {
            const float d = fmaxf(a.m - cmax, ACC_D_MIN); /* finite, and d * s cannot overflow */
            const float f = expf(d);
            a.t = f * (a.t + d * a.s);
            a.s *= f;
        }
        a.m = cmax;
    }
    if (a.m == -INFINITY) return; /* only -inf (and NaN) so far: nothing to add */
#pragma unroll
    for (int i = 0; i < N; i++) {
        /* -inf (and NaN, tracked by the flag) clamp to -128: e^-128 flushes to exactly 0, and 0 * -128 = 0. */
        const float d = fmaxf(z[i] - a.m, ACC_D_MIN);
        const float p = fast_exp_nonpos(d); /* the one exp per logit */
        a.s += p;
        a.t = fmaf(p, d, a.t);
    }
}

/* Merges two partial states (the same rescaling rule). */
__device__ __forceinline__ Acc acc_merge(const Acc& a, const Acc& b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return a; /* both empty */
    Acc r = {m, 0.0f, 0.0f};
    if (a.m > -INFINITY) {
        const float d = fmaxf(a.m - m, ACC_D_MIN); /* see acc_chunk */
        const float f = expf(d);
        r.s += f * a.s;
        r.t += f * (a.t + d * a.s);
    }
    if (b.m > -INFINITY) {
        const float d = fmaxf(b.m - m, ACC_D_MIN);
        const float f = expf(d);
        r.s += f * b.s;
        r.t += f * (b.t + d * b.s);
    }
    return r;
}

/* This thread's share of one row: scalar head, 16-byte vector body (UNROLL vectors per chunk), scalar tail. */
template <typename T>
__device__ __forceinline__ Acc row_partial(const T* __restrict__ row, uint64_t vocab, bool& nan) {
    constexpr int VEC = Elem<T>::VEC;
    constexpr int UNROLL = 16 / VEC; /* 16 values per chunk: 4 vectors of f32, 2 of bf16 */
    Acc a = {-INFINITY, 0.0f, 0.0f};
    const uint64_t tid = threadIdx.x;
    uint64_t head = head_elems(row);
    if (head > vocab) head = vocab;
    for (uint64_t j = tid; j < head; j += TS_THREADS) {
        float z = Elem<T>::load(row + j);
        acc_chunk<1>(a, &z, nan);
    }
    const uint4* __restrict__ body = reinterpret_cast<const uint4*>(row + head);
    const uint64_t nvec = (vocab - head) / VEC;
    uint64_t i = tid;
    for (; i + (UNROLL - 1) * TS_THREADS < nvec; i += UNROLL * TS_THREADS) {
        uint4 raw[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) raw[u] = body[i + u * TS_THREADS]; /* all loads in flight first */
        float z[UNROLL * VEC];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) Elem<T>::unpack(raw[u], z + u * VEC);
        acc_chunk<UNROLL * VEC>(a, z, nan);
    }
    for (; i < nvec; i += TS_THREADS) {
        float z[VEC];
        Elem<T>::unpack(body[i], z);
        acc_chunk<VEC>(a, z, nan);
    }
    for (uint64_t j = head + nvec * VEC + tid; j < vocab; j += TS_THREADS) {
        float z = Elem<T>::load(row + j);
        acc_chunk<1>(a, &z, nan);
    }
    return a;
}

/* Block-wide merge; the result is valid in thread 0. Ends with a barrier so shared memory can be reused. */
__device__ __forceinline__ Acc block_merge(Acc a, bool& nan) {
    __shared__ Acc warp_acc[TS_WARPS];
    __shared__ int warp_nan[TS_WARPS];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        Acc o;
        o.m = __shfl_xor_sync(0xFFFFFFFFu, a.m, off);
        o.s = __shfl_xor_sync(0xFFFFFFFFu, a.s, off);
        o.t = __shfl_xor_sync(0xFFFFFFFFu, a.t, off);
        a = acc_merge(a, o);
    }
    const bool wnan = __any_sync(0xFFFFFFFFu, nan);
    if (lane == 0) {
        warp_acc[warp] = a;
        warp_nan[warp] = wnan;
    }
    __syncthreads();
    if (warp == 0) {
        Acc b = {-INFINITY, 0.0f, 0.0f};
        bool bnan = false;
        if (lane < TS_WARPS) {
            b = warp_acc[lane];
            bnan = warp_nan[lane] != 0;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            Acc o;
            o.m = __shfl_xor_sync(0xFFFFFFFFu, b.m, off);
            o.s = __shfl_xor_sync(0xFFFFFFFFu, b.s, off);
            o.t = __shfl_xor_sync(0xFFFFFFFFu, b.t, off);
            b = acc_merge(b, o);
        }
        a = b;
        nan = __any_sync(0xFFFFFFFFu, bnan);
    }
    __syncthreads();
    return a;
}

template <typename T>
__device__ __forceinline__ void token_stats_impl(const EslmTokenStatsParams p, const T* __restrict__ logits,
                                                 const int32_t* __restrict__ targets, float* __restrict__ lse,
                                                 float* __restrict__ loss, float* __restrict__ entropy,
                                                 uint8_t* __restrict__ valid, uint32_t* __restrict__ status) {
    ESLM_REQUIRE_BLOCK(TS_THREADS);
    for (uint64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const int32_t y = targets[r]; /* the same value in every thread: the branches below are uniform */
        const bool ignored = y == p.ignore_index;
        const bool bad = !ignored && (y < 0 || (uint64_t)y >= p.vocab);
        if (ignored || bad) {
            if (threadIdx.x == 0) {
                lse[r] = NAN;
                loss[r] = NAN;
                entropy[r] = NAN;
                valid[r] = 0;
                if (bad) atomicOr(status, ESLM_STATUS_TARGET_OUT_OF_RANGE);
            }
            continue;
        }
        const T* row = logits + r * p.stride;
        bool nan = false;
        Acc a = row_partial(row, p.vocab, nan);
        a = block_merge(a, nan);
        if (threadIdx.x == 0) {
            const float z_y = Elem<T>::load(row + y);
            float l, c, h;
            if (nan) {
                l = NAN; c = NAN; h = NAN;
            } else if (a.m == INFINITY) {
                l = INFINITY; c = INFINITY - z_y; h = NAN;
            } else if (a.m == -INFINITY) {
                l = -INFINITY; c = NAN; h = NAN;
            } else {
                const float ln_s = logf(a.s);
                l = a.m + ln_s;
                c = l - z_y;
                h = ln_s - a.t / a.s;
            }
            lse[r] = l;
            loss[r] = c;
            entropy[r] = h;
            valid[r] = 1;
        }
    }
}

extern "C" __global__ void __launch_bounds__(TS_THREADS)
token_stats_f32(const EslmTokenStatsParams p, const float* __restrict__ logits, const int32_t* __restrict__ targets,
                float* __restrict__ lse, float* __restrict__ loss, float* __restrict__ entropy,
                uint8_t* __restrict__ valid, uint32_t* __restrict__ status) {
    token_stats_impl<float>(p, logits, targets, lse, loss, entropy, valid, status);
}

extern "C" __global__ void __launch_bounds__(TS_THREADS)
token_stats_bf16(const EslmTokenStatsParams p, const uint16_t* __restrict__ logits,
                 const int32_t* __restrict__ targets, float* __restrict__ lse, float* __restrict__ loss,
                 float* __restrict__ entropy, uint8_t* __restrict__ valid, uint32_t* __restrict__ status) {
    token_stats_impl<uint16_t>(p, logits, targets, lse, loss, entropy, valid, status);
}
