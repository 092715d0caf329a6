/*
 * residual.cu: the residual add and the merge of two row-sparse gradients of one tensor. CPU counterpart:
 * crates/eslm-gpt2/src/ops/residual.rs (forward, merge).
 *
 *     residual_forward:  out = a + b                                      (len elements)
 *     residual_merge:    out[j, :] = ga[ia[j], :] + gb[ib[j], :]          (j < rows_out)
 *                        where an index of -1 means "that gradient has no such row" (the term is left out).
 *
 * The host computes the union row set and the two index maps (O(K) host vectors: the RowSets are host data);
 * the kernel only copies and adds, so every case of the CPU merge (equal sets, dense + sparse, two sparse sets)
 * is one launch, and a row present in only one input is copied exactly (no "+ 0").
 *
 * Launch: ESLM_EW_THREADS threads per block, grid-stride over rows_out * width. Each kernel has a bf16-activation
 * twin NAME_bf16 (common.cuh, ESLM_TWINS).
 */
#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS

#define RESIDUAL_FORWARD_PARAMS(A) A *__restrict__ out, const A *__restrict__ a, const A *__restrict__ b, uint64_t len
template <typename A>
__device__ __forceinline__ void residual_forward_t(RESIDUAL_FORWARD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    for (uint64_t i = gs_start(); i < len; i += gs_stride()) st(out + i, ld(a + i) + ld(b + i));
}
ESLM_TWINS(residual_forward, EW_THREADS, RESIDUAL_FORWARD_PARAMS, (out, a, b, len))

#define RESIDUAL_MERGE_PARAMS(A)                                                                               \
    A *__restrict__ out, const A *__restrict__ ga, const int32_t *__restrict__ ia, const A *__restrict__ gb,    \
        const int32_t *__restrict__ ib, uint64_t rows_out, uint64_t width
template <typename A>
__device__ __forceinline__ void residual_merge_t(RESIDUAL_MERGE_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = rows_out * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        const int32_t a = ia[j], b = ib[j];
        /* A row present in one input only is copied as it is (no rounding of "+ 0" in bf16 either). */
        if (a >= 0 && b >= 0)
            st(out + idx, ld(ga + (uint64_t)a * width + col) + ld(gb + (uint64_t)b * width + col));
        else if (a >= 0)
            out[idx] = ga[(uint64_t)a * width + col];
        else
            out[idx] = gb[(uint64_t)b * width + col];
    }
}
ESLM_TWINS(residual_merge, EW_THREADS, RESIDUAL_MERGE_PARAMS, (out, ga, ia, gb, ib, rows_out, width))
