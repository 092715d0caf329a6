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
 * capacity (max_kept rows at most) and a grid-stride loop over i < K does the work; blocks with nothing to do exit.
 * Rows not in kept are never read or written.
 *
 * Loads: 16-byte vectors on the logits row (head / body / tail split, common.cuh). Stores: vectors of the same
 * VEC elements when the output row is suitably aligned (out_stride a multiple of VEC and an aligned buffer),
 * scalar stores otherwise. Output f32 or bf16 (round to nearest even).
 *
 * Bad kept entries (index >= N, or a target outside [0, V), e.g. an ignored row) cannot happen with indices from
 * select; if they do, the output row is zeroed, row_loss is NaN and ESLM_STATUS_BAD_KEPT_ROW is set.
 */
#include <math.h>

#include "common.cuh"

#define CE_THREADS 512
#define CE_REDUCE_THREADS 256

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

template <typename Tin, typename Tout>
__device__ __forceinline__ void grad_row(const Tin* __restrict__ row, Tout* __restrict__ out, uint64_t vocab,
                                         uint64_t out_stride, int32_t y, float l, float g) {
    constexpr int VEC = Elem<Tin>::VEC;
    constexpr uint64_t OUT_ALIGN = (VEC * sizeof(Tout)) < 16 ? (VEC * sizeof(Tout)) : 16;
    const uint64_t tid = threadIdx.x;
    uint64_t head = head_elems(row);
    if (head > vocab) head = vocab;
    for (uint64_t j = tid; j < head; j += CE_THREADS) {
        const float p = expf(Elem<Tin>::load(row + j) - l);
        Elem<Tout>::store(out + j, (p - (j == (uint64_t)y ? 1.0f : 0.0f)) * g);
    }
    const uint4* __restrict__ body = reinterpret_cast<const uint4*>(row + head);
    const uint64_t nvec = (vocab - head) / VEC;
    const bool vec_out = ((uint64_t)(out + head) % OUT_ALIGN) == 0; /* the same for the whole block */
    for (uint64_t i = tid; i < nvec; i += CE_THREADS) {
        float v[VEC];
        Elem<Tin>::unpack(body[i], v);
        const uint64_t j0 = head + i * VEC;
#pragma unroll
        for (int u = 0; u < VEC; u++) v[u] = (expf(v[u] - l) - (j0 + u == (uint64_t)y ? 1.0f : 0.0f)) * g;
        if (vec_out) {
            VecStore<Tout, VEC>::store(out + j0, v);
        } else {
#pragma unroll
            for (int u = 0; u < VEC; u++) Elem<Tout>::store(out + j0 + u, v[u]);
        }
    }
    for (uint64_t j = head + nvec * VEC + tid; j < vocab; j += CE_THREADS) {
        const float p = expf(Elem<Tin>::load(row + j) - l);
        Elem<Tout>::store(out + j, (p - (j == (uint64_t)y ? 1.0f : 0.0f)) * g);
    }
    for (uint64_t j = vocab + tid; j < out_stride; j += CE_THREADS) out[j] = Elem<Tout>::zero();
}

template <typename Tin, typename Tout>
__device__ __forceinline__ void sparse_ce_impl(const EslmSparseCeParams p, const Tin* __restrict__ logits,
                                               const int32_t* __restrict__ targets, const float* __restrict__ lse,
                                               const uint32_t* __restrict__ kept, const uint32_t* __restrict__ count,
                                               Tout* __restrict__ dlogits, float* __restrict__ row_loss,
                                               uint32_t* __restrict__ status) {
    uint64_t k = *count;
    if (k > p.max_kept) k = p.max_kept;
    const float g = p.divide_by_count ? (k > 0 ? p.scale / (float)k : 0.0f) : p.scale;
    for (uint64_t i = blockIdx.x; i < k; i += gridDim.x) {
        const uint32_t r = kept[i];
        Tout* out = dlogits + i * p.out_stride;
        const int32_t y = r < p.rows ? targets[r] : -1;
        if (y < 0 || (uint64_t)y >= p.vocab) { /* uniform across the block */
            for (uint64_t j = threadIdx.x; j < p.out_stride; j += CE_THREADS) out[j] = Elem<Tout>::zero();
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
 * 0 when K = 0. One block of CE_REDUCE_THREADS threads. */
extern "C" __global__ void __launch_bounds__(CE_REDUCE_THREADS)
sparse_ce_loss(const uint64_t max_kept, const uint32_t* __restrict__ count, const float* __restrict__ row_loss,
               float* __restrict__ loss) {
    __shared__ double partial[CE_REDUCE_THREADS];
    uint64_t k = *count;
    if (k > max_kept) k = max_kept;
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
