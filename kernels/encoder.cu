/*
 * encoder.cu: token + position embedding. CPU counterpart: crates/eslm-gpt2/src/ops/encoder.rs.
 *
 *     forward:   out[i, :] = wte[tokens[i], :] + wpe[i mod T, :]                    (i < n)
 *     backward:  dwte[tokens[i], :] += dout[j, :],  dwpe[i mod T, :] += dout[j, :]  (i = rows[j], the kept rows)
 *
 * The backward adds many rows into one embedding row (repeated tokens, every sequence's position p). Instead of
 * atomics (order-dependent float sums) the host groups the compact rows into BUCKETS by destination row (token
 * id, or position), each bucket's rows in ascending order; one block per bucket adds them in that order. So the
 * sum is deterministic and adds the rows in the same order as the CPU loop.
 *
 * Launch: ESLM_ENC_THREADS threads per block; forward grid-stride over n * C, backward one block per bucket
 * (grid-stride over buckets). Each kernel has a bf16-activation twin (NAME_bf16: out / dout in bf16, the
 * embeddings and their gradients f32; common.cuh, ESLM_TWINS).
 */
#include "common.cuh"

#define ENC_THREADS ESLM_ENC_THREADS

#define ENC_FORWARD_PARAMS(A)                                                                                  \
    A *__restrict__ out, const uint32_t *__restrict__ tokens, const float *__restrict__ wte,                     \
        const float *__restrict__ wpe, uint64_t n, uint64_t t, uint64_t c
template <typename A>
__device__ __forceinline__ void encoder_forward_t(ENC_FORWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(ENC_THREADS);
    const uint64_t total = n * c;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t i = idx / c, col = idx % c;
        st(out + idx, wte[(uint64_t)tokens[i] * c + col] + wpe[(i % t) * c + col]);
    }
}
ESLM_TWINS(encoder_forward, ENC_THREADS, ENC_FORWARD_PARAMS, (out, tokens, wte, wpe, n, t, c))

/* Bucket b: destination row keys[b] of dw [*, C]; its source rows are dout[perm[s], :] for s in
 * [starts[b], starts[b + 1]) (compact row indices, ascending within the bucket). */
#define ENC_BACKWARD_PARAMS(A)                                                                                 \
    float *__restrict__ dw, const A *__restrict__ dout, const uint32_t *__restrict__ perm,                       \
        const uint32_t *__restrict__ keys, const uint32_t *__restrict__ starts, uint64_t buckets, uint64_t c
template <typename A>
__device__ __forceinline__ void encoder_backward_buckets_t(ENC_BACKWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(ENC_THREADS);
    for (uint64_t b = blockIdx.x; b < buckets; b += gridDim.x) {
        float* dst = dw + (uint64_t)keys[b] * c;
        const uint32_t s0 = starts[b], s1 = starts[b + 1];
        for (uint64_t col = threadIdx.x; col < c; col += ENC_THREADS) {
            float acc = dst[col];
            for (uint32_t s = s0; s < s1; ++s) acc += ld(dout + (uint64_t)perm[s] * c + col);
            dst[col] = acc;
        }
    }
}
ESLM_TWINS(encoder_backward_buckets, ENC_THREADS, ENC_BACKWARD_PARAMS, (dw, dout, perm, keys, starts, buckets, c))
