//! Selection policies: which token positions of a micro-batch the loss keeps, and the gradient of the logits on
//! those rows.
//!
//! Every policy implements [`SelectionPolicy`]. The trainer drives one micro-batch as
//! 1. [`SelectionPolicy::filter_sequences`] (hierarchical only: drop whole sequences after a shallow pass),
//! 2. [`SelectionPolicy::prepare`] (Rho-1 / KD: run the reference or teacher model on the same tokens),
//! 3. the training forward and the token statistics (`lse`, loss, entropy) of the model's own logits,
//! 4. [`SelectionPolicy::scores`]: one score per row; the trainer keeps the rows with score ≥ the VaR threshold at
//!    [`SelectionPolicy::alpha`] (k = ⌈(1 − α)·M⌉ of the M valid rows, ties kept; `None` keeps every valid row),
//! 5. [`SelectionPolicy::gradient`]: `dlogits [K, Vp]` for the kept rows (cross-entropy by default) times `scale`,
//! 6. after the optimizer step, [`SelectionPolicy::observe`] with the step's scores and keep mask (Ada-ESLM).
//!
//! Policies only choose scores, α and the kept-row gradient; selection and the backward are shared.

pub mod ada;
pub mod clm;
pub mod eslm;
pub mod hierarchical;
pub mod kd;
pub mod random;
pub mod rho1;

use eslm_kernels::sparse_ce::sparse_ce;
use eslm_kernels::token_stats::TokenStats;
use eslm_kernels::LogitsView;

use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

pub use ada::{AdaConfig, AdaEslm};
pub use clm::Clm;
pub use eslm::Eslm;
pub use hierarchical::Hierarchical;
pub use kd::{kd_row_loss_grad, EslmKd, KdConfig};
pub use random::RandomKeep;
pub use rho1::{Rho1, Rho1Norm};

/// Which per-token statistic a policy ranks tokens by.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    /// Token cross-entropy `lse − z_y` (ESLM with this score minimises the CVaR of the loss).
    Loss,
    /// Predictive entropy `lse − Σ softmax(z)·z` (needs no target).
    Entropy,
}

impl ScoreKind {
    /// The score vector of `stats`.
    pub fn of<'a>(&self, stats: &'a TokenStats) -> &'a [f32] {
        match self {
            ScoreKind::Loss => &stats.loss,
            ScoreKind::Entropy => &stats.entropy,
        }
    }
}

/// What a policy sees of one micro-batch after the training forward.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// The model's logits `[b·t, Vp]`.
    pub logits: LogitsView<'a, f32>,
    /// Targets `[b·t]` (ignored rows carry the ignore index).
    pub targets: &'a [i32],
    /// Token statistics of `logits` (lse, loss, entropy, valid).
    pub stats: &'a TokenStats,
    /// Sequences in the micro-batch (after any sequence filtering).
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Optimizer step (0-based).
    pub step: u64,
}

/// A selection policy (see the module docs for the order of calls).
pub trait SelectionPolicy {
    /// Short name used in logs (`clm`, `eslm`, ...).
    fn name(&self) -> &'static str;

    /// Fraction of valid rows dropped this step (`None`: keep every valid row).
    fn alpha(&self) -> Option<f64>;

    /// Optionally drops whole sequences before the training forward; returns the kept sequence indices
    /// (ascending) or `None` for all. `model` is the model being trained (for a no-grad shallow pass).
    fn filter_sequences(
        &mut self,
        model: &mut dyn LanguageModel,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<Option<Vec<usize>>> {
        let _ = (model, inputs, targets, b, t);
        Ok(None)
    }

    /// Runs auxiliary models (reference, teacher) on the micro-batch that is about to be trained on.
    fn prepare(&mut self, inputs: &[u32], targets: &[i32], b: usize, t: usize) -> Result<()> {
        let _ = (inputs, targets, b, t);
        Ok(())
    }

    /// Writes one score per row into `out` (length `b·t`); higher scores are kept first.
    fn scores(&mut self, ctx: &StepContext<'_>, out: &mut Vec<f32>) -> Result<()>;

    /// The divisor of the kept-token loss sum given `kept` kept rows out of `valid` valid rows of the whole
    /// selection scope (default: `kept`, the CVaR / mean-over-kept estimator).
    fn normaliser(&self, kept: usize, valid: usize) -> f64 {
        let _ = valid;
        kept as f64
    }

    /// Writes `dlogits [K, Vp]` for rows `kept` into `dlogits`, each multiplied by `scale`, and returns the mean
    /// per-token training loss over the kept rows (unscaled). Default: cross-entropy.
    fn gradient(
        &mut self,
        ctx: &StepContext<'_>,
        kept: &[u32],
        scale: f32,
        dlogits: &mut [f32],
    ) -> Result<f32> {
        ce_gradient(ctx, kept, scale, dlogits)
    }

    /// Feedback after a step: the scores, keep mask and valid mask of every row the step selected among.
    fn observe(&mut self, scores: &[f32], keep: &[bool], valid: &[bool]) {
        let _ = (scores, keep, valid);
    }

    /// Serialisable state for exact resume (RNG, adapted α, ...).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores [`SelectionPolicy::state`].
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// The cross-entropy gradient on kept rows through `eslm_kernels::sparse_ce`.
pub fn ce_gradient(
    ctx: &StepContext<'_>,
    kept: &[u32],
    scale: f32,
    dlogits: &mut [f32],
) -> Result<f32> {
    let stride = ctx.logits.stride();
    Ok(sparse_ce(
        &ctx.logits,
        ctx.targets,
        &ctx.stats.lse,
        kept,
        scale,
        dlogits,
        stride,
    )?)
}

/// Checks that an α or keep fraction lies in `(0, 1)` (α) or `(0, 1]` (keep).
pub(crate) fn check_fraction(name: &str, value: f64, allow_one: bool) -> Result<()> {
    let ok = value.is_finite() && value > 0.0 && (value < 1.0 || (allow_one && value == 1.0));
    if ok {
        Ok(())
    } else {
        let range = if allow_one { "(0, 1]" } else { "(0, 1)" };
        Err(TrainError::Config(format!(
            "{name} must be in {range}, got {value}"
        )))
    }
}
