//! The crate's one error type. Every file, flag and datum a user controls is checked and reported through
//! [`DataError`]; errors about a file name the file and say what is wrong with it.

use std::path::PathBuf;

/// Errors returned by every fallible function of `eslm-data`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An operating-system error while reading or writing `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a valid llm.c token shard (wrong magic, version, size, truncated, ...).
    #[error("{path}: not a valid token shard: {reason}")]
    BadShard {
        /// The shard file.
        path: PathBuf,
        /// What is wrong, e.g. "wrong magic 12345 (expected 20240520 or 20240801)".
        reason: String,
    },
    /// A token id does not fit the shard's token width or the vocabulary.
    #[error("{path}: token {token} at position {position} is outside the vocabulary [0, {vocab})")]
    TokenOutOfRange {
        /// The shard file (or `<memory>` for in-memory data).
        path: PathBuf,
        /// Index of the token inside the shard.
        position: u64,
        /// The offending id.
        token: u32,
        /// The exclusive upper bound that was checked.
        vocab: u64,
    },
    /// A loader or generator configuration is unusable (zero batch size, rank ≥ world size, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The shards hold too few tokens to form a single window of `seq_len + 1` tokens for every rank.
    #[error("not enough data: {0}")]
    NotEnoughData(String),
    /// A saved loader state does not belong to this loader (other seed, shards or shapes).
    #[error("loader state does not match this loader: {0}")]
    StateMismatch(String),
    /// A glob or input path matched no file.
    #[error("no input files: {0}")]
    NoInput(String),
    /// The tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An input file is malformed (invalid UTF-8, bad JSON line, missing field) and the run is strict.
    #[error("{path}: {reason}")]
    BadInput {
        /// The input file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds a [`DataError::BadShard`] for `path`.
    pub fn bad_shard(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::BadShard {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Shorthand for `Result<T, DataError>`.
pub type Result<T> = std::result::Result<T, DataError>;
