//! A bigram language model, the trainer's test double: `logits[i] = W[inputs[i]]` with `W [V, Vp]`.
//!
//! It implements [`LanguageModel`] exactly (sparse backward `dW[x_i] += dlogits_k` for kept rows, AdamW, global
//! norm clipping, optimizer-state save/load) so the trainer's policies, selection, metrics and checkpoints are
//! tested without the GPT-2 engine, in milliseconds. It has no blocks: an early exit is the full model.

use std::path::Path;

use crate::error::{Result, TrainError};
use crate::model::{LanguageModel, OptimStep};
use crate::tensor_file;

/// A bigram model with an AdamW optimizer.
#[derive(Debug, Clone)]
pub struct BigramModel {
    vocab: usize,
    stride: usize,
    /// Weights `[V, Vp]` (padded columns stay zero).
    weights: Vec<f32>,
    grads: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    adam_step: u64,
    logits: Vec<f32>,
    last_inputs: Vec<u32>,
    flops: u64,
}

impl BigramModel {
    /// A zero-initialised bigram model over `vocab` ids, logits padded to a multiple of 8.
    pub fn new(vocab: usize) -> Self {
        let stride = vocab.div_ceil(8) * 8;
        let n = vocab * stride;
        BigramModel {
            vocab,
            stride,
            weights: vec![0.0; n],
            grads: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
            adam_step: 0,
            logits: Vec::new(),
            last_inputs: Vec::new(),
            flops: 0,
        }
    }

    /// A bigram model with the given weights `[V, Vp]` (`Vp` = `vocab` rounded up to a multiple of 8).
    pub fn from_weights(vocab: usize, weights: Vec<f32>) -> Result<Self> {
        let mut m = Self::new(vocab);
        if weights.len() != m.weights.len() {
            return Err(TrainError::Model(format!(
                "bigram weights need {} values, got {}",
                m.weights.len(),
                weights.len()
            )));
        }
        m.weights = weights;
        Ok(m)
    }

    /// The weights `[V, Vp]`.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    fn load_model_file(&mut self, dir: &Path) -> Result<()> {
        let w = tensor_file::read_f32(&dir.join("bigram.bin"))?;
        if w.len() != self.weights.len() {
            return Err(TrainError::Checkpoint(format!(
                "bigram weights have {} values, the model needs {}",
                w.len(),
                self.weights.len()
            )));
        }
        self.weights = w;
        Ok(())
    }

    fn check(&self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        if inputs.len() != b * t {
            return Err(TrainError::Model(format!(
                "inputs have {} ids, expected {b}·{t}",
                inputs.len()
            )));
        }
        if let Some(&id) = inputs.iter().find(|&&x| x as usize >= self.vocab) {
            return Err(TrainError::TokenOutOfRange {
                id,
                vocab: self.vocab,
            });
        }
        Ok(())
    }

    fn fill_logits(&mut self, inputs: &[u32]) {
        self.logits.resize(inputs.len() * self.stride, 0.0);
        for (row, &x) in self.logits.chunks_exact_mut(self.stride).zip(inputs) {
            let x = x as usize;
            row.copy_from_slice(&self.weights[x * self.stride..(x + 1) * self.stride]);
        }
        self.flops += (inputs.len() * self.vocab) as u64;
    }
}

impl LanguageModel for BigramModel {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn logits_stride(&self) -> usize {
        self.stride
    }
    fn max_seq_len(&self) -> usize {
        usize::MAX
    }
    fn num_layers(&self) -> usize {
        1
    }
    fn num_params(&self) -> usize {
        self.vocab * self.vocab
    }
    fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<&[f32]> {
        self.check(inputs, b, t)?;
        self.last_inputs.clear();
        self.last_inputs.extend_from_slice(inputs);
        self.fill_logits(inputs);
        Ok(&self.logits)
    }
    fn forward_inference(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        _exit: Option<usize>,
    ) -> Result<&[f32]> {
        self.check(inputs, b, t)?;
        self.fill_logits(inputs);
        Ok(&self.logits)
    }
    fn last_logits(&self) -> &[f32] {
        &self.logits
    }
    fn backward_sparse(&mut self, kept: &[u32], dlogits: &[f32]) -> Result<()> {
        if dlogits.len() != kept.len() * self.stride {
            return Err(TrainError::Model(format!(
                "dlogits has {} values, expected {}·{}",
                dlogits.len(),
                kept.len(),
                self.stride
            )));
        }
        for (&r, d) in kept.iter().zip(dlogits.chunks_exact(self.stride)) {
            let x = *self
                .last_inputs
                .get(r as usize)
                .ok_or_else(|| TrainError::Model(format!("kept row {r} is out of range")))?
                as usize;
            let g = &mut self.grads[x * self.stride..x * self.stride + self.vocab];
            for (gi, di) in g.iter_mut().zip(&d[..self.vocab]) {
                *gi += di;
            }
        }
        self.flops += (kept.len() * self.vocab) as u64;
        Ok(())
    }
    fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = 0.0);
    }
    fn optimizer_step(&mut self, s: &OptimStep) -> Result<f32> {
        let norm = self
            .grads
            .iter()
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt() as f32;
        if !norm.is_finite() {
            return Ok(norm);
        }
        let clip = if s.grad_clip > 0.0 && norm > s.grad_clip {
            s.grad_clip / norm
        } else {
            1.0
        };
        self.adam_step += 1;
        let t = self.adam_step as i32;
        let (bc1, bc2) = (1.0 - s.beta1.powi(t), 1.0 - s.beta2.powi(t));
        for i in 0..self.weights.len() {
            let g = self.grads[i] * clip;
            self.m[i] = s.beta1 * self.m[i] + (1.0 - s.beta1) * g;
            self.v[i] = s.beta2 * self.v[i] + (1.0 - s.beta2) * g * g;
            let update = (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + s.eps);
            self.weights[i] -= s.lr * (update + s.weight_decay * self.weights[i]);
        }
        self.flops += 10 * self.weights.len() as u64;
        Ok(norm)
    }
    fn realized_flops(&self) -> u64 {
        self.flops
    }
    fn save_model(&self, dir: &Path) -> Result<()> {
        tensor_file::write_f32(&dir.join("bigram.bin"), &self.weights)
    }
    fn load_model(&mut self, dir: &Path) -> Result<()> {
        self.load_model_file(dir)
    }
    fn save_optimizer(&self, dir: &Path) -> Result<()> {
        let mut all = self.m.clone();
        all.extend_from_slice(&self.v);
        all.push(self.adam_step as f32);
        tensor_file::write_f32(&dir.join("optimizer.bin"), &all)
    }
    fn load_optimizer(&mut self, dir: &Path) -> Result<()> {
        let all = tensor_file::read_f32(&dir.join("optimizer.bin"))?;
        let n = self.weights.len();
        if all.len() != 2 * n + 1 {
            return Err(TrainError::Checkpoint(
                "optimizer state does not match the model".into(),
            ));
        }
        self.m.copy_from_slice(&all[..n]);
        self.v.copy_from_slice(&all[n..2 * n]);
        self.adam_step = all[2 * n] as u64;
        Ok(())
    }
}
