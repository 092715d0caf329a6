//! The seam between the trainer and a model engine: the [`LanguageModel`] trait.
//!
//! A step needs only five things from an engine: a training forward that keeps activations and returns logits
//! `[B·T, Vp]` (row stride `Vp ≥ V`), a no-grad forward that may stop after the first `E` blocks (hierarchical
//! scoring, reference and teacher models, evaluation), a backward that takes the gradient of the logits on the
//! kept rows only (`dlogits [K, Vp]`, rows in the order of `kept`) and accumulates parameter gradients, the
//! optimizer (global-norm clipping, AdamW), and checkpoint I/O. `eslm-gpt2` implements it through
//! [`crate::engine::Gpt2Model`]; [`crate::bigram::BigramModel`] is a tiny test double.

use std::path::Path;

use crate::error::Result;

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

/// What the trainer needs from a model engine.
pub trait LanguageModel {
    /// Real vocabulary size `V`.
    fn vocab_size(&self) -> usize;
    /// Row stride of the logits, `Vp ≥ V`.
    fn logits_stride(&self) -> usize;
    /// Maximum sequence length.
    fn max_seq_len(&self) -> usize;
    /// Number of transformer blocks `L` (1 for models without blocks).
    fn num_layers(&self) -> usize;
    /// Number of parameters `P` (for the paper's FLOP convention).
    fn num_params(&self) -> usize;
    /// Training forward over `b × t` tokens: keeps what the backward needs, returns logits `[b·t, Vp]`.
    fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<&[f32]>;
    /// No-grad forward: the first `exit_layer` blocks (all when `None`), the final layer norm and the LM head.
    /// Returns logits `[b·t, Vp]`. Does not disturb a pending training forward's gradients.
    fn forward_inference(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        exit_layer: Option<usize>,
    ) -> Result<&[f32]>;
    /// The logits of the most recent forward (training or inference), `[b·t, Vp]`.
    fn last_logits(&self) -> &[f32];
    /// Backward of the last training forward given `dlogits [K, Vp]` on rows `kept` (ascending); accumulates
    /// into the parameter gradients.
    fn backward_sparse(&mut self, kept: &[u32], dlogits: &[f32]) -> Result<()>;
    /// Sets every parameter gradient to zero.
    fn zero_grad(&mut self);
    /// Clips the accumulated gradients to global norm `step.grad_clip` and applies one AdamW update. Returns the
    /// global gradient norm before clipping. When that norm is not finite the parameters must be left unchanged.
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
}
