//! The trainer library's error type. Everything a user controls (flags, config files, data, checkpoints) is
//! reported through [`TrainError`]; the binary wraps it in `anyhow` with hints.

use std::path::PathBuf;

/// Errors of the trainer library.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A flag or config value is invalid (the message says which and what to do).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A kernel rejected its inputs.
    #[error("kernel error: {0}")]
    Kernel(#[from] eslm_kernels::KernelError),
    /// The data crate failed (missing shard, bad header, ...).
    #[error("data error: {0}")]
    Data(#[from] eslm_data::DataError),
    /// The model engine failed.
    #[error("model error: {0}")]
    Model(String),
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint is missing, incomplete or does not match the run.
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    /// A token id is not below the model's vocabulary size.
    #[error("token id {id} is outside the model vocabulary [0, {vocab}); HINT: the data was tokenized for another vocabulary")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// The loss or gradient norm became NaN or infinite.
    #[error("non-finite loss or gradient norm ({loss}) at step {step}; {hint}")]
    NonFinite {
        /// The step at which it happened.
        step: u64,
        /// The non-finite value.
        loss: f32,
        /// The last good checkpoint (from before the update that broke the model), if any.
        checkpoint: Option<PathBuf>,
        /// What to resume from and what to change.
        hint: String,
    },
    /// The divergence guard fired (see `guard`).
    #[error("training diverged: {reason}; {hint}")]
    Diverged {
        /// The step at which it was detected.
        step: u64,
        /// The rule that fired, with the values.
        reason: String,
        /// The last good checkpoint (from before the update that broke the model), if any.
        checkpoint: Option<PathBuf>,
        /// What to resume from and what to change.
        hint: String,
    },
    /// `--device cuda` was asked of a build without the `cuda` feature.
    #[error(
        "--device cuda: this eslm-train was built without CUDA support; rebuild with `cargo build --release \
         --features cuda` (see README, \"Building the CUDA feature\"), or use --device cpu"
    )]
    CudaUnavailable,
    /// The requested device cannot be used (no CUDA driver, no such GPU, ...); the message says what to do.
    #[error("device error: {0}")]
    Device(String),
    /// An evaluation file is malformed.
    #[error("eval format error in {}: {message}", path.display())]
    EvalFormat {
        /// The file involved.
        path: PathBuf,
        /// What is wrong (with the line number).
        message: String,
    },
    /// A collective operation across data-parallel ranks failed.
    #[error("collective: {0}")]
    Collective(#[from] eslm_collective::CollectiveError),
    /// JSON (de)serialisation failed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
    /// Plotting failed.
    #[error("plot error: {0}")]
    Plot(String),
}

impl TrainError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

/// The one token-range check of the trainer: every id in `ids` must be `< vocab`, else
/// [`TrainError::TokenOutOfRange`] with the first offending id.
pub fn check_tokens<'a>(ids: impl IntoIterator<Item = &'a u32>, vocab: usize) -> Result<()> {
    match ids.into_iter().find(|&&x| x as usize >= vocab) {
        Some(&id) => Err(TrainError::TokenOutOfRange { id, vocab }),
        None => Ok(()),
    }
}

impl From<eslm_gpt2::Gpt2Error> for TrainError {
    fn from(e: eslm_gpt2::Gpt2Error) -> Self {
        match e {
            eslm_gpt2::Gpt2Error::Kernel(k) => TrainError::Kernel(k),
            other => TrainError::Model(other.to_string()),
        }
    }
}
