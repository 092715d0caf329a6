//! Selection policies: which token positions of a micro-batch the loss keeps, and which loss they get.
//!
//! A policy sees per-row statistics only (never logits) and answers with a selection spec; the engine does the
//! selection, the loss gradient and the backward. The trainer drives one micro-batch as
//! 1. [`SelectionPolicy::filter_sequences`] (hierarchical only: drop whole sequences after a shallow pass),
//! 2. [`SelectionPolicy::prepare`] (Rho-1 / KD: the reference or teacher engine model forwards the same tokens;
//!    the policy keeps its per-row statistics),
//! 3. the training forward and the token statistics (`lse`, loss, entropy) of the model's own logits,
//! 4. [`SelectionPolicy::score`]: the model's loss or entropy, or per-row scores of the policy's own; the engine
//!    keeps the rows with score ≥ the VaR threshold at [`SelectionPolicy::alpha`] (k = ⌈(1 − α)·M⌉ of the M valid
//!    rows, ties kept; `None` keeps every valid row),
//! 5. [`SelectionPolicy::loss`]: cross-entropy, or distillation towards the policy's teacher, on the kept rows,
//!    divided by [`SelectionPolicy::normaliser`],
//! 6. after the optimizer step, [`SelectionPolicy::observe`] with the step's scores and keep mask (Ada-ESLM),
//!    its statistics summed over ranks through the collective.

pub mod ada;
pub mod clm;
pub mod eslm;
pub mod hierarchical;
pub mod importance;
pub mod kd;
pub mod random;
pub mod rho1;
pub mod schedule;

use eslm_collective::Collective;
use eslm_kernels::token_stats::TokenStats;

use crate::error::{Result, TrainError};
use eslm_kernels::select::SelectRule;

use crate::model::{Keep, LanguageModel, LossSpec};

pub use ada::{AdaConfig, AdaEslm};
pub use clm::Clm;
pub use eslm::Eslm;
pub use hierarchical::Hierarchical;
pub use importance::Importance;
pub use kd::{EslmKd, KdConfig};
pub use random::RandomKeep;
pub use rho1::{Rho1, Rho1Norm};
pub use schedule::Scheduled;

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

    /// The same statistic as a policy score.
    pub fn score(&self) -> Score {
        match self {
            ScoreKind::Loss => Score::Loss,
            ScoreKind::Entropy => Score::Entropy,
        }
    }
}

/// The per-row score a policy ranks rows by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Score {
    /// The model's own token loss (already in the engine).
    Loss,
    /// The model's own predictive entropy (already in the engine).
    Entropy,
    /// The vector the policy wrote into the `host` buffer of [`SelectionPolicy::score`].
    Host,
}

/// What a policy sees of one micro-batch after the training forward: per-row vectors only.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// Targets `[b·t]` (ignored rows carry the ignore index).
    pub targets: &'a [i32],
    /// The model's token statistics (lse, loss, entropy, valid) of the micro-batch.
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

    /// Called by the trainer before each optimizer step with its 0-based index (schedules).
    fn start_step(&mut self, step: u64) {
        let _ = step;
    }

    /// Fraction of valid rows dropped this step (`None`: keep every valid row).
    fn alpha(&self) -> Option<f64>;

    /// Which valid rows the engine keeps: by default the VaR rule at [`SelectionPolicy::alpha`] over the scores
    /// (every valid row when α is `None`). A policy that samples its rows returns `Keep::AtLeast` over 0/1 host
    /// scores.
    fn keep(&self) -> Keep {
        self.alpha().map_or(Keep::AllValid, |alpha| {
            Keep::Rule(SelectRule::Var { alpha })
        })
    }

    /// Rows chosen before the forward, without the model's logits (ascending, valid rows only), or `None` when
    /// the policy needs the forward's statistics. With rows, the engine computes the LM head for them only
    /// (micro quantile scope).
    fn rows_before_forward(&mut self, targets: &[i32]) -> Result<Option<Vec<u32>>> {
        let _ = targets;
        Ok(None)
    }

    /// Optionally drops whole sequences before the training forward; returns the kept sequence indices
    /// (ascending) or `None` for all. `model` is the model being trained (for a no-grad shallow pass); a
    /// threshold over sequences is taken over every rank of `collective`.
    fn filter_sequences(
        &mut self,
        model: &mut dyn LanguageModel,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        collective: &dyn Collective,
    ) -> Result<Option<Vec<usize>>> {
        let _ = (model, inputs, targets, b, t, collective);
        Ok(None)
    }

    /// Runs auxiliary models (reference, teacher) on the micro-batch that is about to be trained on.
    fn prepare(&mut self, inputs: &[u32], targets: &[i32], b: usize, t: usize) -> Result<()> {
        let _ = (inputs, targets, b, t);
        Ok(())
    }

    /// The score rows are ranked by (higher is kept first); for [`Score::Host`] the policy writes one score per
    /// row (length `b·t`) into `host`.
    fn score(&mut self, ctx: &StepContext<'_>, host: &mut Vec<f32>) -> Result<Score>;

    /// The divisor of the kept-token loss sum given `kept` kept rows out of `valid` valid rows of the whole
    /// selection scope (default: `kept`, the CVaR / mean-over-kept estimator).
    fn normaliser(&self, kept: usize, valid: usize) -> f64 {
        let _ = valid;
        kept as f64
    }

    /// The loss of the kept rows (default: cross-entropy).
    fn loss(&self) -> LossSpec<'_> {
        LossSpec::CrossEntropy
    }

    /// Feedback after a step: the scores, keep mask and valid mask of every row this rank selected among; a
    /// policy that adapts sums its statistics over the ranks of `collective`.
    fn observe(
        &mut self,
        scores: &[f32],
        keep: &[bool],
        valid: &[bool],
        collective: &dyn Collective,
    ) -> Result<()> {
        let _ = (scores, keep, valid, collective);
        Ok(())
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
