//! The usual training-step loss path, built on `eslm-kernels`: full forward → token statistics (lse, loss,
//! entropy per row) → selection of the kept rows by a score → sparse cross-entropy gradient on the K kept rows
//! (`dZ_K = (softmax(z_K) − onehot(y_K))/K`, mean loss over kept rows, the CVaR estimator) →
//! [`Gpt2::backward_sparse`]. CLM is the same path with every valid row kept.
//!
//! Other losses (distillation, other policies' scores) use [`Gpt2::forward`] and [`Gpt2::backward_sparse`]
//! directly with their own `dlogits`.

use crate::error::{check_len, Result};
use crate::model::Gpt2;
use eslm_kernels::select::{select, SelectRule, Selection};
use eslm_kernels::sparse_ce::sparse_ce;
use eslm_kernels::token_stats::{token_stats, TokenStats, DEFAULT_IGNORE_INDEX};

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

/// Reusable buffers of the step path (statistics, selection, compact `dlogits`); grow-only.
#[derive(Debug, Clone, Default)]
pub struct StepWorkspace {
    /// Per-row statistics of the last step.
    pub stats: TokenStats,
    /// The selection of the last step (for `Selector::All`, every valid row).
    pub selection: Selection,
    dlogits: Vec<f32>,
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

impl Gpt2 {
    /// Forward, statistics, selection, sparse CE and row-sparse backward for one batch; accumulates into the
    /// gradients (call [`Gpt2::zero_grad`] first for a fresh step). `targets` is `[B·T]` with
    /// [`DEFAULT_IGNORE_INDEX`] (−100) for ignored positions.
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
        check_len("targets", targets.len(), b * t)?;
        let vp = self.config().padded_vocab_size;
        let view = self.forward(inputs, b, t)?;
        token_stats(&view, targets, DEFAULT_IGNORE_INDEX, &mut ws.stats)?;
        let valid = ws.stats.num_valid();
        let loss_all = {
            let s: f64 = ws
                .stats
                .loss
                .iter()
                .zip(&ws.stats.valid)
                .filter(|(_, &v)| v)
                .map(|(&l, _)| l as f64)
                .sum();
            s / valid.max(1) as f64
        };
        match selector {
            Selector::All => {
                let sel = &mut ws.selection;
                sel.keep.clear();
                sel.keep.extend_from_slice(&ws.stats.valid);
                sel.indices.clear();
                sel.indices
                    .extend((0..b * t).filter(|&i| ws.stats.valid[i]).map(|i| i as u32));
                sel.k = sel.indices.len();
                sel.threshold = f32::NAN;
            }
            Selector::Select { score, rule } => {
                let scores = match score {
                    TokenScore::Loss => &ws.stats.loss,
                    TokenScore::Entropy => &ws.stats.entropy,
                };
                select(scores, Some(&ws.stats.valid), rule, &mut ws.selection)?;
            }
        }
        let kept = &ws.selection.indices;
        let k = kept.len();
        if ws.dlogits.len() < k * vp {
            ws.dlogits.resize(k * vp, 0.0);
        }
        let scale = 1.0 / k.max(1) as f32;
        let loss_kept = sparse_ce(
            &view,
            targets,
            &ws.stats.lse,
            kept,
            scale,
            &mut ws.dlogits,
            vp,
        )?;
        self.backward_sparse(kept, &ws.dlogits[..k * vp])?;
        Ok(StepReport {
            loss_all,
            loss_kept: loss_kept as f64,
            valid,
            kept: k,
            threshold: ws.selection.threshold,
        })
    }
}
