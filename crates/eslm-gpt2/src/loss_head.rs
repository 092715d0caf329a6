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

use eslm_kernels::kd::KdParams;
use eslm_kernels::select::{SelectRule, Selection};
use eslm_kernels::token_stats::TokenStats;

use crate::backend::{Backend, KeptTargets, OwnStat, RowScores};
use crate::error::{check_len, Gpt2Error, Result};
use crate::model::{logits_of, Gpt2};

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
    /// The VaR or top-k rule over this batch's valid rows ([`eslm_kernels::select::select`]).
    Rule(SelectRule),
    /// Valid rows whose score is ≥ a threshold computed elsewhere (the global VaR over several micro-batches or
    /// ranks, `eslm_kernels::global_select`).
    AtLeast(f32),
}

/// Per-forward state of the loss head: targets and the kept-row gradient in backend buffers, the per-row
/// statistics and the selection on the host.
#[derive(Debug, Clone)]
pub(crate) struct LossHead<B: Backend> {
    /// Targets of the last forward `[N]`.
    targets: B::Targets,
    /// Row statistics of the last forward.
    stats: TokenStats,
    /// The last selection (kept rows ascending).
    selection: Selection,
    /// `selection` came from the backend's own [`Backend::select`] (a device backend holds a device copy).
    own_selection: bool,
    /// Compact `[K, Vp]` loss gradient of the kept rows (grown on demand), valid when `grad_ready`.
    dlogits: Option<B::Buf>,
    grad_ready: bool,
    /// After [`Gpt2::forward_stats_rows`]: the batch rows whose logits (and statistics) the forward computed;
    /// statistics and selection indices then refer to positions in this list.
    head_rows: Option<Vec<u32>>,
}

impl<B: Backend> LossHead<B> {
    pub(crate) fn new(backend: &mut B, n_max: usize) -> Self {
        Self {
            targets: backend.alloc_targets(n_max),
            stats: TokenStats::default(),
            selection: Selection::default(),
            own_selection: false,
            dlogits: None,
            grad_ready: false,
            head_rows: None,
        }
    }
}

impl<B: Backend> Gpt2<B> {
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
        self.forward_train(inputs, b, t)?;
        self.head.head_rows = None;
        self.compute_stats(targets)
    }

    /// Training forward whose LM head runs on `rows` only (strictly ascending batch rows, chosen without the
    /// model's logits, e.g. random keys), followed by the statistics of those rows: the returned statistics,
    /// [`Gpt2::select`] and [`Gpt2::selection`] refer to positions `0..K` in `rows`; the backward maps them back
    /// to batch rows. Dropped rows cost the trunk only (no LM-head forward, no backward).
    pub fn forward_stats_rows(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        rows: &[u32],
    ) -> Result<&TokenStats> {
        check_len("targets", targets.len(), b * t)?;
        self.forward_train_rows(inputs, b, t, rows)?;
        let kept_targets: Vec<i32> = rows.iter().map(|&r| targets[r as usize]).collect();
        self.head.head_rows = Some(rows.to_vec());
        self.compute_stats(&kept_targets)
    }

    /// Hierarchical ESLM's shallow pass: the first `exit_layer` blocks (1 ≤ E ≤ L) with their activations kept,
    /// then the final layer norm, the LM head and the token statistics of block E's output. Follow it with
    /// [`Gpt2::forward_sequences_stats`] for the sequences to train, which continues these activations instead
    /// of recomputing the first E blocks.
    pub fn forward_prefix_stats(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        exit_layer: usize,
    ) -> Result<&TokenStats> {
        check_len("targets", targets.len(), b * t)?;
        self.forward_train_prefix(inputs, b, t, exit_layer)?;
        self.head.head_rows = None;
        self.compute_stats(targets)
    }

    /// Training forward of the sequences `seqs` (strictly ascending) of the batch given to the last
    /// [`Gpt2::forward_prefix_stats`] (`inputs`, `targets`: those sequences' `[seqs.len(), t]` ids and targets),
    /// then their token statistics; keeps the activations for [`Gpt2::backward_selected`]. Continues the kept
    /// sequences' first-E-block activations of that pass (the result equals [`Gpt2::forward_stats`] on
    /// `inputs`); without a matching pass (another forward ran since, or other ids) it runs the full forward.
    pub fn forward_sequences_stats(
        &mut self,
        seqs: &[usize],
        inputs: &[u32],
        targets: &[i32],
        t: usize,
    ) -> Result<&TokenStats> {
        let b = seqs.len();
        check_len("targets", targets.len(), b * t)?;
        if !self.forward_train_sequences(seqs, inputs, t)? {
            self.forward_train(inputs, b, t)?;
        }
        self.head.head_rows = None;
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
        self.forward_no_grad(inputs, b, t, exit)?;
        self.head.head_rows = None;
        self.compute_stats(targets)
    }

    fn compute_stats(&mut self, targets: &[i32]) -> Result<&TokenStats> {
        let head = &mut self.head;
        head.grad_ready = false;
        head.selection = Selection::default();
        head.own_selection = false;
        self.backend.upload_targets(&mut head.targets, targets);
        let logits = logits_of::<B>(&self.acts.logits, self.last_logits, &self.config)?;
        self.backend
            .token_stats(logits, &head.targets, &mut head.stats)?;
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
        head.grad_ready = false;
        head.own_selection = false;
        let n = head.stats.rows();
        let scores = match score {
            ScoreSource::Loss => RowScores {
                host: &head.stats.loss,
                own: Some(OwnStat::Loss),
            },
            ScoreSource::Entropy => RowScores {
                host: &head.stats.entropy,
                own: Some(OwnStat::Entropy),
            },
            ScoreSource::Host(s) => {
                check_len("scores", s.len(), n)?;
                RowScores { host: s, own: None }
            }
        };
        let valid = &head.stats.valid;
        let sel = &mut head.selection;
        match keep {
            Keep::Rule(rule) => {
                self.backend.select(scores, valid, rule, sel)?;
                head.own_selection = true;
            }
            Keep::AllValid => keep_at_least(scores.host, valid, None, sel)?,
            Keep::AtLeast(th) => keep_at_least(scores.host, valid, Some(th), sel)?,
        }
        Ok(&self.head.selection)
    }

    /// The last selection.
    pub fn selection(&self) -> &Selection {
        &self.head.selection
    }

    /// A `[K, Vp]` gradient buffer for the current selection (grown when too small).
    fn dlogits_for_selection(&mut self) -> B::Buf {
        let need = self.head.selection.indices.len() * self.config().padded_vocab_size;
        match self.head.dlogits.take() {
            Some(buf) if B::len(&buf) >= need => buf,
            _ => self.backend.alloc_act(need),
        }
    }

    /// Cross-entropy gradient on the selected rows: `dZ_K = (softmax(z_K) − onehot(y_K))·scale`. Returns the mean
    /// loss over the kept rows (0 when none is kept).
    pub fn ce_grad(&mut self, scale: f32) -> Result<f32> {
        let mut dz = self.dlogits_for_selection();
        let head = &self.head;
        let logits = logits_of::<B>(&self.acts.logits, self.last_logits, &self.config);
        let out = logits.and_then(|logits| {
            let rows = KeptTargets {
                targets: &head.targets,
                kept: &head.selection.indices,
                own_selection: head.own_selection,
            };
            self.backend
                .sparse_ce(logits, rows, &head.stats.lse, scale, B::view_mut(&mut dz))
        });
        self.finish_grad(dz, out)
    }

    /// Importance-weighted cross-entropy on the selected rows: row `r` gets weight `row_weights[r]` (one weight
    /// per row of the last forward; only kept rows' weights are read), i.e. `dZ_r = w_r·(softmax(z_r) −
    /// onehot(y_r))·scale`. Returns the *unweighted* mean loss over the kept rows (for logging).
    pub fn ce_grad_weighted(&mut self, row_weights: &[f32], scale: f32) -> Result<f32> {
        check_len("row_weights", row_weights.len(), self.head.stats.rows())?;
        let loss = self.ce_grad(scale)?;
        let kept: Vec<f32> = self
            .head
            .selection
            .indices
            .iter()
            .map(|&r| row_weights[r as usize])
            .collect();
        let vp = self.config().padded_vocab_size;
        if let Some(dz) = self.head.dlogits.as_mut() {
            let k = kept.len();
            self.backend
                .scale_rows(B::slice_mut(B::view_mut(dz), 0..k * vp), vp, &kept);
        }
        Ok(loss)
    }

    /// Distillation gradient on the selected rows against `teacher`, whose last forward covered the same rows
    /// (same batch shape and vocabulary); see [`eslm_kernels::kd`] for the loss. Returns the mean KD loss over
    /// the kept rows.
    pub fn kd_grad(&mut self, teacher: &Gpt2<B>, kd: KdParams, scale: f32) -> Result<f32> {
        if teacher.config().vocab_size != self.config().vocab_size {
            return Err(Gpt2Error::InvalidConfig(format!(
                "teacher vocabulary {} differs from the student's {}",
                teacher.config().vocab_size,
                self.config().vocab_size
            )));
        }
        let teacher_logits =
            logits_of::<B>(&teacher.acts.logits, teacher.last_logits, teacher.config())?;
        let mut dz = self.dlogits_for_selection();
        let head = &self.head;
        let logits = logits_of::<B>(&self.acts.logits, self.last_logits, &self.config);
        let out = logits.and_then(|logits| {
            let rows = KeptTargets {
                targets: &head.targets,
                kept: &head.selection.indices,
                own_selection: head.own_selection,
            };
            self.backend.kd_grad(
                logits,
                teacher_logits,
                rows,
                kd,
                scale,
                B::view_mut(&mut dz),
            )
        });
        self.finish_grad(dz, out)
    }

    /// Puts the gradient buffer back and marks it ready when the kernel succeeded.
    fn finish_grad(&mut self, dz: B::Buf, out: Result<f32>) -> Result<f32> {
        self.head.dlogits = Some(dz);
        self.head.grad_ready = out.is_ok();
        out
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
        let Some(dz) = self.head.dlogits.take() else {
            return Err(Gpt2Error::InvalidKept(
                "no loss gradient for the selection".into(),
            ));
        };
        let kept = std::mem::take(&mut self.head.selection.indices);
        let len = kept.len() * self.config().padded_vocab_size;
        let out = match &self.head.head_rows {
            None => self.backward_rows(&kept, B::slice(B::view(&dz), 0..len)),
            Some(rows) => {
                let batch_rows: Vec<u32> = kept.iter().map(|&i| rows[i as usize]).collect();
                self.backward_rows(&batch_rows, B::slice(B::view(&dz), 0..len))
            }
        };
        self.head.selection.indices = kept;
        self.head.dlogits = Some(dz);
        out
    }

    /// One row of the last forward's logits (the `V` real columns), e.g. to sample the next token. The only
    /// logits that leave the engine: one row, not `[N, V]`.
    pub fn row_logits(&self, row: usize) -> Result<Vec<f32>> {
        let logits = logits_of::<B>(&self.acts.logits, self.last_logits, self.config())?;
        if row >= logits.rows {
            return Err(Gpt2Error::Shape {
                what: "row",
                expected: format!("< {} rows of the last forward", logits.rows),
                got: row.to_string(),
            });
        }
        let (v, vp) = (logits.dims.v, logits.dims.vp);
        let mut out = vec![0.0; v];
        self.backend
            .download(B::slice(logits.z, row * vp..row * vp + v), &mut out);
        self.backend.status()?;
        Ok(out)
    }
}

/// The selection of the valid rows whose score is ≥ `threshold` (every valid row for `None`, reported with a NaN
/// threshold), on host per-row vectors; NaN in a valid row's score is an error. Shared by the engine's
/// [`Keep::AllValid`] / [`Keep::AtLeast`] and by test doubles.
pub fn keep_at_least(
    scores: &[f32],
    valid: &[bool],
    threshold: Option<f32>,
    sel: &mut Selection,
) -> Result<()> {
    check_len("valid", valid.len(), scores.len())?;
    if let Some(row) = (0..scores.len()).find(|&i| valid[i] && scores[i].is_nan()) {
        return Err(eslm_kernels::KernelError::NanScore { row }.into());
    }
    let th = threshold.unwrap_or(f32::NEG_INFINITY);
    sel.keep.clear();
    sel.keep
        .extend(scores.iter().zip(valid).map(|(&s, &v)| v && s >= th));
    sel.indices.clear();
    sel.indices
        .extend((0..scores.len() as u32).filter(|&i| sel.keep[i as usize]));
    sel.k = sel.indices.len();
    sel.threshold = threshold.unwrap_or(f32::NAN);
    Ok(())
}
