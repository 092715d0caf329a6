/*
 * rows.cu: gather and scatter-add of rows (a RowSet's kept rows). CPU counterpart: crates/eslm-gpt2/src/ops/mod.rs
 * (gather, scatter_add).
 *
 *     gather_rows:       dst[j, :]  = src[rows[j], :]        (compact [K, width] from dense [N, width])
 *     scatter_add_rows:  dst[i, :] += g[j, :],  i = rows[j]  (or j when rows is null: RowSet::All)
 *
 * The kept rows are strictly ascending (distinct), so the scatter needs no atomics.
 *
 * Launch: ESLM_EW_THREADS threads per block, grid-stride over K * width. Each kernel has a bf16-activation twin
 * NAME_bf16 (common.cuh, ESLM_TWINS).
 */
#include "common.cuh"

#define EW_THREADS ESLM_EW_THREADS

/* Gather copies elements as they are (any element type of the same size would do; f32 and bf16 twins). */
#define GATHER_PARAMS(A)                                                                                       \
    A *__restrict__ dst, const A *__restrict__ src, const uint32_t *__restrict__ rows, uint64_t k, uint64_t width
template <typename A>
__device__ __forceinline__ void gather_rows_t(GATHER_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        dst[idx] = src[(uint64_t)rows[j] * width + col];
    }
}
ESLM_TWINS(gather_rows, EW_THREADS, GATHER_PARAMS, (dst, src, rows, k, width))

#define SCATTER_ADD_PARAMS(A)                                                                                  \
    A *__restrict__ dst, const A *__restrict__ g, const uint32_t *__restrict__ rows, uint64_t k, uint64_t width
template <typename A>
__device__ __forceinline__ void scatter_add_rows_t(SCATTER_ADD_PARAMS(A)) {
    ESLM_REQUIRE_BLOCK(EW_THREADS);
    const uint64_t total = k * width;
    for (uint64_t idx = gs_start(); idx < total; idx += gs_stride()) {
        const uint64_t j = idx / width, col = idx % width;
        A* d = dst + dense_row(rows, j) * width + col;
        st(d, ld(d) + ld(g + idx));
    }
}
ESLM_TWINS(scatter_add_rows, EW_THREADS, SCATTER_ADD_PARAMS, (dst, g, rows, k, width))
