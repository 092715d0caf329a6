//! The crate's error type. Every user-controlled input (configs, batch shapes, token ids, kept-row lists,
//! gradient buffers, optimizer settings) is checked and reported through [`Gpt2Error`]; nothing panics on it.

use eslm_kernels::KernelError;

/// Errors returned by the engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Gpt2Error {
    /// A model configuration is inconsistent (e.g. `n_embd` not divisible by `n_head`).
    #[error("invalid GPT-2 config: {0}")]
    InvalidConfig(String),
    /// A buffer's length or a dimension does not match what the other arguments imply.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        /// Which argument is wrong, e.g. "inputs" or "dlogits".
        what: &'static str,
        /// What the other arguments imply.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// A batch larger than the buffers allocated at construction (`B ≤ B_max`, `T ≤ T_max`, `T ≤ max_seq_len`).
    #[error("batch {b}x{t} exceeds the allocated maximum {b_max}x{t_max}; HINT: build the model with a larger max batch")]
    BatchTooLarge {
        /// Requested batch size.
        b: usize,
        /// Requested sequence length.
        t: usize,
        /// Allocated batch size.
        b_max: usize,
        /// Allocated sequence length.
        t_max: usize,
    },
    /// An input token id outside `[0, vocab_size)`.
    #[error("token {token} at position {pos} is outside the vocabulary [0, {vocab})")]
    TokenOutOfRange {
        /// Flat position in the batch.
        pos: usize,
        /// The offending id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The kept-row list is not strictly ascending, is empty, or names a row outside the batch.
    #[error("invalid kept rows: {0}")]
    InvalidKept(String),
    /// `backward*` was called without a preceding full `forward` (a shallow/inference forward keeps no
    /// activations).
    #[error("backward needs a preceding full forward (forward_shallow/forward_inference keep no activations)")]
    NoForward,
    /// An optimizer or schedule hyper-parameter is out of range.
    #[error("invalid hyper-parameter: {0}")]
    InvalidHyperParameter(String),
    /// An error from an `eslm-kernels` kernel (statistics, selection, sparse CE).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The backend does not implement this operation (e.g. KD on the CUDA backend, for now).
    #[error("unsupported on this backend: {0}")]
    Unsupported(String),
    /// A collective operation across ranks failed.
    #[error("collective: {0}")]
    Collective(String),
}

/// `Result` with [`Gpt2Error`].
pub type Result<T> = std::result::Result<T, Gpt2Error>;

/// Returns a [`Gpt2Error::Shape`] unless `got == expected`.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Gpt2Error::Shape {
            what,
            expected: format!("length {expected}"),
            got: format!("length {got}"),
        })
    }
}
