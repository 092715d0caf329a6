/*
 * common.cuh: small device helpers shared by the kernels (included, not compiled on its own).
 *
 * - bf16 logits are stored as raw uint16_t bits: bf16 -> f32 is exact (the 16 bits become the high half of an
 *   f32); f32 -> bf16 rounds to nearest even (__float2bfloat16_rn, NaN preserved).
 * - Vector loads: each 16-byte load (uint4) holds VEC = 16 / sizeof(T) logits (4 f32 or 8 bf16). A row that
 *   starts at an arbitrary element offset is split into a scalar head (up to the first 16-byte boundary), a
 *   vector body and a scalar tail, so any stride works and a 16-byte aligned row uses vector loads throughout.
 */
#ifndef ESLM_COMMON_CUH
#define ESLM_COMMON_CUH

#include <stdint.h>
#include <cuda_bf16.h>

#include "eslm_kernels.h"

/* Every kernel starts with this: the block size is defined once (eslm_kernels.h, ESLM_*_THREADS) and the loops,
 * shared arrays and CUB templates assume it, so a launch with another block size traps (an error the host sees at
 * the next synchronisation) instead of computing garbage. Uniform across the grid: no divergence. */
#define ESLM_REQUIRE_BLOCK(THREADS)                                                   \
    do {                                                                              \
        if (blockDim.x != (THREADS) || blockDim.y != 1u || blockDim.z != 1u) __trap(); \
    } while (0)

/* Element traits: f32 and bf16 (raw bits). */
template <typename T> struct Elem;

template <> struct Elem<float> {
    static constexpr int VEC = 4;
    static __device__ __forceinline__ float load(const float* p) { return *p; }
    static __device__ __forceinline__ void unpack(const uint4& v, float* z) {
        z[0] = __uint_as_float(v.x);
        z[1] = __uint_as_float(v.y);
        z[2] = __uint_as_float(v.z);
        z[3] = __uint_as_float(v.w);
    }
    static __device__ __forceinline__ void store(float* p, float x) { *p = x; }
    static __device__ __forceinline__ float zero() { return 0.0f; }
};

template <> struct Elem<uint16_t> {
    static constexpr int VEC = 8;
    static __device__ __forceinline__ float load(const uint16_t* p) { return __uint_as_float(((uint32_t)*p) << 16); }
    static __device__ __forceinline__ void unpack(const uint4& v, float* z) {
        /* little endian: the low half of each 32-bit word is the lower-index element */
        z[0] = __uint_as_float(v.x << 16);
        z[1] = __uint_as_float(v.x & 0xFFFF0000u);
        z[2] = __uint_as_float(v.y << 16);
        z[3] = __uint_as_float(v.y & 0xFFFF0000u);
        z[4] = __uint_as_float(v.z << 16);
        z[5] = __uint_as_float(v.z & 0xFFFF0000u);
        z[6] = __uint_as_float(v.w << 16);
        z[7] = __uint_as_float(v.w & 0xFFFF0000u);
    }
    static __device__ __forceinline__ void store(uint16_t* p, float x) {
        *p = __bfloat16_as_ushort(__float2bfloat16_rn(x));
    }
    static __device__ __forceinline__ uint16_t zero() { return 0; }
};

/* Number of elements of type T before the first 16-byte boundary at or after p (p is sizeof(T)-aligned). */
template <typename T>
__device__ __forceinline__ uint64_t head_elems(const T* p) {
    return ((16u - ((uint64_t)p & 15u)) & 15u) / sizeof(T);
}


/* ---- helpers of the engine's kernels (encoder.cu ... global_norm.cu) ---- */

/* Activation storage. The engine's row-wise kernels are templates over the element type A of the activations
 * and their gradients: float (f32 storage) or uint16_t holding bf16 bits (bf16 storage: llm.c's mixed-precision
 * recipe). Parameters, parameter gradients, layer-norm statistics and every accumulation stay f32: ld() widens
 * on load (exact), st() rounds to nearest even on store. ESLM_TWINS(NAME, THREADS, PARAMS, ARGS) emits the
 * extern "C" kernels NAME (A = float) and NAME_bf16 (A = uint16_t), both calling the device template
 * NAME_t<A> ARGS; PARAMS is a function-like macro of A giving the parameter list, ARGS the parenthesised names. */
template <typename A>
__device__ __forceinline__ float ld(const A* p) { return Elem<A>::load(p); }
template <typename A>
__device__ __forceinline__ void st(A* p, float x) { Elem<A>::store(p, x); }

#define ESLM_TWINS(NAME, THREADS, PARAMS, ARGS)                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(PARAMS(float)) { NAME##_t<float> ARGS; }       \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME##_bf16(PARAMS(uint16_t)) { NAME##_t<uint16_t> ARGS; }

/* Sum over the 32 lanes of a warp (every lane gets the result; fixed butterfly order: deterministic). */
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Max over the 32 lanes of a warp. */
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Dense row of compact row j: rows[j], or j when rows is null (RowSet::All). */
__device__ __forceinline__ uint64_t dense_row(const uint32_t* rows, uint64_t j) {
    return rows ? (uint64_t)rows[j] : j;
}

/* First index and stride of a 1-D grid-stride loop. */
__device__ __forceinline__ uint64_t gs_start() { return (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ uint64_t gs_stride() { return (uint64_t)gridDim.x * blockDim.x; }

/* dst[col] += sum over chunks c (in order) of partial[c * width + col]: the second half of a deterministic
 * column sum (a grid-stride loop over columns). */
__device__ __forceinline__ void column_reduce_add_body(float* dst, const float* partial, uint64_t chunks,
                                                       uint64_t width) {
    for (uint64_t col = gs_start(); col < width; col += gs_stride()) {
        float acc = 0.0f;
        for (uint64_t c = 0; c < chunks; ++c) acc += partial[c * width + col];
        dst[col] += acc;
    }
}

#endif /* ESLM_COMMON_CUH */
