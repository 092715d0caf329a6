/*
 * eslm_kernels.h: the parameter structs and constants shared by the CUDA kernels (kernels/*.cu) and the Rust
 * launchers (crates/eslm-kernels/src/cuda/). build.rs runs bindgen over this file, so the two sides cannot drift.
 *
 * Plain C (no CUDA types): every struct is passed BY VALUE as one kernel argument; device pointers are separate
 * kernel arguments. Sizes are in ELEMENTS, not bytes. Shapes are written next to each field.
 */
#ifndef ESLM_KERNELS_H
#define ESLM_KERNELS_H

#include <stdint.h>

/* ---- device status word: bits OR-ed by the kernels, read lazily by the host (no sync inside a step) ---- */
/* A valid target is outside [0, vocab) (token_stats: the row is treated as ignored). */
#define ESLM_STATUS_TARGET_OUT_OF_RANGE 1u
/* A valid row's score is NaN (select: nothing is kept; nan_row holds the lowest such row). */
#define ESLM_STATUS_NAN_SCORE 2u
/* No valid row to select from (select: nothing is kept). */
#define ESLM_STATUS_NO_VALID_ROWS 4u
/* Top-k with k > M valid rows (select: nothing is kept). */
#define ESLM_STATUS_INVALID_K 8u
/* sparse_ce: a kept index >= rows, or a kept row whose target is outside [0, vocab) (its output row is zeroed). */
#define ESLM_STATUS_BAD_KEPT_ROW 16u
/* sparse_ce: the device kept count K exceeds the capacity (max_kept) of kept / dlogits / scratch (VaR ties can keep
 * more than ceil((1 - alpha) M) rows). Nothing is computed: every output row is zeroed and the loss is NaN; the
 * count the kernel read is stored next to the status word so the host can name it. */
#define ESLM_STATUS_KEPT_OVER_CAPACITY 32u

/* select: indices entries [count, capacity) hold this value after a selection (never a row: rows < 2^32 - 1). */
#define ESLM_NO_ROW 0xFFFFFFFFu

/* ---- block sizes: the ONE definition, used by the .cu launch bounds, loops and CUB templates and by the Rust
 * launchers (through bindgen). Every kernel traps (__trap) if launched with another block size. ---- */
/* token_stats_*: one block per row. */
#define ESLM_TS_THREADS 512
/* sparse_ce_*: one block per kept row. */
#define ESLM_CE_THREADS 512
/* sparse_ce_loss: one block. */
#define ESLM_CE_REDUCE_THREADS 256
/* select_init, select_histogram, select_tile_counts, select_write. */
#define ESLM_SEL_THREADS 256
/* select: rows per thread in a tile (tile = ESLM_SEL_THREADS * ESLM_SEL_ITEMS rows). */
#define ESLM_SEL_ITEMS 8
/* select_pick: two histogram bins per thread (ESLM_SELECT_BINS / 2). */
#define ESLM_SEL_PICK_THREADS 1024
/* select_tile_scan: one block. */
#define ESLM_SEL_SCAN_THREADS 512

/* ---- the engine's CUDA backend (crates/eslm-gpt2/src/backend/cuda/mod.rs), one family per .cu file ---- */
/* encoder.cu: encoder_forward (grid-stride over n * C), encoder_backward_buckets (one block per bucket). */
#define ESLM_ENC_THREADS 256
/* layernorm.cu: one warp per row (forward and dx); layernorm_backward_params: one thread per column. */
#define ESLM_LN_THREADS 256
/* gelu.cu, residual.cu, rows.cu, scale.cu, linear.cu (bias): elementwise grid-stride kernels. */
#define ESLM_EW_THREADS 256
/* attention.cu: one warp per row of P (softmax forward and backward). */
#define ESLM_ATT_THREADS 256
/* adamw.cu: elementwise. */
#define ESLM_ADAMW_THREADS 256
/* global_norm.cu: fixed grid of ESLM_NORM_BLOCKS blocks (f64 partial per block), then one block sums them in
 * order: the result does not depend on timing. */
#define ESLM_NORM_THREADS 256
#define ESLM_NORM_BLOCKS 512
/* layernorm.cu, linear.cu: column sums (weight / bias gradients) are taken over chunks of this many rows into a
 * [chunks, width] partial buffer, then the chunks are added in order (deterministic). */
#define ESLM_COLSUM_ROWS 64
/* kd.cu: one block per kept row (maxima, sums and KL in fixed shared-memory trees). */
#define ESLM_KD_THREADS 256

/* ---- selection ---- */
/* Radix digits of the 32-bit keys, most significant first: 11 + 11 + 10 bits. */
#define ESLM_SELECT_DIGIT_BITS 11
#define ESLM_SELECT_BINS 2048
#define ESLM_SELECT_PASSES 3
/* VaR rounding: (1 - alpha) M within ESLM_VAR_SNAP_REL * M of an integer snaps to it, else rounds up. Must equal
 * the band of the CPU's var_keep_count (crates/eslm-kernels/src/select.rs); the parity tests compare k. */
#define ESLM_VAR_SNAP_REL 1e-13
/* Rules. */
#define ESLM_RULE_VAR 0
#define ESLM_RULE_TOPK 1

/* token_stats: logits [rows, stride] (vocab real columns), targets [rows] -> lse, loss, entropy [rows], valid [rows]. */
typedef struct EslmTokenStatsParams {
    uint64_t rows;        /* N */
    uint64_t vocab;       /* V, >= 1 */
    uint64_t stride;      /* elements between row starts, >= V */
    int32_t ignore_index; /* targets equal to this are ignored */
    int32_t _pad;
} EslmTokenStatsParams;

/* select: scores [rows], valid [rows] (u8, optional) -> state, keep [rows] (u8), indices [capacity] (u32: the kept
 * rows ascending in [0, count), ESLM_NO_ROW in [count, capacity)). */
typedef struct EslmSelectParams {
    uint64_t rows;      /* N, < 2^32 - 1 */
    uint64_t capacity;  /* entries of indices, >= rows */
    double alpha;       /* VaR: fraction dropped, in (0, 1) (checked on the host) */
    uint64_t topk;      /* TopK: requested k (1 <= k <= M checked on the device) */
    int32_t rule;       /* ESLM_RULE_VAR or ESLM_RULE_TOPK */
    int32_t has_valid;  /* 0: every row is valid (the valid pointer is not read) */
} EslmSelectParams;

/*
 * The selection's device-side state (one struct in device memory, zeroed before each selection except nan_row,
 * which starts at 0xFFFFFFFF). After the last kernel: threshold_key / threshold, k, count (the kept count) and
 * status are final; the host reads them only when it asks (logging), never inside a step.
 */
typedef struct EslmSelectState {
    uint32_t status;        /* ESLM_STATUS_* bits */
    uint32_t nan_row;       /* lowest valid row with a NaN score (0xFFFFFFFF if none) */
    uint32_t valid_count;   /* M */
    uint32_t k;             /* target count: VaR ceil((1 - alpha) M) (float-robust), top-k: the requested k */
    uint32_t prefix;        /* the threshold key's bits fixed so far (the final threshold key after 3 passes) */
    uint32_t rank;          /* rank of the threshold among keys matching prefix (1 = largest) */
    uint32_t above;         /* valid keys strictly greater than every key matching prefix */
    uint32_t equal;         /* valid keys equal to the threshold key (after the last pass) */
    uint32_t ties_allowed;  /* how many keys equal to the threshold are kept (VaR: all; top-k: k - above) */
    uint32_t count;         /* kept rows: above + min(equal, ties_allowed); 0 on error */
    float threshold;        /* the k-th largest valid score (-0.0 reported as +0.0) */
    uint32_t _pad;
} EslmSelectState;

/* sparse_ce: logits [rows, stride], targets [rows], lse [rows], kept [max_kept] (the first K used), K (device)
 *   -> dlogits [max_kept, out_stride]: rows [0, K) the gradients, rows [K, max_kept) zeroed;
 *      status [2]: ESLM_STATUS_* bits in status[0], the K the kernel read in status[1]. */
typedef struct EslmSparseCeParams {
    uint64_t rows;        /* N */
    uint64_t vocab;       /* V */
    uint64_t stride;      /* logits row stride (elements) */
    uint64_t out_stride;  /* dlogits row stride (elements), >= V; columns V..out_stride are zeroed */
    uint64_t max_kept;    /* capacity of kept / dlogits rows; K > max_kept is ESLM_STATUS_KEPT_OVER_CAPACITY */
    float scale;          /* g: gradient scale */
    int32_t divide_by_count; /* 1: use g / count (count read on the device), e.g. scale = 1 gives the mean */
} EslmSparseCeParams;

#endif /* ESLM_KERNELS_H */
