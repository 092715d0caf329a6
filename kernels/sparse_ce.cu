/*
 * sparse_ce.cu: the cross-entropy gradient for the KEPT rows only, into a compact buffer, plus the mean loss.
 *
 * For output row i, kept row r = kept[i], logits z = logits[r, 0..V), target y = targets[r], l = lse[r]:
 *     dlogits[i, j] = (e^{z_j - l} - [j == y]) * g      (j < V, one exp per logit)
 *     dlogits[i, j] = 0                                 (V <= j < out_stride: padding)
 *     row_loss[i]   = l - z_y
 *     loss          = (1 / K) sum_i row_loss[i]         (f64, fixed order: deterministic)
 * with g = scale, or scale / K when divide_by_count is set (K read on the device, so 1/K needs no host sync).
 *
 * K (the kept count) lives in device memory (e.g. the selection state's count): the grid is launched for the
 * capacity (max_kept rows at most) and a grid-stride loop over i < max_kept does the work. Rows [K, max_kept) of
 * dlogits are ZEROED on every call, so a consumer that works on all max_kept rows (a GEMM whose row count must be
 * known on the host) sees exact zeros there, never the previous call's gradients; the zeroing costs a write of
 * (max_kept - K) rows, so size the buffers close to the expected K. Rows not in kept are never read.
 *
 * K > max_kept (VaR keeps every tie, so K can exceed ceil((1 - alpha) M)) is an error, not a clamp: the kernel sets
 * ESLM_STATUS_KEPT_OVER_CAPACITY, zeroes every output row, and the loss kernel writes NaN; status[1] holds the K
 * it read, so the host names both counts.
 *
 * Loads: 16-byte vectors on the logits row (head / body / tail split, common.cuh). Stores: when the output row
 * has the input row's alignment, the same split gives vector stores; otherwise the output row gets its own
 * head / 16-byte body / tail split (scalar loads, coalesced across the warp, and vector stores). Output f32 or
 * bf16 (round to nearest even).
 *
 * Bad kept entries (index >= N, or a target outside [0, V), e.g. an ignored row) cannot happen with indices from
 * select; if they do, the output row is zeroed, row_loss is NaN and ESLM_STATUS_BAD_KEPT_ROW is set.
 *
 * Launch: ESLM_CE_THREADS threads per block (sparse_ce_*), one block of ESLM_CE_REDUCE_THREADS (sparse_ce_loss).
 */
#include <math.h>

#include "common.cuh"

#define CE_THREADS ESLM_CE_THREADS
#define CE_REDUCE_THREADS ESLM_CE_REDUCE_THREADS
static_assert((CE_REDUCE_THREADS & (CE_REDUCE_THREADS - 1)) == 0, "sparse_ce_loss: a power-of-two tree");

/* Stores VEC consecutive outputs; dst is aligned to min(16, VEC * sizeof(Tout)) bytes. */
template <typename Tout, int VEC> struct VecStore;

template <> struct VecStore<float, 4> {
    static __device__ __forceinline__ void store(float* dst, const float* v) {
        *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    }
};
template <> struct VecStore<float, 8> {
    static __device__ __forceinline__ void store(float* dst, const float* v) {
        reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
};
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
template <> struct VecStore<uint16_t, 4> {
    static __device__ __forceinline__ void store(uint16_t* dst, const float* v) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]));
    }
};
template <> struct VecStore<uint16_t, 8> {
    static __device__ __forceinline__ void store(uint16_t* dst, const float* v) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]),
                                                    pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
    }
};

/* One gradient value: (e^{z - l} - [j == y]) * g. */
__device__ __forceinline__ float grad_value(float z, uint64_t j, int32_t y, float l, float g) {
    return (expf(z - l) - (j == (uint64_t)y ? 1.0f : 0.0f)) * g;
}

/* Columns [j0, j1) of one output row, one scalar load and one scalar store per column (heads and tails). */
template <typename Tin, typename Tout>
__device__ __forceinline__ void grad_scalar(const Tin* __restrict__ row, Tout* __restrict__ out, uint64_t j0,
                                            uint64_t j1, int32_t y, float l, float g) {
    for (uint64_t j = j0 + threadIdx.x; j < j1; j += CE_THREADS)
        Elem<Tout>::store(out + j, grad_value(Elem<Tin>::load(row + j), j, y, l, g));
}

template <typename Tin, typename Tout>
__device__ __forceinline__ void grad_row(const Tin* __restrict__ row, Tout* __restrict__ out, uint64_t vocab,
                                         uint64_t out_stride, int32_t y, float l, float g) {
    constexpr int VEC = Elem<Tin>::VEC;
    constexpr uint64_t OUT_ALIGN = (VEC * sizeof(Tout)) < 16 ? (VEC * sizeof(Tout)) : 16;
    const uint64_t tid = threadIdx.x;
    uint64_t head = head_elems(row);
    if (head > vocab) head = vocab;
    if (((uint64_t)(out + head) % OUT_ALIGN) == 0) {
        /* Co-aligned rows: the input's split serves both sides (16-byte loads, VEC-element stores). */
        grad_scalar(row, out, 0, head, y, l, g);
        const uint4* __restrict__ body = reinterpret_cast<const uint4*>(row + head);
        const uint64_t nvec = (vocab - head) / VEC;
        for (uint64_t i = tid; i < nvec; i += CE_THREADS) {
            float v[VEC];
            Elem<Tin>::unpack(body[i], v);
            const uint64_t j0 = head + i * VEC;
#pragma unroll
            for (int u = 0; u < VEC; u++) v[u] = grad_value(v[u], j0 + u, y, l, g);
            VecStore<Tout, VEC>::store(out + j0, v);
        }
        grad_scalar(row, out, head + nvec * VEC, vocab, y, l, g);
    } else {
        /* The output row has its own alignment (e.g. out_stride odd while the logits stride is a multiple of 8):
         * split the OUTPUT row into head / 16-byte body / tail, with scalar loads (coalesced across the warp). */
        constexpr int OVEC = 16 / sizeof(Tout);
        uint64_t ohead = head_elems(out);
        if (ohead > vocab) ohead = vocab;
        grad_scalar(row, out, 0, ohead, y, l, g);
        const uint64_t nvec = (vocab - ohead) / OVEC;
        for (uint64_t i = tid; i < nvec; i += CE_THREADS) {
            const uint64_t j0 = ohead + i * OVEC;
            float v[OVEC];
#pragma unroll
            for (int u = 0; u < OVEC; u++) v[u] = grad_value(Elem<Tin>::load(row + j0 + u), j0 + u, y, l, g);
            VecStore<Tout, OVEC>::store(out + j0, v);
        }
        grad_scalar(row, out, ohead + nvec * OVEC, vocab, y, l, g);
    }
    for (uint64_t j = vocab + tid; j < out_stride; j += CE_THREADS) out[j] = Elem<Tout>::zero();
}

/* Zeroes output row i (all out_stride columns). */
template <typename Tout>
__device__ __forceinline__ void zero_row(Tout* __restrict__ out, uint64_t out_stride) {
    for (uint64_t j = threadIdx.x; j < out_stride; j += CE_THREADS) out[j] = Elem<Tout>::zero();
}

template <typename Tin, typename Tout>
__device__ __forceinline__ void sparse_ce_impl(const EslmSparseCeParams p, const Tin* __restrict__ logits,
                                               const int32_t* __restrict__ targets, const float* __restrict__ lse,
                                               const uint32_t* __restrict__ kept, const uint32_t* __restrict__ count,
                                               Tout* __restrict__ dlogits, float* __restrict__ row_loss,
                                               uint32_t* __restrict__ status) {
    ESLM_REQUIRE_BLOCK(CE_THREADS);
    const uint64_t k_device = *count;
    const bool over = k_device > p.max_kept;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        status[1] = (uint32_t)k_device;
        if (over) atomicOr(status, ESLM_STATUS_KEPT_OVER_CAPACITY);
    }
    const uint64_t k = over ? 0 : k_device; /* over capacity: every row is zeroed below */
    const float g = p.divide_by_count ? (k > 0 ? p.scale / (float)k : 0.0f) : p.scale;
    for (uint64_t i = blockIdx.x; i < p.max_kept; i += gridDim.x) {
        Tout* out = dlogits + i * p.out_stride;
        if (i >= k) { /* rows [K, max_kept): zeros, never the previous call's gradients */
            zero_row(out, p.out_stride);
            continue;
        }
        const uint32_t r = kept[i];
        const int32_t y = r < p.rows ? targets[r] : -1;
        if (y < 0 || (uint64_t)y >= p.vocab) { /* uniform across the block */
            zero_row(out, p.out_stride);
            if (threadIdx.x == 0) {
                row_loss[i] = NAN;
                atomicOr(status, ESLM_STATUS_BAD_KEPT_ROW);
            }
            continue;
        }
        const Tin* row = logits + (uint64_t)r * p.stride;
        const float l = lse[r];
        grad_row<Tin, Tout>(row, out, p.vocab, p.out_stride, y, l, g);
        if (threadIdx.x == 0) row_loss[i] = l - Elem<Tin>::load(row + y);
    }
}

#define SPARSE_CE_KERNEL(NAME, TIN, TOUT)                                                                      \
    extern "C" __global__ void __launch_bounds__(CE_THREADS)                                                  \
    NAME(const EslmSparseCeParams p, const TIN* __restrict__ logits, const int32_t* __restrict__ targets,     \
         const float* __restrict__ lse, const uint32_t* __restrict__ kept, const uint32_t* __restrict__ count, \
         TOUT* __restrict__ dlogits, float* __restrict__ row_loss, uint32_t* __restrict__ status) {           \
        sparse_ce_impl<TIN, TOUT>(p, logits, targets, lse, kept, count, dlogits, row_loss, status);           \
    }

SPARSE_CE_KERNEL(sparse_ce_f32_f32, float, float)
SPARSE_CE_KERNEL(sparse_ce_f32_bf16, float, uint16_t)
SPARSE_CE_KERNEL(sparse_ce_bf16_f32, uint16_t, float)
SPARSE_CE_KERNEL(sparse_ce_bf16_bf16, uint16_t, uint16_t)

/* loss[0] = (1/K) sum_{i<K} row_loss[i] in f64, in a fixed order (per-thread strided sums, then a fixed tree);
 * 0 when K = 0, NaN when K > max_kept (the gradient kernel flagged it). One block of CE_REDUCE_THREADS threads. */
extern "C" __global__ void __launch_bounds__(CE_REDUCE_THREADS)
sparse_ce_loss(const uint64_t max_kept, const uint32_t* __restrict__ count, const float* __restrict__ row_loss,
               float* __restrict__ loss) {
    ESLM_REQUIRE_BLOCK(CE_REDUCE_THREADS);
    __shared__ double partial[CE_REDUCE_THREADS];
    const uint64_t k_device = *count;
    if (k_device > max_kept) {
        if (threadIdx.x == 0) loss[0] = NAN;
        return;
    }
    const uint64_t k = k_device;
    double sum = 0.0;
    for (uint64_t i = threadIdx.x; i < k; i += CE_REDUCE_THREADS) sum += (double)row_loss[i];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = CE_REDUCE_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = k > 0 ? (float)(partial[0] / (double)k) : 0.0f;
}
