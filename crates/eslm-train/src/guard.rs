//! Divergence detection: a run whose loss or gradient norm blows up stops with a clear message and a non-zero
//! exit instead of finishing "successfully" with a useless model.
//!
//! The rule, checked after every optimizer step `N` (F = `--divergence-factor`, default 3; G =
//! `--grad-spike-factor`, default 100; either 0 turns its rule off):
//!
//! - **absolute**: the step's loss (mean CE over every token forwarded) exceeds `F · ln V` (V = vocabulary): far
//!   worse than a model predicting uniformly, which is where training starts;
//! - **loss spike**: with at least [`MIN_HISTORY`] earlier accepted steps, the loss exceeds `F ×` the median loss
//!   of the last [`WINDOW`] accepted steps;
//! - **gradient spike**: with at least [`MIN_HISTORY`] earlier accepted steps, the gradient norm (before clipping)
//!   exceeds `G ×` the median of the last [`WINDOW`] accepted norms. With gradient clipping on (a positive
//!   `--grad-clip`, the default) such a step is applied at the clipped norm, so a spike alone is not a
//!   divergence: it marks the run *elevated* (checkpoints protected) and only a loss rule stops it. Without
//!   clipping a spike is applied in full and stops the run. (Measured: an ada-eslm run on Gutenberg had one
//!   step at 115× its median norm while its loss kept falling; stopping it was a false alarm.)
//!
//! Non-finite losses and gradient norms are caught by the step itself (the engine never applies a non-finite
//! update) and handled the same way unless `--skip-nonfinite` is set. A flagged step does not enter the history.
//!
//! Step `N`'s loss comes from the weights after `N − 1` updates, so the update that broke the model is at most
//! update `N − 1`: the last good state is the newest checkpoint at step `≤ N − 2`. On a divergence the trainer
//! writes no checkpoint, renames any checkpoint at step `≥ N − 1` to `step_K.diverged` (kept for inspection,
//! ignored by `--resume`), and names the last good checkpoint, so `--resume` (with a lower `--lr`, say)
//! continues from the state before the bad update. While the loss or norm is *elevated* (above half the way to
//! a spike: `(1 + F)/2 ×` the median loss, or `G/10 ×` the median norm) checkpoint pruning never deletes the
//! last checkpoint written before the elevation started.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use crate::checkpoint::{checkpoint_name, checkpoints_dir, list_checkpoints};
use crate::error::{Result, TrainError};

/// Steps of history the relative rules use (a running median).
pub const WINDOW: usize = 64;
/// Accepted steps needed before the relative rules apply.
pub const MIN_HISTORY: usize = 8;

/// What the guard says about one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Normal.
    Ok,
    /// Above its running level but not yet a divergence: protect the last clean checkpoint from pruning.
    Elevated,
    /// Diverged: the message says which rule fired, with the values.
    Diverged(String),
}

/// Running state of the divergence rules.
#[derive(Debug, Clone)]
pub struct DivergenceGuard {
    loss_factor: f64,
    grad_factor: f64,
    vocab: usize,
    losses: VecDeque<f64>,
    norms: VecDeque<f64>,
    elevated: bool,
    /// Gradients are clipped: a norm spike is not applied in full (see the module docs).
    clipped: bool,
}

fn median(v: &VecDeque<f64>) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

impl DivergenceGuard {
    /// A guard with loss factor `loss_factor` (F) and gradient factor `grad_factor` (G) for a vocabulary of
    /// `vocab` ids. A factor ≤ 0 turns its rule off.
    pub fn new(loss_factor: f64, grad_factor: f64, vocab: usize) -> Self {
        DivergenceGuard {
            loss_factor,
            grad_factor,
            vocab,
            losses: VecDeque::new(),
            norms: VecDeque::new(),
            elevated: false,
            clipped: false,
        }
    }

    /// Declares that gradients are clipped: a gradient spike then marks the run elevated instead of stopping it.
    pub fn with_clipping(mut self, clipped: bool) -> Self {
        self.clipped = clipped;
        self
    }

    /// Whether the last observed step was elevated (or diverged).
    pub fn is_elevated(&self) -> bool {
        self.elevated
    }

    /// Checks step `step` with mean loss `loss` and gradient norm `grad_norm`; accepted steps enter the history.
    pub fn observe(&mut self, step: u64, loss: f64, grad_norm: f64) -> Verdict {
        let f = self.loss_factor;
        let g = self.grad_factor;
        let enough = self.losses.len() >= MIN_HISTORY;
        let ln_v = (self.vocab.max(2) as f64).ln();
        let mut verdict = Verdict::Ok;
        if f > 0.0 && loss.is_finite() && loss > f * ln_v {
            verdict = Verdict::Diverged(format!(
                "loss {loss:.4} at step {step} is above --divergence-factor {f} × ln(vocabulary {}) = {:.4} \
                 (a uniform prediction scores {ln_v:.4})",
                self.vocab,
                f * ln_v
            ));
        } else if enough {
            let ml = median(&self.losses);
            let mg = median(&self.norms);
            if f > 0.0 && loss > f * ml {
                verdict = Verdict::Diverged(format!(
                    "loss {loss:.4} at step {step} is above --divergence-factor {f} × the running median loss \
                     {ml:.4} of the last {} steps",
                    self.losses.len()
                ));
            } else if g > 0.0 && grad_norm > g * mg && self.clipped {
                verdict = Verdict::Elevated;
            } else if g > 0.0 && grad_norm > g * mg {
                verdict = Verdict::Diverged(format!(
                    "gradient norm {grad_norm:.4e} at step {step} is above --grad-spike-factor {g} × the running \
                     median norm {mg:.4e} of the last {} steps",
                    self.norms.len()
                ));
            } else if (f > 0.0 && loss > 0.5 * (1.0 + f) * ml)
                || (g > 0.0 && grad_norm > 0.1 * g * mg)
            {
                verdict = Verdict::Elevated;
            }
        }
        self.elevated = verdict != Verdict::Ok;
        if verdict == Verdict::Ok && loss.is_finite() && grad_norm.is_finite() {
            self.losses.push_back(loss);
            self.norms.push_back(grad_norm);
            if self.losses.len() > WINDOW {
                self.losses.pop_front();
                self.norms.pop_front();
            }
        }
        verdict
    }
}

/// After a divergence (or a non-finite loss) detected at step `step`: renames every checkpoint of `out` at step
/// `≥ step − 1` to `step_K.diverged` (their weights may already be broken) and returns the newest remaining
/// checkpoint, the last good state, if any.
pub fn quarantine_after(out: &Path, step: u64) -> Result<Option<PathBuf>> {
    let first_bad = step.saturating_sub(1);
    let root = checkpoints_dir(out);
    let mut good = None;
    for (k, dir) in list_checkpoints(out)? {
        if k >= first_bad {
            let to = root.join(format!("{}.diverged", checkpoint_name(k)));
            if to.exists() {
                std::fs::remove_dir_all(&to).map_err(|e| TrainError::io(&to, e))?;
            }
            std::fs::rename(&dir, &to).map_err(|e| TrainError::io(&dir, e))?;
        } else {
            good = Some(dir);
        }
    }
    Ok(good)
}

/// The hint of a divergence message: what to resume from and what to change.
pub fn divergence_hint(out: &Path, last_good: Option<&Path>) -> String {
    match last_good {
        Some(dir) => format!(
            "the last checkpoint before it is {} (later ones were renamed *.diverged). HINT: continue from it \
             with `eslm-train --out {} --resume --lr SMALLER` (a lower --lr, a --grad-clip, or more \
             --warmup-steps), or pass --skip-nonfinite / --divergence-factor 0 to train through it",
            dir.display(),
            out.display()
        ),
        None => format!(
            "no checkpoint precedes it. HINT: start again with a lower --lr (or a --grad-clip, more \
             --warmup-steps) and `--out {} --overwrite` (--checkpoint-every N keeps restart points), or pass \
             --skip-nonfinite / --divergence-factor 0 to train through it",
            out.display()
        ),
    }
}

/// The guard state a [`crate::trainer::Trainer`] keeps: the divergence rules, which checkpoint pruning must
/// spare while the loss is elevated, and the `--time-budget` bookkeeping.
#[derive(Debug, Clone)]
pub struct RunGuard {
    /// The divergence rules.
    pub rules: DivergenceGuard,
    clean_checkpoint: Option<u64>,
    budget_s: Option<f64>,
    wall_at_start: Option<f64>,
    steps_at_start: u64,
}

/// Steps of this invocation measured before the LR horizon of a `--time-budget` run is fixed.
pub const HORIZON_CALIBRATION_STEPS: u64 = 10;

impl RunGuard {
    /// The guard of a run with config `cfg` and vocabulary `vocab`.
    pub fn new(cfg: &crate::config::RunConfig, vocab: usize) -> Self {
        RunGuard {
            rules: DivergenceGuard::new(cfg.divergence_factor, cfg.grad_spike_factor, vocab)
                .with_clipping(cfg.grad_clip > 0.0),
            clean_checkpoint: None,
            budget_s: cfg.time_budget_s(),
            wall_at_start: None,
            steps_at_start: 0,
        }
    }

    /// Checks one step (see [`DivergenceGuard::observe`]).
    pub fn observe(&mut self, step: u64, loss: f64, grad_norm: f64) -> Verdict {
        self.rules.observe(step, loss, grad_norm)
    }

    /// The checkpoint step pruning must keep: the newest checkpoint written while the run was not elevated.
    /// A checkpoint is only confirmed good once the next step's loss is seen (that loss comes from its weights),
    /// so the newest confirmed one always survives the pruning done when the next checkpoint is written.
    pub fn protected(&self) -> Option<u64> {
        self.clean_checkpoint
    }

    /// Records that a checkpoint of step `step` was written (clean unless the loss is elevated).
    pub fn saved(&mut self, step: u64) {
        if !self.rules.is_elevated() {
            self.clean_checkpoint = Some(step);
        }
    }

    /// Marks the start of the training loop (cumulative training seconds `wall_s` at step `step`).
    pub fn start(&mut self, step: u64, wall_s: f64) {
        self.wall_at_start = Some(wall_s);
        self.steps_at_start = step;
    }

    /// Whether the cumulative training wall-clock `wall_s` has used up the `--time-budget`.
    pub fn time_up(&self, wall_s: f64) -> bool {
        self.budget_s.is_some_and(|b| wall_s >= b)
    }

    /// Under a `--time-budget`, after [`HORIZON_CALIBRATION_STEPS`] steps of this invocation: the step at which
    /// the budget will run out at the measured mean step time (`step + (budget − wall_s) / mean`), to become the
    /// LR schedule's horizon when it is below the run's total steps. `None` otherwise.
    pub fn estimate_horizon(&self, step: u64, wall_s: f64, total: u64) -> Option<u64> {
        let budget = self.budget_s?;
        let w0 = self.wall_at_start?;
        let done = step.checked_sub(self.steps_at_start)?;
        if done != HORIZON_CALIBRATION_STEPS {
            return None;
        }
        let mean = (wall_s - w0) / done as f64;
        if mean.is_nan() || mean <= 0.0 {
            return None;
        }
        let est = step + ((budget - wall_s).max(0.0) / mean).floor() as u64;
        (est < total).then_some(est.max(step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warmed(clipped: bool) -> DivergenceGuard {
        let mut g = DivergenceGuard::new(3.0, 100.0, 50257).with_clipping(clipped);
        for s in 0..(MIN_HISTORY as u64 + 2) {
            assert_eq!(g.observe(s, 6.0, 1.0), Verdict::Ok);
        }
        g
    }

    #[test]
    fn a_gradient_spike_stops_an_unclipped_run_and_only_flags_a_clipped_one() {
        let spike = |g: &mut DivergenceGuard| g.observe(20, 5.9, 150.0);
        assert!(
            matches!(spike(&mut warmed(false)), Verdict::Diverged(m) if m.contains("--grad-spike-factor"))
        );
        let mut clipped = warmed(true);
        assert_eq!(spike(&mut clipped), Verdict::Elevated);
        assert!(clipped.is_elevated());
        // A loss spike stops the run whatever the clipping.
        assert!(
            matches!(clipped.observe(21, 25.0, 1.0), Verdict::Diverged(m) if m.contains("median loss"))
        );
    }
}
