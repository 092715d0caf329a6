//! Optimisation: AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW`), global-norm gradient
//! clipping, and the learning-rate schedule.
//!
//! AdamW step `s` (1-based), per element: `p ← p − lr·wd·p` (only for tensors with [`ParamKind::decays`]),
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `p ← p − lr·(m/(1−β₁ˢ)) / (√(v/(1−β₂ˢ)) + ε)`.
//! One fused pass over `p, g, m, v`, parallel over chunks.

use crate::error::{Gpt2Error, Result};
use crate::params::{ParamKind, ParamSet};
use rayon::prelude::*;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁ (default 0.9).
    pub beta1: f32,
    /// β₂ (default 0.95, GPT-2/llm.c practice; PyTorch's default is 0.999).
    pub beta2: f32,
    /// ε (default 1e-8).
    pub eps: f32,
    /// Decoupled weight decay (default 0.1), applied to matrices and embeddings only.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl AdamWConfig {
    /// Checks ranges: `0 ≤ β < 1`, `ε > 0`, `wd ≥ 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        let ok = (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.eps.is_finite()
            && self.weight_decay >= 0.0
            && self.weight_decay.is_finite();
        if ok {
            Ok(())
        } else {
            Err(Gpt2Error::InvalidHyperParameter(format!("AdamW {self:?}")))
        }
    }
}

/// AdamW optimizer state: the two moments (same layout as the parameters) and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// First moment `m`.
    pub m: ParamSet,
    /// Second moment `v`.
    pub v: ParamSet,
    /// Number of steps taken so far.
    pub step: u64,
}

const CHUNK: usize = 1 << 14;

impl AdamW {
    /// Zero state for parameters shaped like `params`.
    pub fn new(config: AdamWConfig, params: &ParamSet) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            m: ParamSet::zeros(params.config()),
            v: ParamSet::zeros(params.config()),
            step: 0,
        })
    }

    /// One update of `params` with gradients `grads` at learning rate `lr`.
    pub fn update(&mut self, params: &mut ParamSet, grads: &ParamSet, lr: f32) -> Result<()> {
        if params.layout() != self.m.layout() || grads.layout() != self.m.layout() {
            return Err(Gpt2Error::Shape {
                what: "AdamW params/grads",
                expected: format!("{} floats in the optimizer's layout", self.m.len()),
                got: format!("params {}, grads {}", params.len(), grads.len()),
            });
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(Gpt2Error::InvalidHyperParameter(format!(
                "learning rate {lr}"
            )));
        }
        self.step += 1;
        let constants = AdamWStep::new(&self.config, lr, self.step);
        let layout = params.layout().clone();
        for kind in ParamKind::ALL {
            let r = layout.range(kind);
            adamw_update_slice(
                &mut params.as_mut_slice()[r.clone()],
                &grads.as_slice()[r.clone()],
                &mut self.m.as_mut_slice()[r.clone()],
                &mut self.v.as_mut_slice()[r],
                kind.decays(),
                &constants,
            );
        }
        Ok(())
    }
}

/// The constants of AdamW step `s` (1-based): bias corrections folded into a step size and a denominator scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// `lr / (1 − β₁ˢ)`.
    step_size: f32,
    /// `1 / √(1 − β₂ˢ)`.
    inv_sqrt_bc2: f32,
    /// `1 − lr·wd`, the decoupled decay factor of decaying tensors.
    decay: f32,
    /// Factor applied to every gradient as it is read (global-norm clipping fused into the update; 1 = none).
    grad_scale: f32,
}

impl AdamWStep {
    /// The same step with every gradient multiplied by `scale` as it is read: global-norm clipping without a
    /// separate pass over the gradients (`g·scale` is computed in f32 exactly as a clipping pass would store it).
    pub fn with_grad_scale(mut self, scale: f32) -> Self {
        self.grad_scale = scale;
        self
    }

    /// The kernel arguments of one tensor's update: `(β₁, β₂, eps, step_size, 1/√(1 − β₂ˢ), decay factor,
    /// gradient scale)`, the
    /// decay factor `1 − lr·wd` when `decays`, else 1 (device backends pass these to their AdamW kernel).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn kernel_args(&self, decays: bool) -> [f32; 7] {
        let decay = if decays { self.decay } else { 1.0 };
        [
            self.beta1,
            self.beta2,
            self.eps,
            self.step_size,
            self.inv_sqrt_bc2,
            decay,
            self.grad_scale,
        ]
    }

    /// The constants of step `step` (1-based) at learning rate `lr`.
    pub fn new(config: &AdamWConfig, lr: f32, step: u64) -> Self {
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (config.beta1 as f64).powi(t);
        let bc2 = 1.0 - (config.beta2 as f64).powi(t);
        Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            step_size: (lr as f64 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            decay: 1.0 - lr * config.weight_decay,
            grad_scale: 1.0,
        }
    }
}

/// The fused AdamW update of one tensor (see the module docs), in parallel chunks: the one AdamW of the
/// workspace (the engine's optimizer and the trainer's bigram test double both call it). `decays` applies the
/// decoupled weight decay.
pub fn adamw_update_slice(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    decays: bool,
    s: &AdamWStep,
) {
    let decay = if decays { s.decay } else { 1.0 };
    let AdamWStep {
        beta1,
        beta2,
        eps,
        step_size,
        inv_sqrt_bc2,
        grad_scale,
        ..
    } = *s;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let gi = g[i] * grad_scale;
                let mi = beta1 * m[i] + (1.0 - beta1) * gi;
                let vi = beta2 * v[i] + (1.0 - beta2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                let denom = vi.sqrt() * inv_sqrt_bc2 + eps;
                p[i] = p[i] * decay - step_size * mi / denom;
            }
        });
}

/// The global-norm clipping factor (PyTorch's `clip_grad_norm_`): `max/(norm + 1e-6)` when that is < 1 and the
/// norm is finite, else `None` (no scaling). `max_norm ≤ 0` disables clipping.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f32> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && norm.is_finite() && coef < 1.0).then_some(coef as f32)
}

/// The global L2 norm of `grads` (accumulated in f64, per chunk in parallel, then the chunk sums in order, so
/// the result is bit-for-bit reproducible whatever the thread scheduling).
pub fn grad_norm(grads: &ParamSet) -> f64 {
    slice_norm(grads.as_slice())
}

/// The L2 norm of a flat vector, reproducibly (see [`grad_norm`]).
pub fn slice_norm(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>().sqrt()
}

/// Clips `grads` to global norm `max_norm` (PyTorch's `clip_grad_norm_`: scale by `max/(norm + 1e-6)` when that is
/// < 1). Returns the norm before clipping. A non-finite norm leaves the gradients untouched.
pub fn clip_grad_norm(grads: &mut ParamSet, max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if let Some(s) = clip_coefficient(norm, max_norm) {
        grads
            .as_mut_slice()
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|x| *x *= s));
    }
    norm
}

/// Shape of the decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// Cosine from `max_lr` to `min_lr`.
    Cosine,
    /// Linear from `max_lr` to `min_lr`.
    Linear,
    /// Constant `max_lr` after warm-up.
    Constant,
}

/// Learning-rate schedule: linear warm-up over `warmup_steps` (step s gets `max_lr·(s+1)/warmup`), then decay to
/// `min_lr` at `total_steps`, constant `min_lr` afterwards. Steps are 0-based.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub max_lr: f64,
    /// Floor reached at `total_steps`.
    pub min_lr: f64,
    /// Warm-up length.
    pub warmup_steps: u64,
    /// Step at which the floor is reached.
    pub total_steps: u64,
    /// Decay shape.
    pub decay: Decay,
}

impl LrSchedule {
    /// Checks `0 ≤ min_lr ≤ max_lr` (finite) and `warmup_steps ≤ total_steps`.
    pub fn validate(&self) -> Result<()> {
        if !(self.min_lr >= 0.0 && self.max_lr >= self.min_lr && self.max_lr.is_finite())
            || self.warmup_steps > self.total_steps
        {
            return Err(Gpt2Error::InvalidHyperParameter(format!(
                "LR schedule {self:?}"
            )));
        }
        Ok(())
    }

    /// The learning rate at 0-based `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.max_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step >= self.total_steps {
            return if self.decay == Decay::Constant {
                self.max_lr
            } else {
                self.min_lr
            };
        }
        let span = (self.total_steps - self.warmup_steps) as f64;
        let ratio = (step - self.warmup_steps) as f64 / span;
        let range = self.max_lr - self.min_lr;
        match self.decay {
            Decay::Cosine => {
                self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * range
            }
            Decay::Linear => self.max_lr - ratio * range,
            Decay::Constant => self.max_lr,
        }
    }
}
