//! # eslm-kernels
//!
//! The three kernel families that make selective language modeling cheap, with a CPU backend (always built,
//! the reference) and a CUDA backend (feature `cuda`). No dependency on any engine: embed it anywhere.
//!
//! 1. [`token_stats()`]: per-row log-sum-exp, loss `lse − z_y` and predictive entropy `lse − Σ softmax(z)·z`,
//!    in one pass over each logits row.
//! 2. [`select()`]: VaR (keep the rows whose score is ≥ the k-th largest, k = ⌈(1 − α)·M⌉) or exact top-k;
//!    O(N) radix select, deterministic.
//! 3. [`sparse_ce()`]: `dlogits = (softmax(z) − onehot(y))·g` for the kept rows only, into a compact `[K, V]`
//!    buffer, plus the mean loss over kept rows.
//!
//! One selective step's loss head, as an engine embeds it: statistics of every row, the VaR selection on the
//! loss (CVaR: the mean over kept rows), and the gradient of the kept rows only — which the engine then feeds to
//! its LM-head backward as `[K, V]` instead of `[N, V]`.
//!
//! ```
//! use eslm_kernels::{select, sparse_ce, token_stats, LogitsView, SelectRule, Selection, TokenStats};
//! use eslm_kernels::DEFAULT_IGNORE_INDEX as IGNORE;
//!
//! // 4 rows of logits over a vocabulary of 3, stored with a row stride of 4 (padding is never read).
//! let logits = [
//!     2.0f32, 0.0, 0.0, 9.9, //
//!     0.0, 0.0, 0.0, 9.9, //
//!     0.0, 3.0, 0.0, 9.9, //
//!     1.0, 1.0, 1.0, 9.9,
//! ];
//! let view = LogitsView::new(&logits, 4, 3, 4)?;
//! let targets = [0, 2, 0, IGNORE]; // the last row is padding
//!
//! let mut stats = TokenStats::new();
//! token_stats(&view, &targets, IGNORE, &mut stats)?;
//! assert_eq!(stats.valid, [true, true, true, false]);
//!
//! // Drop the 2/3 easiest of the 3 valid rows: keep k = ⌈(1 − α)·M⌉ = 1 row, the highest loss (row 2).
//! let mut kept = Selection::new();
//! select(&stats.loss, Some(&stats.valid), SelectRule::Var { alpha: 2.0 / 3.0 }, &mut kept)?;
//! assert_eq!(kept.indices, [2]);
//!
//! // dlogits of the kept rows only, compact [K, stride]; the returned loss is their mean (CVaR).
//! let mut dlogits = vec![0.0f32; kept.indices.len() * 4];
//! let scale = 1.0 / kept.indices.len() as f32;
//! let cvar = sparse_ce(&view, &targets, &stats.lse, &kept.indices, scale, &mut dlogits, 4)?;
//! assert!((cvar - stats.loss[2]).abs() < 1e-6);
//! assert!(dlogits[0] < 0.0 && dlogits[1] > 0.0); // pushes the target (column 0) up, column 1 down
//! # Ok::<(), eslm_kernels::KernelError>(())
//! ```
//!
//! The CUDA backend (module `cuda`, behind the `cuda` feature) has the same three calls on device buffers,
//! stream-ordered, with the statistics and the kept indices staying on the device.

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
