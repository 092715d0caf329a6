//! [`LanguageModel`] for the eslm-gpt2 engine: [`Gpt2Model`] wraps a `Gpt2` with its AdamW state.
//!
//! - Training forward → `Gpt2::forward`; no-grad forward → `Gpt2::forward_shallow` (exit layer E) or
//!   `forward_inference` (full depth); sparse backward → `Gpt2::backward_sparse`.
//! - Optimizer: global norm (f64) → if not finite, no update (the trainer then stops or skips) → clip to
//!   `grad_clip` → AdamW (`eslm_gpt2::AdamW`, decoupled decay on matrices and embeddings only).
//! - Realized FLOPs: the engine's counter covers the ops since its last full forward, so the adapter folds it
//!   into a running total before each new forward, and adds each shallow / inference forward's FLOPs
//!   (`forward_shallow_flops`). Optimizer work is not counted (O(P) per step, not FLOP-comparable).
//! - Checkpoints: `config.json` + `model.safetensors` with HuggingFace GPT-2 names (eslm-gpt2's `hf` module;
//!   loadable by `transformers`), the AdamW moments as checksummed flat f32 files ([`crate::tensor_file`])
//!   and `optimizer.json` (step count).

use std::path::Path;

use eslm_gpt2::checkpoint::hf;
use eslm_gpt2::{clip_grad_norm, grad_norm, AdamW, AdamWConfig, Gpt2, GptConfig};

use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};
use crate::model::{LanguageModel, OptimStep};
use crate::tensor_file;

fn engine_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

/// A GPT-2 model from eslm-gpt2 with its optimizer state.
#[derive(Debug)]
pub struct Gpt2Model {
    model: Gpt2,
    opt: AdamW,
    flops_done: f64,
}

impl Gpt2Model {
    /// A GPT-2-initialised model for batches up to `b_max × t_max`.
    pub fn new(config: GptConfig, b_max: usize, t_max: usize, seed: u64) -> Result<Self> {
        let model = Gpt2::new(config, b_max, t_max, seed).map_err(engine_err)?;
        Self::wrap(model)
    }

    fn wrap(model: Gpt2) -> Result<Self> {
        let opt = AdamW::new(AdamWConfig::default(), model.params()).map_err(engine_err)?;
        Ok(Gpt2Model {
            model,
            opt,
            flops_done: 0.0,
        })
    }

    /// Opens a checkpoint directory (`config.json` + `model.safetensors`, ours or transformers') with buffers
    /// for batches up to `b_max × t_max` (`t_max` is capped at the model's maximum sequence length).
    pub fn open(dir: &Path, b_max: usize, t_max: usize) -> Result<Self> {
        let params = hf::load_pretrained(dir)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))?;
        let t_max = t_max.min(params.config().max_seq_len).max(1);
        let model = Gpt2::from_params(params, b_max.max(1), t_max).map_err(engine_err)?;
        Self::wrap(model)
    }

    /// The engine model.
    pub fn inner(&self) -> &Gpt2 {
        &self.model
    }

    /// The model configuration.
    pub fn config(&self) -> &GptConfig {
        self.model.config()
    }
}

impl LanguageModel for Gpt2Model {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
    fn logits_stride(&self) -> usize {
        self.model.config().padded_vocab_size
    }
    fn max_seq_len(&self) -> usize {
        self.model.max_batch().1
    }
    fn num_layers(&self) -> usize {
        self.model.config().n_layer
    }
    fn num_params(&self) -> usize {
        self.model.config().num_params_unpadded()
    }
    fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<&[f32]> {
        self.flops_done += self.model.realized_flops().total();
        let view = self.model.forward(inputs, b, t).map_err(engine_err)?;
        Ok(view.data())
    }
    fn forward_inference(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        exit_layer: Option<usize>,
    ) -> Result<&[f32]> {
        let exit = exit_layer.unwrap_or(self.model.config().n_layer);
        // A no-grad forward invalidates the engine's pending activations: fold their counter first.
        self.flops_done +=
            self.model.realized_flops().total() + self.model.forward_shallow_flops(b, t, exit);
        let view = self
            .model
            .forward_shallow(inputs, b, t, exit)
            .map_err(engine_err)?;
        Ok(view.data())
    }
    fn last_logits(&self) -> &[f32] {
        self.model.logits().map(|v| v.data()).unwrap_or(&[])
    }
    fn backward_sparse(&mut self, kept: &[u32], dlogits: &[f32]) -> Result<()> {
        self.model
            .backward_sparse(kept, dlogits)
            .map_err(engine_err)
    }
    fn zero_grad(&mut self) {
        self.model.zero_grad();
    }
    fn optimizer_step(&mut self, s: &OptimStep) -> Result<f32> {
        let norm = grad_norm(self.model.grads());
        if !norm.is_finite() {
            return Ok(norm as f32);
        }
        if s.grad_clip > 0.0 {
            clip_grad_norm(self.model.grads_mut(), s.grad_clip as f64);
        }
        self.opt.config = AdamWConfig {
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
        };
        let (params, grads) = self.model.params_and_grads_mut();
        self.opt.update(params, grads, s.lr).map_err(engine_err)?;
        Ok(norm as f32)
    }
    fn realized_flops(&self) -> u64 {
        (self.flops_done + self.model.realized_flops().total()) as u64
    }
    fn paper_forward_flops_per_token(&self, exit_layer: Option<usize>) -> f64 {
        let c = self.model.config();
        match exit_layer {
            None => 2.0 * c.num_params_unpadded() as f64,
            Some(e) => {
                let (cc, v) = (c.n_embd as f64, c.vocab_size as f64);
                e.min(c.n_layer) as f64 * 24.0 * cc * cc + 2.0 * cc * v
            }
        }
    }
    fn save_model(&self, dir: &Path) -> Result<()> {
        hf::save_pretrained(self.model.params(), dir)
            .map_err(|e| TrainError::Checkpoint(e.to_string()))
    }
    fn load_model(&mut self, dir: &Path) -> Result<()> {
        let params = hf::load_pretrained(dir)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))?;
        if params.config() != self.model.config() {
            return Err(TrainError::Checkpoint(format!(
                "{}: checkpoint model {:?} differs from the run's {:?}",
                dir.display(),
                params.config(),
                self.model.config()
            )));
        }
        self.model
            .params_mut()
            .as_mut_slice()
            .copy_from_slice(params.as_slice());
        Ok(())
    }
    fn save_optimizer(&self, dir: &Path) -> Result<()> {
        tensor_file::write_f32(&dir.join("optimizer_m.bin"), self.opt.m.as_slice())?;
        tensor_file::write_f32(&dir.join("optimizer_v.bin"), self.opt.v.as_slice())?;
        let meta = serde_json::json!({ "step": self.opt.step });
        write_atomic(&dir.join("optimizer.json"), meta.to_string().as_bytes())
    }
    fn load_optimizer(&mut self, dir: &Path) -> Result<()> {
        let m = tensor_file::read_f32(&dir.join("optimizer_m.bin"))?;
        let v = tensor_file::read_f32(&dir.join("optimizer_v.bin"))?;
        let n = self.opt.m.len();
        if m.len() != n || v.len() != n {
            return Err(TrainError::Checkpoint(format!(
                "{}: optimizer state has {} values, the model needs {n}",
                dir.display(),
                m.len()
            )));
        }
        let path = dir.join("optimizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        let meta: serde_json::Value = serde_json::from_str(&text)?;
        let step = meta
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| TrainError::Checkpoint(format!("{}: no step", path.display())))?;
        self.opt.m.as_mut_slice().copy_from_slice(&m);
        self.opt.v.as_mut_slice().copy_from_slice(&v);
        self.opt.step = step;
        Ok(())
    }
}
