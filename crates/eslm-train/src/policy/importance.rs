//! `importance --keep ρ --importance-floor λ --score loss|entropy`: importance-sampled token selection whose
//! gradient is an unbiased estimate of the CLM gradient.
//!
//! Each valid row `i` gets a sampling weight `a_i = λ·mean(s) + (1 − λ)·s_i` from its score `s_i` (the loss
//! mapped to `1 − e^{−ℓ_i}`, the `1 − p_y` part of the row's logit-gradient norm, or the entropy): a floor `λ`
//! of uniform sampling plus a share that rises with the score. Keep probabilities are
//! `p_i = min(1, c·a_i)` with `c` chosen so that `Σ_i p_i = ρ·M` (M valid rows; solved exactly by water-filling
//! over the sorted weights). Row `i` is kept when `u_i < p_i` (`u_i` uniform, from the policy's seeded RNG) and
//! its loss is weighted by `1/p_i`; the sum is divided by `M`:
//!
//! ```text
//! L̂ = (1/M)·Σ_{i kept} ℓ_i / p_i,        E[L̂] = (1/M)·Σ_i ℓ_i   (the CLM loss; likewise its gradient)
//! ```
//!
//! `λ = 1` is uniform random selection (the `random` control, unbiased form); `λ → 0` samples in proportion to
//! the score. The kept count is ρ·M in expectation, not exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{check_fraction, Score, ScoreKind, SelectionPolicy, StepContext};
use crate::error::{Result, TrainError};
use crate::model::{Keep, LossSpec};

/// Importance-sampled selection with inverse-probability weights.
#[derive(Debug, Clone)]
pub struct Importance {
    score: ScoreKind,
    keep: f64,
    floor: f64,
    rng: ChaCha8Rng,
    weights: Vec<f32>,
}

impl Importance {
    /// Keeps `keep` of the valid rows in expectation; `floor ∈ [0, 1]` is the uniform share `λ`.
    pub fn new(score: ScoreKind, keep: f64, floor: f64, seed: u64) -> Result<Self> {
        check_fraction("--keep", keep, false)?;
        if !(0.0..=1.0).contains(&floor) {
            return Err(TrainError::Config(format!(
                "--importance-floor must be in [0, 1], got {floor}"
            )));
        }
        Ok(Importance {
            score,
            keep,
            floor,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x1A90_57A7),
            weights: Vec::new(),
        })
    }
}

/// Keep probabilities `p_i = min(1, c·a_i)` with `Σ p_i = target` over the rows with `a_i ≥ 0` (the others get
/// 0). Exact: with the weights sorted descending, the top `m` rows are clipped at 1 and
/// `c = (target − m) / Σ_{j ≥ m} a_(j)` for the smallest `m` where `c·a_(m) ≤ 1`.
pub fn keep_probabilities(a: &[f64], target: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..a.len()).filter(|&i| a[i] > 0.0).collect();
    order.sort_by(|&x, &y| a[y].total_cmp(&a[x]));
    let mut rest: f64 = order.iter().map(|&i| a[i]).sum();
    let mut p = vec![0.0; a.len()];
    if order.is_empty() || target <= 0.0 {
        return p;
    }
    let mut m = 0;
    while m < order.len() {
        let c = (target - m as f64) / rest;
        if c * a[order[m]] <= 1.0 {
            for &i in &order[m..] {
                p[i] = (c * a[i]).min(1.0);
            }
            break;
        }
        p[order[m]] = 1.0;
        rest -= a[order[m]];
        m += 1;
    }
    p
}

impl SelectionPolicy for Importance {
    fn name(&self) -> &'static str {
        "importance"
    }
    fn alpha(&self) -> Option<f64> {
        Some(1.0 - self.keep) // the expected drop fraction, for the logs
    }
    fn keep(&self) -> Keep {
        Keep::AtLeast(0.5) // the host scores are the sampled decisions (1 kept, 0 dropped)
    }
    fn score(&mut self, ctx: &StepContext<'_>, host: &mut Vec<f32>) -> Result<Score> {
        let st = ctx.stats;
        let raw: Vec<f64> = (0..st.rows())
            .map(|i| match self.score {
                ScoreKind::Loss => 1.0 - (-(st.loss[i] as f64)).exp(),
                ScoreKind::Entropy => st.entropy[i] as f64,
            })
            .collect();
        let valid: Vec<usize> = (0..st.rows()).filter(|&i| st.valid[i]).collect();
        let mean = valid.iter().map(|&i| raw[i]).sum::<f64>() / valid.len().max(1) as f64;
        let mut a = vec![-1.0; st.rows()];
        for &i in &valid {
            let s = if raw[i].is_finite() {
                raw[i].max(0.0)
            } else {
                mean
            };
            a[i] = self.floor * mean + (1.0 - self.floor) * s;
            if a[i].is_nan() || a[i] <= 0.0 {
                a[i] = f64::MIN_POSITIVE; // an all-zero batch still samples uniformly
            }
        }
        let p = keep_probabilities(&a, self.keep * valid.len() as f64);
        host.clear();
        self.weights.clear();
        for &pi in &p {
            let kept = pi > 0.0 && self.rng.gen::<f64>() < pi;
            host.push(if kept { 1.0 } else { 0.0 });
            self.weights
                .push(if kept { (1.0 / pi) as f32 } else { 0.0 });
        }
        Ok(Score::Host)
    }
    fn normaliser(&self, _kept: usize, valid: usize) -> f64 {
        valid as f64
    }
    fn loss(&self) -> LossSpec<'_> {
        LossSpec::WeightedCrossEntropy {
            row_weights: &self.weights,
        }
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.rng).unwrap_or(serde_json::Value::Null)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.rng = serde_json::from_value(state.clone())?;
        Ok(())
    }
}
