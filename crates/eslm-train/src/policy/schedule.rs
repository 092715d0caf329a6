//! `--select-warmup N --alpha-ramp R`: when selection starts, for any policy with an α.
//!
//! Early in training almost every token still teaches the model something, and a loss-ranked selection from the
//! first step keeps only the rarest tokens (the model then never learns the frequent ones: `docs/results.md`).
//! This wrapper trains every valid token (CLM) for the first `N` steps, then lets the wrapped policy's α grow
//! linearly from 0 to its own value over the next `R` steps:
//!
//! ```text
//! α(s) = none (keep all)                  for s < N
//! α(s) = α_p · min(1, (s − N + 1) / R)    for s ≥ N   (R = 0: α_p at once)
//! ```
//!
//! where `α_p` is the wrapped policy's α at that step (Ada-ESLM's adapted one included). Scores, losses,
//! normalisers and observations are the wrapped policy's; while it keeps every row, no VaR selection runs.

use eslm_collective::Collective;

use super::{Score, SelectionPolicy, StepContext};
use crate::error::Result;
use eslm_kernels::select::SelectRule;

use crate::model::{Keep, LanguageModel, LossSpec};

/// A policy whose selection starts after a CLM warm-up and ramps its α up.
pub struct Scheduled {
    inner: Box<dyn SelectionPolicy>,
    warmup: u64,
    ramp: u64,
    step: u64,
}

impl Scheduled {
    /// Wraps `inner`: CLM for `warmup` steps, then α ramped over `ramp` steps.
    pub fn new(inner: Box<dyn SelectionPolicy>, warmup: u64, ramp: u64) -> Self {
        Scheduled {
            inner,
            warmup,
            ramp,
            step: 0,
        }
    }

    /// The fraction of the wrapped policy's α in force at 0-based step `step` (`None`: keep every row).
    pub fn alpha_factor(&self, step: u64) -> Option<f64> {
        if step < self.warmup {
            return None;
        }
        if self.ramp == 0 {
            return Some(1.0);
        }
        Some(((step - self.warmup + 1) as f64 / self.ramp as f64).min(1.0))
    }
}

impl SelectionPolicy for Scheduled {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn start_step(&mut self, step: u64) {
        self.step = step;
        self.inner.start_step(step);
    }
    fn alpha(&self) -> Option<f64> {
        let a = self.inner.alpha()?;
        let f = self.alpha_factor(self.step)?;
        let scaled = a * f;
        // An α of 0 keeps every row: say so rather than asking VaR for α = 0 (outside its domain).
        (scaled > 0.0).then_some(scaled)
    }
    fn keep(&self) -> Keep {
        match (self.alpha_factor(self.step), self.alpha()) {
            (None, _) | (_, None) => Keep::AllValid,
            (Some(_), Some(alpha)) => match self.inner.keep() {
                Keep::Rule(SelectRule::Var { .. }) => Keep::Rule(SelectRule::Var { alpha }),
                other => other,
            },
        }
    }
    fn filter_sequences(
        &mut self,
        model: &mut dyn LanguageModel,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        collective: &dyn Collective,
    ) -> Result<Option<Vec<usize>>> {
        if self.step < self.warmup {
            return Ok(None);
        }
        self.inner
            .filter_sequences(model, inputs, targets, b, t, collective)
    }
    fn prepare(&mut self, inputs: &[u32], targets: &[i32], b: usize, t: usize) -> Result<()> {
        self.inner.prepare(inputs, targets, b, t)
    }
    fn score(&mut self, ctx: &StepContext<'_>, host: &mut Vec<f32>) -> Result<Score> {
        self.inner.score(ctx, host)
    }
    fn normaliser(&self, kept: usize, valid: usize) -> f64 {
        self.inner.normaliser(kept, valid)
    }
    fn loss(&self) -> LossSpec<'_> {
        self.inner.loss()
    }
    fn observe(
        &mut self,
        scores: &[f32],
        keep: &[bool],
        valid: &[bool],
        collective: &dyn Collective,
    ) -> Result<()> {
        if self.step < self.warmup {
            return Ok(()); // Ada-ESLM's controller only sees steps where it selected
        }
        self.inner.observe(scores, keep, valid, collective)
    }
    fn state(&self) -> serde_json::Value {
        self.inner.state()
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.inner.restore(state)
    }
}
