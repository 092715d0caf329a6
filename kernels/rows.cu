/*
 * rows.cu: gather and scatter-add of rows (a RowSet's kept rows). CPU counterpart: crates/eslm-gpt2/src/ops/mod.rs
 * (gather, scatter_add).
 *
 *     gather_rows:       dst[j, :]  = src[rows[j], :]        (compact [K, width] from dense [N, width])
 *     scatter_add_rows:  dst[i, :] += g[j, :],  i = rows[j]  (or j when rows is null: RowSet::All)
 *
 * The kept rows are strictly ascending (distinct), so the scatter needs no atomics.
 *
 * Launch: ESLM_EW_THREADS threads per block, grid-stride over K * width.
 */
#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS

extern "C" __global__ void __launch_bounds__(EW_THREADS)
gather_rows(float* __restrict__ dst, const float* __restrict__ src, const uint32_t* __restrict__ rows, uint64_t k,
            uint64_t width) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        dst[idx] = src[(uint64_t)rows[j] * width + col];
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
scatter_add_rows(float* __restrict__ dst, const float* __restrict__ g, const uint32_t* __restrict__ rows, uint64_t k,
                 uint64_t width) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        dst[dense_row(rows, j) * width + col] += g[idx];
    }
}
