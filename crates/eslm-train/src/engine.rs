//! [`LanguageModel`] for the eslm-gpt2 engine: [`Gpt2Model`] wraps a `Gpt2<B>` with its AdamW state, on the
//! CPU backend (`Gpt2Model<Cpu>`, the default) or any other `eslm_gpt2::Backend` (`Gpt2Model<Cuda>` with the
//! `cuda` feature).
//!
//! - Training forward → `Gpt2::forward_stats`; no-grad forward → `Gpt2::forward_scores` (exit layer E or full
//!   depth); selection, CE/KD gradient and the row-sparse backward → the engine's loss head
//!   (`eslm_gpt2::loss_head`); a KD teacher must be another `Gpt2Model` on the same backend (its logits stay in
//!   the engine).
//! - Optimizer: `Gpt2::reduce_grads`, then `Gpt2::clip_and_update`: global norm (f64) → if not finite, no update
//!   (the trainer then stops or skips) → clip to `grad_clip` → AdamW (decoupled decay on matrices and embeddings).
//! - Realized FLOPs: the engine's counter covers the ops since its last full forward, so the adapter folds it
//!   into a running total before each new forward, and adds each shallow / inference forward's FLOPs
//!   (`forward_shallow_flops`). Optimizer work is not counted (O(P) per step, not FLOP-comparable).
//! - Checkpoints: `config.json` + `model.safetensors` with HuggingFace GPT-2 names (eslm-gpt2's `hf` module;
//!   loadable by `transformers`), the AdamW moments as checksummed flat f32 files ([`crate::tensor_file`])
//!   and `optimizer.json` (step count). The format is the same on every backend (parameters and moments go
//!   through host copies), so a checkpoint written on a GPU resumes on the CPU and the other way round.

use std::path::Path;

use eslm_collective::Collective;
use eslm_gpt2::checkpoint::hf;
use eslm_gpt2::{Backend, Cpu, Gpt2, GptConfig, KvCache, OptimizerSnapshot, ParamSet};

use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};
use crate::model::{Keep, LanguageModel, LossSpec, OptimStep, ScoreSource, Selection, TokenStats};
use crate::tensor_file;

fn engine_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

/// A GPT-2 model from eslm-gpt2 on backend `B` (the CPU by default); its optimizer state lives in the engine.
#[derive(Debug)]
pub struct Gpt2Model<B: Backend = Cpu> {
    model: Gpt2<B>,
    flops_done: f64,
    /// Generation on the CPU backend: the key/value cache and the ids it holds.
    decoder: Option<(KvCache, Vec<u32>)>,
    /// The gathered optimizer state of a sharded optimizer, between [`LanguageModel::gather_for_checkpoint`]
    /// and the next update.
    gathered: Option<OptimizerSnapshot>,
}

fn load_checkpoint_params(dir: &Path) -> Result<ParamSet> {
    hf::load_pretrained(dir).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))
}

impl Gpt2Model<Cpu> {
    /// A GPT-2-initialised model on the CPU for batches up to `b_max × t_max`.
    pub fn new(config: GptConfig, b_max: usize, t_max: usize, seed: u64) -> Result<Self> {
        let model = Gpt2::new(config, b_max, t_max, seed).map_err(engine_err)?;
        Self::wrap(model)
    }

    /// Opens a checkpoint directory (`config.json` + `model.safetensors`, ours or transformers') on the CPU with
    /// buffers for batches up to `b_max × t_max` (`t_max` is capped at the model's maximum sequence length).
    pub fn open(dir: &Path, b_max: usize, t_max: usize) -> Result<Self> {
        let params = load_checkpoint_params(dir)?;
        let t_max = t_max.min(params.config().max_seq_len).max(1);
        let model = Gpt2::from_params(params, b_max.max(1), t_max).map_err(engine_err)?;
        Self::wrap(model)
    }
}

impl<B: Backend + 'static> Gpt2Model<B> {
    /// A GPT-2-initialised model on `backend` (the same initial parameters as [`Gpt2Model::new`] for a seed).
    pub fn new_on(
        backend: B,
        config: GptConfig,
        b_max: usize,
        t_max: usize,
        seed: u64,
    ) -> Result<Self> {
        let model = Gpt2::new_on(backend, config, b_max, t_max, seed).map_err(engine_err)?;
        Self::wrap(model)
    }

    /// [`Gpt2Model::open`] on `backend`: the checkpoint's parameters are uploaded to it.
    pub fn open_on(backend: B, dir: &Path, b_max: usize, t_max: usize) -> Result<Self> {
        let params = load_checkpoint_params(dir)?;
        let t_max = t_max.min(params.config().max_seq_len).max(1);
        let model =
            Gpt2::from_host_params(backend, &params, b_max.max(1), t_max).map_err(engine_err)?;
        Self::wrap(model)
    }

    fn wrap(model: Gpt2<B>) -> Result<Self> {
        Ok(Gpt2Model {
            model,
            flops_done: 0.0,
            decoder: None,
            gathered: None,
        })
    }

    /// The engine model.
    pub fn inner(&self) -> &Gpt2<B> {
        &self.model
    }

    /// The engine model, mutable (backend settings; benchmarks).
    pub fn inner_mut(&mut self) -> &mut Gpt2<B> {
        &mut self.model
    }

    /// The model configuration.
    pub fn config(&self) -> &GptConfig {
        self.model.config()
    }
}

impl<B: Backend + 'static> LanguageModel for Gpt2Model<B> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
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
    fn forward(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<&TokenStats> {
        self.flops_done += self.model.realized_flops().total();
        self.model
            .forward_stats(inputs, targets, b, t)
            .map_err(engine_err)
    }
    fn forward_rows(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        rows: &[u32],
    ) -> Result<&TokenStats> {
        self.flops_done += self.model.realized_flops().total();
        self.model
            .forward_stats_rows(inputs, targets, b, t, rows)
            .map_err(engine_err)
    }
    fn forward_inference(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        exit_layer: Option<usize>,
    ) -> Result<&TokenStats> {
        let exit = exit_layer.unwrap_or(self.model.config().n_layer);
        // A no-grad forward invalidates the engine's pending activations: fold their counter first.
        self.flops_done +=
            self.model.realized_flops().total() + self.model.forward_shallow_flops(b, t, exit);
        self.model
            .forward_scores(inputs, targets, b, t, Some(exit))
            .map_err(engine_err)
    }
    fn forward_prefix(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        exit_layer: usize,
    ) -> Result<&TokenStats> {
        // Fold the pending counter; the engine's counter then holds the shallow pass (see `forward_sequences`).
        self.flops_done += self.model.realized_flops().total();
        self.model
            .forward_prefix_stats(inputs, targets, b, t, exit_layer)
            .map_err(engine_err)
    }
    fn forward_sequences(
        &mut self,
        seqs: &[usize],
        inputs: &[u32],
        targets: &[i32],
        t: usize,
    ) -> Result<&TokenStats> {
        self.flops_done += self.model.realized_flops().total();
        self.model
            .forward_sequences_stats(seqs, inputs, targets, t)
            .map_err(engine_err)
    }
    fn next_token_logits(&mut self, context: &[u32]) -> Result<Vec<f32>> {
        let any: &mut dyn std::any::Any = self;
        match any.downcast_mut::<Gpt2Model<Cpu>>() {
            Some(cpu) => cpu.decode_cached(context),
            // Other backends: the full-context forward (no device KV cache yet).
            None => crate::model::full_context_logits(self, context),
        }
    }
    fn row_logits(&self, row: usize) -> Result<Vec<f32>> {
        self.model.row_logits(row).map_err(engine_err)
    }
    fn select(&mut self, score: ScoreSource<'_>, keep: Keep) -> Result<&Selection> {
        self.model.select(score, keep).map_err(engine_err)
    }
    fn loss_grad(&mut self, loss: LossSpec<'_>, scale: f32) -> Result<f32> {
        match loss {
            LossSpec::CrossEntropy => self.model.ce_grad(scale).map_err(engine_err),
            LossSpec::WeightedCrossEntropy { row_weights } => self
                .model
                .ce_grad_weighted(row_weights, scale)
                .map_err(engine_err),
            LossSpec::Distill { teacher, params } => {
                let teacher = teacher
                    .as_any()
                    .downcast_ref::<Gpt2Model<B>>()
                    .ok_or_else(|| {
                        TrainError::Config(format!(
                            "eslm-kd: the teacher must be a GPT-2 model on the same engine and device as the \
                             student (a `{}` model)",
                            std::any::type_name::<B>()
                        ))
                    })?;
                self.model
                    .kd_grad(&teacher.model, params, scale)
                    .map_err(engine_err)
            }
        }
    }
    fn backward(&mut self) -> Result<()> {
        self.model.backward_selected().map_err(engine_err)
    }
    fn zero_grad(&mut self) {
        self.model.zero_grad();
    }
    fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()> {
        self.model.reduce_grads(collective).map_err(engine_err)
    }
    fn set_matmul(&mut self, precision: eslm_gpt2::MatmulPrecision) -> Result<()> {
        self.model
            .set_matmul_precision(precision)
            .map_err(|e| TrainError::Config(format!("--matmul: {e}; it needs --device cuda")))
    }
    fn connect_ranks(&mut self, collective: &dyn Collective) -> Result<()> {
        self.model.connect(collective).map_err(engine_err)
    }
    fn shard_optimizer(&mut self, collective: std::sync::Arc<dyn Collective>) -> Result<()> {
        self.model.shard_optimizer(collective).map_err(engine_err)
    }
    fn gather_for_checkpoint(&mut self) -> Result<()> {
        if self.model.optimizer_sharded() {
            self.gathered = Some(self.model.optimizer_snapshot().map_err(engine_err)?);
        }
        Ok(())
    }
    fn optimizer_step(&mut self, s: &OptimStep) -> Result<f32> {
        self.decoder = None; // cached keys and values belong to the old weights
        self.gathered = None;
        let norm = self
            .model
            .clip_and_update(s.adamw(), s.lr, s.grad_clip as f64)
            .map_err(engine_err)?;
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
        // The CPU model's parameters are written in place; another backend's go through a host copy.
        let any: &dyn std::any::Any = &self.model;
        let host;
        let params = match any.downcast_ref::<Gpt2<Cpu>>() {
            Some(cpu) => cpu.params(),
            None => {
                host = self.model.params_to_host();
                self.model.status().map_err(engine_err)?;
                &host
            }
        };
        hf::save_pretrained(params, dir).map_err(|e| TrainError::Checkpoint(e.to_string()))
    }
    fn load_model(&mut self, dir: &Path) -> Result<()> {
        self.decoder = None;
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
            .load_params(&params)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))
    }
    fn save_optimizer(&self, dir: &Path) -> Result<()> {
        let local;
        let snap = match (&self.gathered, self.model.optimizer_sharded()) {
            (Some(g), _) => g,
            (None, false) => {
                local = self.model.optimizer_snapshot().map_err(engine_err)?;
                &local
            }
            // Gathering here would wait for ranks that do not write checkpoints.
            (None, true) => {
                return Err(TrainError::Checkpoint(
                    "the sharded optimizer state was not gathered before the checkpoint".into(),
                ))
            }
        };
        tensor_file::write_f32(&dir.join("optimizer_m.bin"), &snap.m)?;
        tensor_file::write_f32(&dir.join("optimizer_v.bin"), &snap.v)?;
        let meta = serde_json::json!({ "step": snap.step });
        write_atomic(&dir.join("optimizer.json"), meta.to_string().as_bytes())
    }
    fn load_optimizer(&mut self, dir: &Path) -> Result<()> {
        let m = tensor_file::read_f32(&dir.join("optimizer_m.bin"))?;
        let v = tensor_file::read_f32(&dir.join("optimizer_v.bin"))?;
        let path = dir.join("optimizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        let meta: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            TrainError::Checkpoint(format!("{}: not valid JSON: {e}", path.display()))
        })?;
        let step = meta
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| TrainError::Checkpoint(format!("{}: no step", path.display())))?;
        let snap = OptimizerSnapshot { m, v, step };
        self.gathered = None;
        self.model
            .restore_optimizer(&snap)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Gpt2Model<Cpu> {
    /// [`LanguageModel::next_token_logits`] with the engine's key/value cache: when `context` extends the ids
    /// already cached by exactly one, only that token is fed; otherwise (a new prompt, or a window that slid past
    /// the maximum context) the cache is rebuilt from the context's last `max_seq_len` ids.
    fn decode_cached(&mut self, context: &[u32]) -> Result<Vec<f32>> {
        let max_t = self.max_seq_len();
        let start = context.len().saturating_sub(max_t);
        let ctx = &context[start..];
        let (cache, fed) = self
            .decoder
            .get_or_insert_with(|| (self.model.new_kv_cache(), Vec::new()));
        let extends = start == 0 && ctx.len() == fed.len() + 1 && ctx[..fed.len()] == fed[..];
        if !extends {
            cache.clear();
            fed.clear();
        }
        let mut logits = Vec::new();
        for &id in &ctx[fed.len()..] {
            logits = self.model.decode_step(cache, id).map_err(engine_err)?;
            fed.push(id);
        }
        if logits.is_empty() {
            return Err(TrainError::Config(
                "generation needs a non-empty context".into(),
            ));
        }
        Ok(logits)
    }
}
