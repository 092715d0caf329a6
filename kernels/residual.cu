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
 * Launch: ESLM_EW_THREADS threads per block, grid-stride over rows_out * width.
 */
#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS

extern "C" __global__ void __launch_bounds__(EW_THREADS)
residual_forward(float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b, uint64_t len) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    for (uint64_t i = gs_start(); i < len; i += gs_stride()) out[i] = a[i] + b[i];
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
residual_merge(float* __restrict__ out, const float* __restrict__ ga, const int32_t* __restrict__ ia,
               const float* __restrict__ gb, const int32_t* __restrict__ ib, uint64_t rows_out, uint64_t width) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = rows_out * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        const int32_t a = ia[j], b = ib[j];
        float v;
        if (a >= 0 && b >= 0)
            v = ga[(uint64_t)a * width + col] + gb[(uint64_t)b * width + col];
        else if (a >= 0)
            v = ga[(uint64_t)a * width + col];
        else
            v = gb[(uint64_t)b * width + col];
        out[idx] = v;
    }
}
