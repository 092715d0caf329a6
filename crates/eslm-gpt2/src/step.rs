//! One call for the common ESLM step on a single batch, composed of the loss head's calls
//! ([`crate::loss_head`]: forward + statistics → selection by a score → sparse cross-entropy on the K kept rows,
//! `dZ_K = (softmax(z_K) − onehot(y_K))/K`, the CVaR estimator → row-sparse backward) — the same calls the trainer
//! makes, so there is one step path. CLM is the same path with every valid row kept.

use crate::backend::Backend;
use crate::error::Result;
use crate::loss_head::{Keep, ScoreSource};
use crate::model::Gpt2;
use eslm_kernels::select::{SelectRule, Selection};
use eslm_kernels::token_stats::TokenStats;

/// Which per-token statistic scores the rows for selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScore {
    /// Cross-entropy loss `lse − z_y`.
    Loss,
    /// Predictive entropy.
    Entropy,
}

/// How a step chooses the rows that get gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selector {
    /// Every valid row (standard causal LM training).
    All,
    /// Rows selected by `rule` on `score` (VaR or top-k).
    Select {
        /// The score.
        score: TokenScore,
        /// The selection rule.
        rule: SelectRule,
    },
}

/// Copies of the last step's per-row statistics and selection, for inspection.
#[derive(Debug, Clone, Default)]
pub struct StepWorkspace {
    /// Per-row statistics of the last step.
    pub stats: TokenStats,
    /// The selection of the last step (for `Selector::All`, every valid row).
    pub selection: Selection,
}

impl StepWorkspace {
    /// Empty workspace.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Summary of one loss + backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean cross-entropy over every valid (non-ignored) row.
    pub loss_all: f64,
    /// Mean cross-entropy over the kept rows (the optimised objective).
    pub loss_kept: f64,
    /// Number of valid rows M.
    pub valid: usize,
    /// Number of kept rows K.
    pub kept: usize,
    /// Selection threshold (the k-th largest score; NaN for `Selector::All`).
    pub threshold: f32,
}

impl<B: Backend> Gpt2<B> {
    /// Forward, statistics, selection, sparse CE and row-sparse backward for one batch; accumulates into the
    /// gradients (call [`Gpt2::zero_grad`] first for a fresh step). `targets` is `[B·T]` with
    /// [`DEFAULT_IGNORE_INDEX`](eslm_kernels::token_stats::DEFAULT_IGNORE_INDEX) (−100) for ignored positions.
    ///
    /// ```
    /// use eslm_gpt2::{Gpt2, GptConfig, Selector, StepWorkspace, TokenScore};
    /// use eslm_kernels::select::SelectRule;
    /// let mut model = Gpt2::new(GptConfig::tiny(), 2, 8, 0)?;
    /// let mut ws = StepWorkspace::new();
    /// let inputs = [3u32; 16];
    /// let targets = [5i32; 16];
    /// let keep_30 = Selector::Select { score: TokenScore::Loss, rule: SelectRule::Var { alpha: 0.7 } };
    /// model.zero_grad();
    /// let report = model.loss_and_backward(&mut ws, &inputs, &targets, 2, 8, keep_30)?;
    /// assert!(report.kept >= 5 && report.valid == 16);
    /// # Ok::<(), eslm_gpt2::Gpt2Error>(())
    /// ```
    pub fn loss_and_backward(
        &mut self,
        ws: &mut StepWorkspace,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        selector: Selector,
    ) -> Result<StepReport> {
        let stats = self.forward_stats(inputs, targets, b, t)?;
        let valid = stats.num_valid();
        let loss_all = mean_valid_loss(stats);
        let (score, keep) = match selector {
            Selector::All => (ScoreSource::Loss, Keep::AllValid),
            Selector::Select { score, rule } => {
                let source = match score {
                    TokenScore::Loss => ScoreSource::Loss,
                    TokenScore::Entropy => ScoreSource::Entropy,
                };
                (source, Keep::Rule(rule))
            }
        };
        let k = self.select(score, keep)?.indices.len();
        let loss_kept = self.ce_grad(1.0 / k.max(1) as f32)?;
        self.backward_selected()?;
        ws.stats.clone_from(self.stats());
        ws.selection.clone_from(self.selection());
        Ok(StepReport {
            loss_all,
            loss_kept: loss_kept as f64,
            valid,
            kept: k,
            threshold: ws.selection.threshold,
        })
    }
}

/// Mean loss over the valid rows of `stats` (f64; 0 when none is valid).
pub fn mean_valid_loss(stats: &TokenStats) -> f64 {
    let (sum, n) = stats
        .loss
        .iter()
        .zip(&stats.valid)
        .filter(|(_, &v)| v)
        .fold((0.0f64, 0usize), |(s, n), (&l, _)| (s + l as f64, n + 1));
    sum / n.max(1) as f64
}
