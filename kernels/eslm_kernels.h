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

/* select: scores [rows], valid [rows] (u8, optional) -> state, keep [rows] (u8), indices [<= rows] (u32, ascending). */
typedef struct EslmSelectParams {
    uint64_t rows;      /* N, < 2^32 */
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

/* sparse_ce: logits [rows, stride], targets [rows], lse [rows], kept [count] -> dlogits [count, out_stride]. */
typedef struct EslmSparseCeParams {
    uint64_t rows;        /* N */
    uint64_t vocab;       /* V */
    uint64_t stride;      /* logits row stride (elements) */
    uint64_t out_stride;  /* dlogits row stride (elements), >= V; columns V..out_stride are zeroed */
    uint64_t max_kept;    /* capacity of kept / dlogits rows: the device count is clamped to it */
    float scale;          /* g: gradient scale */
    int32_t divide_by_count; /* 1: use g / count (count read on the device), e.g. scale = 1 gives the mean */
} EslmSparseCeParams;

#endif /* ESLM_KERNELS_H */
