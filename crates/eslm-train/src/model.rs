//! The seam between the trainer and a model engine: the [`LanguageModel`] trait.
//!
//! Only per-row vectors and scalars cross it (the engine rule, `docs/engine.md`): a forward returns the token
//! statistics of every row (lse, loss, entropy, valid — [`TokenStats`]); the trainer asks the engine to select
//! rows by a score ([`ScoreSource`], [`Keep`]) and gets the kept row indices back ([`Selection`]); the loss
//! gradient of the kept rows (cross-entropy, or distillation against a teacher on the same engine) and the
//! row-sparse backward run inside the engine. Logits, their gradients and activations never reach the trainer;
//! the one exception is [`LanguageModel::row_logits`], a single row for sampling.
//!
//! An optimizer step is llm.c's four calls: per micro-batch [`LanguageModel::forward`] + selection + loss
//! gradient + [`LanguageModel::backward`]; then [`LanguageModel::reduce_grads`] (sum over data-parallel ranks);
//! then [`LanguageModel::optimizer_step`] (global norm, clipping, AdamW). `eslm-gpt2` implements the trait through
//! [`crate::engine::Gpt2Model`]; [`crate::bigram::BigramModel`] is a tiny test double.

use std::any::Any;
use std::path::Path;

use eslm_collective::Collective;
use eslm_kernels::kd::KdParams;

use crate::error::Result;

pub use eslm_gpt2::{Keep, ScoreSource};
pub use eslm_kernels::select::Selection;
pub use eslm_kernels::token_stats::TokenStats;

/// Optimizer hyper-parameters of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// Decoupled weight decay (applied by the engine to ≥2-D parameters).
    pub weight_decay: f32,
    /// AdamW β1.
    pub beta1: f32,
    /// AdamW β2.
    pub beta2: f32,
    /// AdamW ε.
    pub eps: f32,
    /// Global-norm clip (≤ 0: no clipping).
    pub grad_clip: f32,
}

impl OptimStep {
    /// The engine's AdamW hyper-parameters of this step.
    pub fn adamw(&self) -> eslm_gpt2::AdamWConfig {
        eslm_gpt2::AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// The loss whose gradient the kept rows receive.
#[derive(Clone, Copy)]
pub enum LossSpec<'a> {
    /// Cross-entropy `lse − z_y`.
    CrossEntropy,
    /// Cross-entropy with a weight per row (importance sampling: the inverse of each row's keep probability);
    /// `row_weights` has one entry per row of the last forward.
    WeightedCrossEntropy {
        /// Weight of each row.
        row_weights: &'a [f32],
    },
    /// Cross-entropy blended with distillation towards `teacher` (same engine, same vocabulary; its last forward
    /// covered the same rows), see `eslm_kernels::kd`.
    Distill {
        /// The frozen teacher.
        teacher: &'a dyn LanguageModel,
        /// Weight and temperature.
        params: KdParams,
    },
}

/// What the trainer needs from a model engine.
pub trait LanguageModel: Any {
    /// Real vocabulary size `V`.
    fn vocab_size(&self) -> usize;
    /// Maximum sequence length.
    fn max_seq_len(&self) -> usize;
    /// Number of transformer blocks `L` (1 for models without blocks).
    fn num_layers(&self) -> usize;
    /// Number of parameters `P` (for the paper's FLOP convention).
    fn num_params(&self) -> usize;
    /// Training forward over `b × t` tokens (keeps what the backward needs), then the token statistics against
    /// `targets` (`[b·t]`, negative = ignored).
    fn forward(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<&TokenStats>;
    /// Training forward whose LM head runs on `rows` only (ascending batch rows), then the statistics of those
    /// rows: the returned statistics and later selections refer to positions `0..K` in `rows`.
    fn forward_rows(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        rows: &[u32],
    ) -> Result<&TokenStats>;
    /// No-grad forward through the first `exit_layer` blocks (all when `None`), the final layer norm and the LM
    /// head, then the token statistics. Invalidates a pending training forward.
    fn forward_inference(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        exit_layer: Option<usize>,
    ) -> Result<&TokenStats>;
    /// Hierarchical ESLM's shallow pass: the statistics of block `exit_layer`'s output over the whole batch, like
    /// [`LanguageModel::forward_inference`] with `Some(exit_layer)`; an engine may keep the first blocks'
    /// activations for [`LanguageModel::forward_sequences`]. The default is the no-grad forward.
    fn forward_prefix(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        exit_layer: usize,
    ) -> Result<&TokenStats> {
        self.forward_inference(inputs, targets, b, t, Some(exit_layer))
    }
    /// Training forward of the sequences `seqs` (ascending) of the batch given to the last
    /// [`LanguageModel::forward_prefix`]; `inputs` and `targets` are those sequences' (`[seqs.len(), t]`). Equal
    /// to [`LanguageModel::forward`] on them (to rounding); an engine that kept the shallow pass's activations
    /// continues them instead of recomputing the first blocks. The default is [`LanguageModel::forward`].
    fn forward_sequences(
        &mut self,
        seqs: &[usize],
        inputs: &[u32],
        targets: &[i32],
        t: usize,
    ) -> Result<&TokenStats> {
        self.forward(inputs, targets, seqs.len(), t)
    }
    /// The `V` logits of one row of the last forward (sampling, greedy checks): never a whole batch.
    fn row_logits(&self, row: usize) -> Result<Vec<f32>>;
    /// The logits of the token after `context` (its last `max_seq_len` ids), for generation. The default runs a
    /// no-grad forward over the whole context (O(t²) per token); an engine with a key/value cache overrides it and
    /// feeds only the new token when `context` extends the previous call's by one.
    fn next_token_logits(&mut self, context: &[u32]) -> Result<Vec<f32>> {
        full_context_logits(self, context)
    }
    /// Selects the rows that get gradient among the valid rows of the last forward.
    fn select(&mut self, score: ScoreSource<'_>, keep: Keep) -> Result<&Selection>;
    /// Writes the loss gradient of the selected rows times `scale` (inside the engine); returns the mean loss
    /// over the kept rows (unscaled; 0 when none is kept).
    fn loss_grad(&mut self, loss: LossSpec<'_>, scale: f32) -> Result<f32>;
    /// Row-sparse backward of the last training forward from the selected rows' loss gradient; accumulates into
    /// the parameter gradients.
    fn backward(&mut self) -> Result<()>;
    /// Sets every parameter gradient to zero.
    fn zero_grad(&mut self);
    /// Sums the accumulated gradients over the ranks of `collective`.
    fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()>;
    /// Sets the precision of the matrix products (`--matmul`; f32 is every engine's default). Engines without
    /// the asked precision refuse.
    fn set_matmul(&mut self, precision: eslm_gpt2::MatmulPrecision) -> Result<()> {
        match precision {
            eslm_gpt2::MatmulPrecision::F32 => Ok(()),
            other => Err(crate::error::TrainError::Config(format!(
                "--matmul {other:?}: needs a GPT-2 model on --device cuda"
            ))),
        }
    }
    /// Connects the engine to the ranks of `collective` before training (a GPU engine opens its NCCL
    /// communicator); every rank calls it. A no-op by default.
    fn connect_ranks(&mut self, collective: &dyn Collective) -> Result<()> {
        let _ = collective;
        Ok(())
    }
    /// Shards the optimizer state over the ranks of `collective` (`--shard-optimizer`, ZeRO-1: gradients
    /// reduce-scattered, each rank updating its shard, parameters all-gathered). Every rank calls it once,
    /// before training. Engines without a sharded optimizer refuse.
    fn shard_optimizer(&mut self, collective: std::sync::Arc<dyn Collective>) -> Result<()> {
        let _ = collective;
        Err(crate::error::TrainError::Config(
            "--shard-optimizer: this model has no sharded optimizer (GPT-2 models have one)".into(),
        ))
    }
    /// Collects what a checkpoint needs from other ranks (a sharded optimizer's moments); every rank calls it
    /// before rank 0 writes a checkpoint. A no-op by default.
    fn gather_for_checkpoint(&mut self) -> Result<()> {
        Ok(())
    }
    /// Global gradient norm, clipping to `step.grad_clip`, one AdamW update. Returns the norm before clipping;
    /// when it is not finite the parameters are left unchanged.
    fn optimizer_step(&mut self, step: &OptimStep) -> Result<f32>;
    /// FLOPs the engine really executed since it was created (forward, backward, optimizer).
    fn realized_flops(&self) -> u64;
    /// Forward FLOPs per token by the paper's convention (2·P, or the shallow part for an early exit).
    fn paper_forward_flops_per_token(&self, exit_layer: Option<usize>) -> f64 {
        let _ = exit_layer;
        2.0 * self.num_params() as f64
    }
    /// Writes the model weights (and its config) into directory `dir` (which exists).
    fn save_model(&self, dir: &Path) -> Result<()>;
    /// Loads weights written by [`LanguageModel::save_model`] (same architecture) into this model.
    fn load_model(&mut self, dir: &Path) -> Result<()>;
    /// Writes the optimizer state (moments, step count) into directory `dir`.
    fn save_optimizer(&self, dir: &Path) -> Result<()>;
    /// Restores the optimizer state written by [`LanguageModel::save_optimizer`].
    fn load_optimizer(&mut self, dir: &Path) -> Result<()>;
    /// The model as `Any`, so an engine can find its own kind among other models (a KD teacher).
    fn as_any(&self) -> &dyn Any;
}

/// The next token's logits from a no-grad forward over the last `max_seq_len` ids of `context` (O(t²) per
/// token): [`LanguageModel::next_token_logits`] for engines without a key/value cache.
pub fn full_context_logits<M: LanguageModel + ?Sized>(
    model: &mut M,
    context: &[u32],
) -> Result<Vec<f32>> {
    let start = context.len().saturating_sub(model.max_seq_len());
    let ctx = &context[start..];
    let t = ctx.len();
    let no_targets = vec![eslm_kernels::token_stats::DEFAULT_IGNORE_INDEX; t];
    model.forward_inference(ctx, &no_targets, 1, t, None)?;
    model.row_logits(t.saturating_sub(1))
}
