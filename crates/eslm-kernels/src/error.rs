//! The crate's one error type. Every user-controlled input (shapes, strides, α, k, scores, targets) is checked
//! and reported through [`KernelError`]; nothing a caller passes makes a kernel panic.

/// Errors returned by every kernel entry point.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A buffer's length or a dimension does not match what the other arguments imply.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        /// Which argument is wrong, e.g. "logits" or "targets".
        what: &'static str,
        /// What the other arguments imply.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// α (the fraction of valid rows dropped) must lie strictly inside (0, 1).
    #[error("alpha must be in (0, 1), got {0}")]
    InvalidAlpha(f64),
    /// An exact top-k needs 1 ≤ k ≤ M (the number of valid rows).
    #[error("top-k needs 1 <= k <= {valid} valid rows, got k = {k}")]
    InvalidK {
        /// The requested k.
        k: usize,
        /// The number of valid rows.
        valid: usize,
    },
    /// Selection was asked to choose among zero valid rows (every target ignored, or an empty batch).
    #[error("no valid rows to select from (empty batch or every target ignored)")]
    NoValidRows,
    /// A valid row's score is NaN. NaN is an error, not a score (a NaN usually means the model diverged).
    #[error("score of row {row} is NaN")]
    NanScore {
        /// The first row (lowest index) whose score is NaN.
        row: usize,
    },
    /// Valid rows hold NaN scores (the global selection counts them over every rank).
    #[error("{count} valid rows have a NaN score (over every rank)")]
    NanScores {
        /// How many.
        count: usize,
    },
    /// The cross-rank reduction of a global selection failed.
    #[error("reduction across ranks failed: {0}")]
    Reduce(String),
    /// A target id is neither the ignore value nor inside `[0, vocab)`.
    #[error("target {target} at row {row} is outside the vocabulary [0, {vocab}) and is not the ignore value")]
    TargetOutOfRange {
        /// Row index.
        row: usize,
        /// The offending id.
        target: i64,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A kept-row index (sparse cross-entropy) is not a row of the logits.
    #[error("kept[{position}] = {row} is not a row index (the logits have {rows} rows)")]
    KeptRowOutOfRange {
        /// Position in the kept list.
        position: usize,
        /// The offending row index.
        row: u32,
        /// Number of rows.
        rows: usize,
    },
    /// A kept row's target is not in `[0, vocab)` (an ignored row was kept: selection never does this).
    #[error("kept row {row} has target {target} outside the vocabulary [0, {vocab}); ignored rows cannot be kept")]
    KeptTargetOutOfRange {
        /// Row index.
        row: usize,
        /// The offending id.
        target: i64,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The kept count K (read on the device, e.g. a VaR selection whose ties kept more than ⌈(1 − α)·M⌉ rows) is
    /// larger than the capacity of the sparse cross-entropy's buffers; nothing was computed (the gradient rows
    /// were zeroed, the loss is NaN).
    #[error(
        "sparse CE: the kept count {count} exceeds the capacity of {capacity} rows (kept indices, dlogits or \
         scratch); nothing was computed. HINT: size the buffers for the selection's count (VaR keeps every tie), \
         e.g. for all valid rows"
    )]
    KeptOverCapacity {
        /// K as the kernel read it.
        count: usize,
        /// The rows the buffers hold.
        capacity: usize,
    },
    /// No CUDA driver (libcuda) could be loaded on this machine.
    #[error("no CUDA driver found; use --device cpu (or the CPU backend of eslm-kernels)")]
    NoCudaDriver,
    /// A CUDA call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

/// `Result` with [`KernelError`].
pub type Result<T> = std::result::Result<T, KernelError>;

/// Returns a [`KernelError::Shape`] unless `got == expected`.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::Shape {
            what,
            expected: format!("length {expected}"),
            got: format!("length {got}"),
        })
    }
}
