//! # eslm-kernels
//!
//! The three kernel families that make selective language modeling cheap, with a CPU backend (always built,
//! the reference) and a CUDA backend (feature `cuda`). No dependency on any engine: embed it anywhere.
//!
//! 1. [`token_stats`]: per-row log-sum-exp, loss `lse − z_y` and predictive entropy `lse − Σ softmax(z)·z`,
//!    in one pass over each logits row.
//! 2. [`select`]: VaR (keep the rows whose score is ≥ the k-th largest, k = ⌈(1 − α)·M⌉) or exact top-k;
//!    O(N) radix select, deterministic.
//! 3. [`sparse_ce`]: `dlogits = (softmax(z) − onehot(y))·g` for the kept rows only, into a compact `[K, V]`
//!    buffer, plus the mean loss over kept rows.

#![warn(missing_docs)]

mod cpu_features;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod fast_exp;
pub mod global_select;
pub mod kd;
pub mod layout;
pub mod select;
pub mod sparse_ce;
pub mod token_stats;

pub use error::{KernelError, Result};
pub use layout::{LogitElem, LogitsView};
pub use select::{select, var_keep_count, SelectRule, Selection};
pub use sparse_ce::sparse_ce;
pub use token_stats::{token_stats, TokenStats, DEFAULT_IGNORE_INDEX};
