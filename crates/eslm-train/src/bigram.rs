//! A bigram language model, the trainer's test double: `logits[i] = W[inputs[i]]` with `W [V, Vp]`.
//!
//! It implements [`LanguageModel`] exactly (row statistics on one-row views of `W`, the kept rows' gradient
//! folded into `dW[x_i]`, the workspace's one AdamW and clipping rule, optimizer-state save/load) so the trainer's policies, selection, metrics and checkpoints are
//! tested without the GPT-2 engine, in milliseconds. It has no blocks: an early exit is the full model.

use std::path::Path;

use eslm_collective::Collective;
use eslm_gpt2::loss_head::keep_at_least;
use eslm_gpt2::optim::{adamw_update_slice, clip_coefficient, slice_norm, AdamWStep};
use eslm_kernels::kd::kd_row;
use eslm_kernels::select::select;
use eslm_kernels::sparse_ce::sparse_ce;
use eslm_kernels::token_stats::{token_stats, DEFAULT_IGNORE_INDEX};
use eslm_kernels::LogitsView;

use crate::error::{Result, TrainError};
use crate::model::{Keep, LanguageModel, LossSpec, OptimStep, ScoreSource, Selection, TokenStats};
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
    last_inputs: Vec<u32>,
    targets: Vec<i32>,
    stats: TokenStats,
    row_stats: TokenStats,
    selection: Selection,
    /// The kept rows' loss gradient folded into weight shape `[V, Vp]` (row `x` collects the rows whose input
    /// is `x`); added to `grads` by the backward.
    pending: Vec<f32>,
    grad_ready: bool,
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
            last_inputs: Vec::new(),
            targets: Vec::new(),
            stats: TokenStats::default(),
            row_stats: TokenStats::default(),
            selection: Selection::default(),
            pending: Vec::new(),
            grad_ready: false,
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
        crate::error::check_tokens(inputs, self.vocab)?;
        Ok(())
    }

    /// Token statistics of the batch: row `i`'s logits are the weight row `W[x_i]`, so each row is a one-row
    /// view of the weights (no `[N, V]` logits buffer exists).
    fn compute_stats(&mut self, inputs: &[u32], targets: &[i32]) -> Result<()> {
        if targets.len() != inputs.len() {
            return Err(TrainError::Model(format!(
                "targets have {} ids, expected {}",
                targets.len(),
                inputs.len()
            )));
        }
        let n = inputs.len();
        let stats = &mut self.stats;
        stats.lse.resize(n, 0.0);
        stats.loss.resize(n, 0.0);
        stats.entropy.resize(n, 0.0);
        stats.valid.resize(n, false);
        let one = &mut self.row_stats;
        for (i, (&x, &y)) in inputs.iter().zip(targets).enumerate() {
            let row = weight_row(&self.weights, x as usize, self.vocab, self.stride)?;
            token_stats(&row, &[y], DEFAULT_IGNORE_INDEX, one)?;
            stats.lse[i] = one.lse[0];
            stats.loss[i] = one.loss[0];
            stats.entropy[i] = one.entropy[0];
            stats.valid[i] = one.valid[0];
        }
        self.last_inputs.clear();
        self.last_inputs.extend_from_slice(inputs);
        self.targets.clear();
        self.targets.extend_from_slice(targets);
        self.selection = Selection::default();
        self.grad_ready = false;
        self.flops += (n * self.vocab) as u64;
        Ok(())
    }

    /// Weight row `x` as a one-row logits view.
    fn row(&self, x: usize) -> Result<LogitsView<'_, f32>> {
        weight_row(&self.weights, x, self.vocab, self.stride)
    }
}

/// Row `x` of the weights `[V, Vp]` as a one-row logits view.
fn weight_row(
    weights: &[f32],
    x: usize,
    vocab: usize,
    stride: usize,
) -> Result<LogitsView<'_, f32>> {
    Ok(LogitsView::new(
        &weights[x * stride..(x + 1) * stride],
        1,
        vocab,
        stride,
    )?)
}

impl LanguageModel for BigramModel {
    fn vocab_size(&self) -> usize {
        self.vocab
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
    fn forward(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<&TokenStats> {
        self.check(inputs, b, t)?;
        self.compute_stats(inputs, targets)?;
        Ok(&self.stats)
    }
    fn forward_rows(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        rows: &[u32],
    ) -> Result<&TokenStats> {
        self.check(inputs, b, t)?;
        if targets.len() != inputs.len() || rows.iter().any(|&r| r as usize >= inputs.len()) {
            return Err(TrainError::Model(format!(
                "forward_rows: {} targets and rows up to {:?} for {} inputs",
                targets.len(),
                rows.last(),
                inputs.len()
            )));
        }
        // A bigram row depends on its own input only: the kept rows are a batch of their own.
        let x: Vec<u32> = rows.iter().map(|&r| inputs[r as usize]).collect();
        let y: Vec<i32> = rows.iter().map(|&r| targets[r as usize]).collect();
        self.compute_stats(&x, &y)?;
        Ok(&self.stats)
    }
    fn forward_inference(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        _exit: Option<usize>,
    ) -> Result<&TokenStats> {
        self.check(inputs, b, t)?;
        self.compute_stats(inputs, targets)?;
        Ok(&self.stats)
    }
    fn row_logits(&self, row: usize) -> Result<Vec<f32>> {
        let x = *self.last_inputs.get(row).ok_or_else(|| {
            TrainError::Model(format!("row {row} is not a row of the last forward"))
        })?;
        Ok(self.row(x as usize)?.row(0).to_vec())
    }
    fn select(&mut self, score: ScoreSource<'_>, keep: Keep) -> Result<&Selection> {
        let scores: &[f32] = match score {
            ScoreSource::Loss => &self.stats.loss,
            ScoreSource::Entropy => &self.stats.entropy,
            ScoreSource::Host(s) => s,
        };
        select_rows(scores, &self.stats.valid, keep, &mut self.selection)?;
        self.grad_ready = false;
        Ok(&self.selection)
    }
    fn loss_grad(&mut self, loss: LossSpec<'_>, scale: f32) -> Result<f32> {
        let mut row_weights = None;
        let teacher = match loss {
            LossSpec::CrossEntropy => None,
            LossSpec::WeightedCrossEntropy { row_weights: w } => {
                if w.len() != self.last_inputs.len() {
                    return Err(TrainError::Model(format!(
                        "{} row weights for {} rows",
                        w.len(),
                        self.last_inputs.len()
                    )));
                }
                row_weights = Some(w);
                None
            }
            LossSpec::Distill { teacher, params } => {
                let t = teacher
                    .as_any()
                    .downcast_ref::<BigramModel>()
                    .ok_or_else(|| {
                        TrainError::Config(
                            "the teacher of a bigram student must be a bigram model".into(),
                        )
                    })?;
                if t.vocab != self.vocab || t.last_inputs != self.last_inputs {
                    return Err(TrainError::Model(
                        "eslm-kd: the teacher's last forward does not cover the student's rows"
                            .into(),
                    ));
                }
                Some((t, params))
            }
        };
        self.pending.clear();
        self.pending.resize(self.weights.len(), 0.0);
        let mut grad = vec![0.0f32; self.stride];
        let mut sum = 0.0f64;
        for &r in &self.selection.indices {
            let r = r as usize;
            let x = self.last_inputs[r] as usize;
            let row = self.row(x)?;
            sum += match teacher {
                None => {
                    let lse = [self.stats.lse[r]];
                    sparse_ce(
                        &row,
                        &[self.targets[r]],
                        &lse,
                        &[0],
                        scale,
                        &mut grad,
                        self.stride,
                    )? as f64
                }
                Some((t, params)) => {
                    let y = self.targets[r];
                    if y < 0 {
                        return Err(TrainError::Model(format!(
                            "eslm-kd: kept row {r} has no target"
                        )));
                    }
                    kd_row(
                        row.row(0),
                        t.row(x)?.row(0),
                        y as usize,
                        params,
                        scale,
                        &mut grad,
                    )
                }
            };
            let w = row_weights.map_or(1.0, |w| w[r]);
            let dst = &mut self.pending[x * self.stride..x * self.stride + self.vocab];
            dst.iter_mut()
                .zip(&grad[..self.vocab])
                .for_each(|(d, &g)| *d += w * g);
        }
        self.grad_ready = true;
        let k = self.selection.indices.len();
        Ok(if k == 0 { 0.0 } else { (sum / k as f64) as f32 })
    }
    fn backward(&mut self) -> Result<()> {
        if !self.grad_ready {
            return Err(TrainError::Model(
                "backward needs loss_grad after the selection".into(),
            ));
        }
        self.grads
            .iter_mut()
            .zip(&self.pending)
            .for_each(|(g, &p)| *g += p);
        self.flops += (self.selection.indices.len() * self.vocab) as u64;
        Ok(())
    }
    fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = 0.0);
    }
    fn reduce_grads(&mut self, collective: &dyn Collective) -> Result<()> {
        collective
            .all_reduce_sum_f32(&mut self.grads)
            .map_err(|e| TrainError::Model(e.to_string()))
    }
    fn optimizer_step(&mut self, s: &OptimStep) -> Result<f32> {
        let norm = slice_norm(&self.grads);
        if !norm.is_finite() {
            return Ok(norm as f32);
        }
        let clip = clip_coefficient(norm, s.grad_clip as f64).unwrap_or(1.0);
        self.adam_step += 1;
        let constants = AdamWStep::new(&s.adamw(), s.lr, self.adam_step).with_grad_scale(clip);
        adamw_update_slice(
            &mut self.weights,
            &self.grads,
            &mut self.m,
            &mut self.v,
            true,
            &constants,
        );
        self.flops += 10 * self.weights.len() as u64;
        Ok(norm as f32)
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
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// [`Keep`] over `scores` among `valid` rows, on the host.
fn select_rows(scores: &[f32], valid: &[bool], keep: Keep, out: &mut Selection) -> Result<()> {
    match keep {
        Keep::Rule(rule) => select(scores, Some(valid), rule, out)?,
        Keep::AllValid => keep_at_least(scores, valid, None, out)?,
        Keep::AtLeast(th) => keep_at_least(scores, valid, Some(th), out)?,
    }
    Ok(())
}
