//! The loss head: everything between the logits and the row-sparse backward, inside the engine.
//!
//! ```text
//! forward_stats ─▶ logits [N, Vp] ─▶ token statistics (lse, loss, entropy, valid) ──▶ caller (per-row vectors)
//! select(score, keep) ─▶ kept rows idx [K] ────────────────────────────────────────▶ caller (per-row vector)
//! ce_grad / kd_grad ─▶ dlogits [K, Vp] (kept rows only) ─▶ backward_selected ─▶ parameter gradients
//! ```
//!
//! Logits, their gradients and the activations never leave the engine: callers see per-row vectors
//! ([`TokenStats`], [`Selection`]) and scalars only. A selection policy chooses the score ([`ScoreSource`]: the
//! model's loss or entropy, or per-row scores of its own such as random keys or a reference model's excess
//! loss) and the rule ([`Keep`]); the engine does the rest. KD takes a teacher engine model whose last forward
//! covered the same rows: both models' logits stay on the engine side.
//!
//! Ignored targets (`< 0`, e.g. −100) are never valid and never kept.

use eslm_kernels::kd::{kd_grad, KdParams};
use eslm_kernels::select::{select, SelectRule, Selection};
use eslm_kernels::sparse_ce::sparse_ce;
use eslm_kernels::token_stats::{token_stats, TokenStats, DEFAULT_IGNORE_INDEX};

use crate::error::{check_len, Gpt2Error, Result};
use crate::model::Gpt2;

/// Which per-row score ranks the rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreSource<'a> {
    /// The model's token loss `lse − z_y` (ESLM with this score minimises the CVaR of the loss).
    Loss,
    /// The model's predictive entropy `lse − Σ p·z`.
    Entropy,
    /// Scores computed by the caller, one per row of the last forward (random keys, excess loss, a teacher's
    /// statistic, ...).
    Host(&'a [f32]),
}

/// Which valid rows are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// Every valid row (CLM).
    AllValid,
    /// The VaR or top-k rule over this batch's valid rows ([`eslm_kernels::select`]).
    Rule(SelectRule),
    /// Valid rows whose score is ≥ a threshold computed elsewhere (the global VaR over several micro-batches or
    /// ranks, `eslm_kernels::global_select`).
    AtLeast(f32),
}

/// Per-forward state of the loss head (host buffers on the CPU backend).
#[derive(Debug, Clone, Default)]
pub(crate) struct LossHead {
    /// Targets of the last forward `[N]`.
    targets: Vec<i32>,
    /// Row statistics of the last forward.
    stats: TokenStats,
    /// The last selection (kept rows ascending).
    selection: Selection,
    /// Compact `[K, Vp]` loss gradient of the kept rows, valid when `grad_ready`.
    dlogits: Vec<f32>,
    grad_ready: bool,
}

impl Gpt2 {
    /// Training forward of `b × t` tokens followed by the token statistics against `targets` (`[b·t]`, negative
    /// = ignored). Keeps the activations for [`Gpt2::backward_selected`]. Returns the per-row statistics.
    pub fn forward_stats(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<&TokenStats> {
        check_len("targets", targets.len(), b * t)?;
        self.forward(inputs, b, t)?;
        self.compute_stats(targets)
    }

    /// No-grad forward (the first `exit_layer` blocks, all when `None`) followed by the token statistics. Keeps
    /// no activations: a pending training forward can no longer be back-propagated.
    pub fn forward_scores(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        exit_layer: Option<usize>,
    ) -> Result<&TokenStats> {
        check_len("targets", targets.len(), b * t)?;
        let exit = exit_layer.unwrap_or(self.config().n_layer);
        self.forward_shallow(inputs, b, t, exit)?;
        self.compute_stats(targets)
    }

    /// Runs `f` with the model (read-only: its logits) and the loss head (mutable) borrowed apart.
    fn with_head<R>(&mut self, f: impl FnOnce(&Gpt2, &mut LossHead) -> Result<R>) -> Result<R> {
        let mut head = std::mem::take(&mut self.head);
        let out = f(self, &mut head);
        self.head = head;
        out
    }

    fn compute_stats(&mut self, targets: &[i32]) -> Result<&TokenStats> {
        self.with_head(|model, head| {
            let view = model.logits()?;
            token_stats(&view, targets, DEFAULT_IGNORE_INDEX, &mut head.stats)?;
            head.targets.clear();
            head.targets.extend_from_slice(targets);
            head.grad_ready = false;
            head.selection = Selection::default();
            Ok(())
        })?;
        Ok(&self.head.stats)
    }

    /// The row statistics of the last forward.
    pub fn stats(&self) -> &TokenStats {
        &self.head.stats
    }

    /// Selects the rows that get gradient among the valid rows of the last forward. Returns the selection (kept
    /// rows ascending; `threshold` NaN for [`Keep::AllValid`]).
    ///
    /// # Errors
    /// A host score vector of the wrong length, NaN in a valid row's score, no valid row (for a rule), and the
    /// rule's own errors ([`eslm_kernels::select::select`]).
    pub fn select(&mut self, score: ScoreSource<'_>, keep: Keep) -> Result<&Selection> {
        let head = &mut self.head;
        let n = head.stats.rows();
        let scores: &[f32] = match score {
            ScoreSource::Loss => &head.stats.loss,
            ScoreSource::Entropy => &head.stats.entropy,
            ScoreSource::Host(s) => {
                check_len("scores", s.len(), n)?;
                s
            }
        };
        let valid = &head.stats.valid;
        let sel = &mut head.selection;
        match keep {
            Keep::Rule(rule) => select(scores, Some(valid), rule, sel)?,
            Keep::AllValid | Keep::AtLeast(_) => {
                let threshold = match keep {
                    Keep::AtLeast(th) => th,
                    _ => f32::NEG_INFINITY,
                };
                if let Some(row) = (0..n).find(|&i| valid[i] && scores[i].is_nan()) {
                    return Err(eslm_kernels::KernelError::NanScore { row }.into());
                }
                sel.keep.clear();
                sel.keep
                    .extend((0..n).map(|i| valid[i] && scores[i] >= threshold));
                sel.indices.clear();
                sel.indices
                    .extend((0..n).filter(|&i| sel.keep[i]).map(|i| i as u32));
                sel.k = sel.indices.len();
                sel.threshold = match keep {
                    Keep::AtLeast(th) => th,
                    _ => f32::NAN,
                };
            }
        }
        head.grad_ready = false;
        Ok(&self.head.selection)
    }

    /// The last selection.
    pub fn selection(&self) -> &Selection {
        &self.head.selection
    }

    /// Cross-entropy gradient on the selected rows: `dZ_K = (softmax(z_K) − onehot(y_K))·scale`. Returns the mean
    /// loss over the kept rows (0 when none is kept).
    pub fn ce_grad(&mut self, scale: f32) -> Result<f32> {
        let vp = self.config().padded_vocab_size;
        self.with_head(|model, head| {
            let view = model.logits()?;
            let k = head.selection.indices.len();
            head.dlogits.resize(k * vp, 0.0);
            let loss = sparse_ce(
                &view,
                &head.targets,
                &head.stats.lse,
                &head.selection.indices,
                scale,
                &mut head.dlogits,
                vp,
            )?;
            head.grad_ready = true;
            Ok(loss)
        })
    }

    /// Distillation gradient on the selected rows against `teacher`, whose last forward covered the same rows
    /// (same batch shape and vocabulary); see [`eslm_kernels::kd`] for the loss. Returns the mean KD loss over
    /// the kept rows.
    pub fn kd_grad(&mut self, teacher: &Gpt2, kd: KdParams, scale: f32) -> Result<f32> {
        if teacher.config().vocab_size != self.config().vocab_size {
            return Err(Gpt2Error::InvalidConfig(format!(
                "teacher vocabulary {} differs from the student's {}",
                teacher.config().vocab_size,
                self.config().vocab_size
            )));
        }
        let vp = self.config().padded_vocab_size;
        let teacher_view = teacher.logits()?;
        self.with_head(|model, head| {
            let view = model.logits()?;
            let k = head.selection.indices.len();
            head.dlogits.resize(k * vp, 0.0);
            let loss = kd_grad(
                &view,
                &teacher_view,
                &head.targets,
                &head.selection.indices,
                kd,
                scale,
                &mut head.dlogits,
                vp,
            )?;
            head.grad_ready = true;
            Ok(loss)
        })
    }

    /// Row-sparse backward of the last training forward from the gradient of [`Gpt2::ce_grad`] or
    /// [`Gpt2::kd_grad`] on the selected rows; accumulates into the parameter gradients. Nothing to do when no
    /// row is kept.
    pub fn backward_selected(&mut self) -> Result<()> {
        if !self.head.grad_ready {
            return Err(Gpt2Error::InvalidKept(
                "backward_selected needs ce_grad or kd_grad after the selection".into(),
            ));
        }
        if self.head.selection.indices.is_empty() {
            return Ok(());
        }
        let head = std::mem::take(&mut self.head);
        let out = self.backward_sparse(&head.selection.indices, &head.dlogits);
        self.head = head;
        out
    }

    /// One row of the last forward's logits (the `V` real columns), e.g. to sample the next token. The only
    /// logits that leave the engine: one row, not `[N, V]`.
    pub fn row_logits(&self, row: usize) -> Result<Vec<f32>> {
        let view = self.logits()?;
        if row >= view.rows() {
            return Err(Gpt2Error::Shape {
                what: "row",
                expected: format!("< {} rows of the last forward", view.rows()),
                got: row.to_string(),
            });
        }
        Ok(view.row(row).to_vec())
    }
}
