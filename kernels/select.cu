/*
 * select.cu: exact on-device VaR / top-k selection by radix select, O(N), deterministic, no host round trip.
 *
 * Keys: each score maps to an order-preserving u32 key (key(a) > key(b) iff a > b): non-negative floats get the
 * sign bit set, negative floats have every bit flipped; -0.0 is first turned into +0.0. NaN in a valid row is an
 * error (ESLM_STATUS_NAN_SCORE); invalid rows are never read past their flag.
 *
 * Rule: with M valid rows, k = ceil((1 - alpha) M) (VaR; the same float-robust rounding as the CPU's
 * var_keep_count, in f64) or the requested k (top-k, 1 <= k <= M). The threshold T is the k-th largest valid key.
 * VaR keeps every valid row with key >= T (ties never split); top-k keeps every row with key > T plus the first
 * k - above rows (lowest indices) with key == T, where above = #{key > T}.
 *
 * Kernels, in launch order (all on one stream; the state lives in device memory, see EslmSelectState):
 *   select_init                    zero the 2048-bin histogram and the state
 *   3 x (select_histogram, select_pick)
 *                                  radix digits of 11, 11, 10 bits, most significant first. The histogram pass
 *                                  counts, among valid keys matching the prefix fixed so far, each value of the
 *                                  next digit (shared-memory atomics, then one global atomic per non-empty bin).
 *                                  The pick kernel (one block) scans the bins from the top (a CUB block scan), finds
 *                                  the bin holding the rank-th largest key, appends its digit to the prefix and
 *                                  narrows the rank (rank -= keys in higher bins). Pass 0 also counts M, detects
 *                                  NaN and computes k. After pass 2 the prefix IS the threshold key; equal = the
 *                                  size of its bin.
 *   select_tile_counts             per tile of SEL_TILE rows: #{key > T} and #{key == T}
 *   select_tile_scan               one block: exclusive prefix sums of those pairs over the tiles
 *   select_write                   per tile: a block scan gives, for row r, G(r) = #{key > T, row < r} and
 *                                  E(r) = #{key == T, row < r}. Row r is kept iff key > T, or key == T and
 *                                  E(r) < ties_allowed; a kept row goes to indices[G(r) + min(E(r), ties_allowed)],
 *                                  so the indices come out ascending. keep[r] is written for every row, and
 *                                  indices[j] = ESLM_NO_ROW for j in [count, capacity), so entries past the
 *                                  count never hold a previous selection's rows.
 * On an error (NaN score, no valid row, k > M) the count is 0, keep is all 0 and indices is all ESLM_NO_ROW.
 *
 * Block sizes: ESLM_SEL_THREADS, ESLM_SEL_PICK_THREADS and ESLM_SEL_SCAN_THREADS (eslm_kernels.h), checked at
 * every kernel's entry (ESLM_REQUIRE_BLOCK).
 */
#include <math.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common.cuh"

#define SEL_THREADS ESLM_SEL_THREADS           /* histogram, tile count and write kernels */
#define SEL_ITEMS ESLM_SEL_ITEMS               /* rows per thread in a tile (blocked: thread t owns rows t*ITEMS ..) */
#define SEL_TILE (SEL_THREADS * SEL_ITEMS)
#define SEL_PICK_THREADS ESLM_SEL_PICK_THREADS /* ESLM_SELECT_BINS / 2: two bins per thread */
#define SEL_SCAN_THREADS ESLM_SEL_SCAN_THREADS /* tile scan: 64-bit scan state, fewer threads keep it in registers */
static_assert(ESLM_SELECT_BINS == 2 * SEL_PICK_THREADS, "select_pick: two bins per thread");
static_assert(ESLM_SELECT_BINS == (1 << ESLM_SELECT_DIGIT_BITS), "11-bit digits");

/* Order-preserving map from a non-NaN float to u32 (-0.0 and +0.0 share a key). */
__device__ __forceinline__ uint32_t to_key(float x) {
    uint32_t b = __float_as_uint(x);
    if (b == 0x80000000u) b = 0u;
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float from_key(uint32_t k) {
    return (k >> 31) ? __uint_as_float(k & 0x7FFFFFFFu) : __uint_as_float(~k);
}

__device__ __forceinline__ bool row_valid(const EslmSelectParams& p, const uint8_t* __restrict__ valid,
                                          uint64_t r) {
    return !p.has_valid || valid[r] != 0;
}

/* Digit geometry of pass 0, 1, 2: shift of the digit and mask of the bits above it. */
__device__ __forceinline__ uint32_t digit_shift(uint32_t pass) { return pass == 0 ? 21u : (pass == 1 ? 10u : 0u); }
__device__ __forceinline__ uint32_t digit_mask(uint32_t pass) { return pass == 2 ? 0x3FFu : 0x7FFu; }
__device__ __forceinline__ uint32_t prefix_mask(uint32_t pass) {
    return pass == 0 ? 0u : (pass == 1 ? 0xFFE00000u : 0xFFFFFC00u);
}

extern "C" __global__ void __launch_bounds__(SEL_THREADS)
select_init(EslmSelectState* __restrict__ state, uint32_t* __restrict__ hist) {
    ESLM_REQUIRE_BLOCK(SEL_THREADS);
    for (uint32_t b = threadIdx.x; b < ESLM_SELECT_BINS; b += blockDim.x) hist[b] = 0u;
    if (threadIdx.x == 0) {
        EslmSelectState s = {};
        s.nan_row = 0xFFFFFFFFu;
        s.threshold = NAN;
        *state = s;
    }
}

extern "C" __global__ void __launch_bounds__(SEL_THREADS)
select_histogram(const EslmSelectParams p, const float* __restrict__ scores, const uint8_t* __restrict__ valid,
                 EslmSelectState* __restrict__ state, uint32_t* __restrict__ hist, const uint32_t pass) {
    ESLM_REQUIRE_BLOCK(SEL_THREADS);
    __shared__ uint32_t bins[ESLM_SELECT_BINS];
    __shared__ uint32_t block_valid;
    /* Passes 1 and 2 read a status that only the pick kernels wrote (previous launches): uniform exit. */
    if (pass > 0 && state->status != 0u) return;
    for (uint32_t b = threadIdx.x; b < ESLM_SELECT_BINS; b += SEL_THREADS) bins[b] = 0u;
    if (threadIdx.x == 0) block_valid = 0u;
    __syncthreads();
    const uint32_t shift = digit_shift(pass), dmask = digit_mask(pass), pmask = prefix_mask(pass);
    const uint32_t prefix = pass == 0 ? 0u : state->prefix;
    uint32_t my_valid = 0u;
    for (uint64_t r = (uint64_t)blockIdx.x * SEL_THREADS + threadIdx.x; r < p.rows;
         r += (uint64_t)gridDim.x * SEL_THREADS) {
        if (!row_valid(p, valid, r)) continue;
        const float x = scores[r];
        if (pass == 0) {
            my_valid++;
            if (isnan(x)) {
                atomicOr(&state->status, ESLM_STATUS_NAN_SCORE);
                atomicMin(&state->nan_row, (uint32_t)r);
                continue;
            }
        }
        const uint32_t key = to_key(x);
        if ((key & pmask) == prefix) atomicAdd(&bins[(key >> shift) & dmask], 1u);
    }
    if (pass == 0) {
        const uint32_t w = __reduce_add_sync(0xFFFFFFFFu, my_valid);
        if ((threadIdx.x & 31) == 0 && w != 0u) atomicAdd(&block_valid, w);
    }
    __syncthreads();
    for (uint32_t b = threadIdx.x; b < ESLM_SELECT_BINS; b += SEL_THREADS) {
        const uint32_t c = bins[b];
        if (c != 0u) atomicAdd(&hist[b], c);
    }
    if (pass == 0 && threadIdx.x == 0 && block_valid != 0u) atomicAdd(&state->valid_count, block_valid);
}

/* k for VaR: ceil((1 - alpha) M), snapped to the nearest integer when within ESLM_VAR_SNAP_REL M, clamped to [1, M].
 * Bit-identical to the CPU's var_keep_count: the same IEEE f64 operations (no contraction: explicit _rn). */
__device__ __forceinline__ uint32_t var_keep_count(double alpha, uint32_t m_valid) {
    const double m = (double)m_valid;
    const double x = __dmul_rn(__dsub_rn(1.0, alpha), m);
    const double nearest = round(x);
    const double k = (fabs(__dsub_rn(x, nearest)) <= __dmul_rn(ESLM_VAR_SNAP_REL, m)) ? nearest : ceil(x);
    uint32_t ki = k < 1.0 ? 1u : (k >= (double)m_valid ? m_valid : (uint32_t)k);
    return ki;
}

extern "C" __global__ void __launch_bounds__(SEL_PICK_THREADS)
select_pick(const EslmSelectParams p, EslmSelectState* __restrict__ state, uint32_t* __restrict__ hist,
            const uint32_t pass) {
    typedef cub::BlockScan<uint32_t, SEL_PICK_THREADS> Scan;
    __shared__ typename Scan::TempStorage scan_tmp;
    __shared__ uint32_t s_status, s_rank;
    ESLM_REQUIRE_BLOCK(SEL_PICK_THREADS);
    if (threadIdx.x == 0) {
        uint32_t status = state->status;
        if (pass == 0 && status == 0u) {
            const uint32_t m = state->valid_count;
            uint32_t k = 0u;
            if (m == 0u) {
                status |= ESLM_STATUS_NO_VALID_ROWS;
            } else if (p.rule == ESLM_RULE_VAR) {
                k = var_keep_count(p.alpha, m);
            } else if (p.topk == 0 || p.topk > (uint64_t)m) {
                status |= ESLM_STATUS_INVALID_K;
            } else {
                k = (uint32_t)p.topk;
            }
            state->k = k;
            state->rank = k;
            state->above = 0u;
            state->prefix = 0u;
            state->status = status;
        }
        if (status != 0u) {
            state->count = 0u;
            state->ties_allowed = 0u;
        }
        s_status = status;
        s_rank = state->rank;
    }
    __syncthreads();
    if (s_status != 0u) return;
    const uint32_t rank = s_rank;
    /* Thread t owns bins b0 = BINS-1-2t and b1 = b0-1: thread order = descending bin order. */
    const uint32_t b0 = ESLM_SELECT_BINS - 1u - 2u * threadIdx.x, b1 = b0 - 1u;
    const uint32_t h0 = hist[b0], h1 = hist[b1];
    hist[b0] = 0u; /* cleared for the next pass; no other thread reads these bins */
    hist[b1] = 0u;
    uint32_t higher; /* keys (matching the prefix) in bins above b0 */
    Scan(scan_tmp).ExclusiveSum(h0 + h1, higher);
    uint32_t digit = 0u, above_digit = 0u, eq = 0u;
    bool mine = false;
    if (higher < rank && rank <= higher + h0) {
        mine = true; digit = b0; above_digit = higher; eq = h0;
    } else if (higher + h0 < rank && rank <= higher + h0 + h1) {
        mine = true; digit = b1; above_digit = higher + h0; eq = h1;
    }
    if (mine) { /* exactly one thread: the bins' counts sum to >= rank >= 1 */
        const uint32_t prefix = state->prefix | (digit << digit_shift(pass));
        const uint32_t above = state->above + above_digit;
        state->prefix = prefix;
        state->above = above;
        state->rank = rank - above_digit;
        state->equal = eq;
        if (pass == ESLM_SELECT_PASSES - 1) {
            const uint32_t ties = (p.rule == ESLM_RULE_VAR) ? eq : state->k - above;
            state->ties_allowed = ties;
            state->count = above + (eq < ties ? eq : ties);
            state->threshold = from_key(prefix);
        }
    }
}

/* Row r's class against the threshold key: 2 = greater, 1 = equal, 0 = below or invalid. */
__device__ __forceinline__ uint32_t classify(const EslmSelectParams& p, const float* __restrict__ scores,
                                             const uint8_t* __restrict__ valid, uint32_t thr, uint64_t r) {
    if (r >= p.rows || !row_valid(p, valid, r)) return 0u;
    const uint32_t key = to_key(scores[r]);
    return key > thr ? 2u : (key == thr ? 1u : 0u);
}

/* Packs (greater, equal) counts into one u64 so a single scan carries both (counts < 2^32: no carry). */
__device__ __forceinline__ unsigned long long pack(uint32_t c) {
    return c == 2u ? (1ull << 32) : (c == 1u ? 1ull : 0ull);
}

extern "C" __global__ void __launch_bounds__(SEL_THREADS)
select_tile_counts(const EslmSelectParams p, const float* __restrict__ scores, const uint8_t* __restrict__ valid,
                   const EslmSelectState* __restrict__ state, unsigned long long* __restrict__ tile_counts) {
    typedef cub::BlockReduce<unsigned long long, SEL_THREADS> Reduce;
    __shared__ typename Reduce::TempStorage tmp;
    ESLM_REQUIRE_BLOCK(SEL_THREADS);
    if (state->status != 0u) return;
    const uint32_t thr = state->prefix;
    const uint64_t base = (uint64_t)blockIdx.x * SEL_TILE + (uint64_t)threadIdx.x * SEL_ITEMS;
    unsigned long long mine = 0ull;
#pragma unroll
    for (int j = 0; j < SEL_ITEMS; j++) mine += pack(classify(p, scores, valid, thr, base + j));
    const unsigned long long total = Reduce(tmp).Sum(mine);
    if (threadIdx.x == 0) tile_counts[blockIdx.x] = total;
}

extern "C" __global__ void __launch_bounds__(SEL_SCAN_THREADS)
select_tile_scan(const EslmSelectState* __restrict__ state, unsigned long long* __restrict__ tile_counts,
                 const uint32_t num_tiles) {
    typedef cub::BlockScan<unsigned long long, SEL_SCAN_THREADS> Scan;
    __shared__ typename Scan::TempStorage tmp;
    ESLM_REQUIRE_BLOCK(SEL_SCAN_THREADS);
    if (state->status != 0u) return;
    unsigned long long carry = 0ull;
    for (uint32_t base = 0; base < num_tiles; base += SEL_SCAN_THREADS) {
        const uint32_t t = base + threadIdx.x;
        const unsigned long long c = t < num_tiles ? tile_counts[t] : 0ull;
        unsigned long long excl, total;
        Scan(tmp).ExclusiveSum(c, excl, total);
        if (t < num_tiles) tile_counts[t] = carry + excl;
        carry += total;
        __syncthreads(); /* tmp is reused */
    }
}

extern "C" __global__ void __launch_bounds__(SEL_THREADS)
select_write(const EslmSelectParams p, const float* __restrict__ scores, const uint8_t* __restrict__ valid,
             const EslmSelectState* __restrict__ state, const unsigned long long* __restrict__ tile_prefix,
             uint8_t* __restrict__ keep, uint32_t* __restrict__ indices) {
    typedef cub::BlockScan<unsigned long long, SEL_THREADS> Scan;
    __shared__ typename Scan::TempStorage tmp;
    ESLM_REQUIRE_BLOCK(SEL_THREADS);
    const uint64_t base = (uint64_t)blockIdx.x * SEL_TILE + (uint64_t)threadIdx.x * SEL_ITEMS;
    /* indices [rows, capacity): never a row of this selection (stale entries of an earlier, larger one). */
    for (uint64_t j = p.rows + (uint64_t)blockIdx.x * SEL_THREADS + threadIdx.x; j < p.capacity;
         j += (uint64_t)gridDim.x * SEL_THREADS)
        indices[j] = ESLM_NO_ROW;
    if (state->status != 0u) {
        for (int j = 0; j < SEL_ITEMS; j++)
            if (base + j < p.rows) {
                keep[base + j] = 0;
                indices[base + j] = ESLM_NO_ROW;
            }
        return;
    }
    const uint32_t thr = state->prefix;
    const uint32_t ties = state->ties_allowed;
    const uint32_t count = state->count;
    uint32_t cls[SEL_ITEMS];
    unsigned long long mine = 0ull;
#pragma unroll
    for (int j = 0; j < SEL_ITEMS; j++) {
        cls[j] = classify(p, scores, valid, thr, base + j);
        mine += pack(cls[j]);
    }
    unsigned long long before;
    Scan(tmp).ExclusiveSum(mine, before);
    before += tile_prefix[blockIdx.x];
    uint32_t g = (uint32_t)(before >> 32), e = (uint32_t)(before & 0xFFFFFFFFull);
#pragma unroll
    for (int j = 0; j < SEL_ITEMS; j++) {
        const uint64_t r = base + j;
        if (r >= p.rows) break;
        const bool kept = cls[j] == 2u || (cls[j] == 1u && e < ties);
        if (kept) indices[g + (e < ties ? e : ties)] = (uint32_t)r;
        /* Slot r >= count is never a kept row's slot (those are < count): no two threads write one slot. */
        if (r >= count) indices[r] = ESLM_NO_ROW;
        keep[r] = kept ? 1 : 0;
        g += cls[j] == 2u;
        e += cls[j] == 1u;
    }
}
