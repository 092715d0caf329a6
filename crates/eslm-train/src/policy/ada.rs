//! `ada-eslm`: ESLM with α adapted every step by a bounded, smoothed proportional controller.
//!
//! The paper does not publish its rule; this is eslm's. Let `s_i ≥ 0` be the token scores (loss or entropy) of
//! the step's selection scope, `K` the kept rows and `V` the valid rows. The controlled statistic is the **share
//! of the score mass carried by the kept tokens**
//!
//! ```text
//! m_t   = Σ_{i∈K} s_i / Σ_{i∈V} s_i                      (1 − α ≤ m_t ≤ 1 for kept = the top scores)
//! m̄_t   = β·m̄_{t−1} + (1 − β)·m_t                        (EMA; m̄ starts at the first m_t)
//! α_t+1 = clip(α_t + η·(m̄_t − m*), α_min, α_max)
//! ```
//!
//! Reading: ESLM wants the kept tokens to hold the risk (the tail of the loss). If the kept tokens already carry
//! more than the target share `m*` of the total mass, the tail is heavy and the same share can be kept with fewer
//! tokens, so α rises; if they carry less (a flat score distribution), α falls and more tokens are kept. At a
//! fixed point the top `(1 − α)` fraction holds exactly `m*` of the mass. Defaults: `m* = 0.6`, `η = 0.05`,
//! `β = 0.9`, `α ∈ [0.1, 0.9]`, `α_0 = --alpha` (0.5 if unset). α is logged every step (`alpha` in
//! metrics.jsonl). With gradient accumulation α is updated once per optimizer step over all its micro-batches.

use eslm_collective::Collective;

use super::{check_fraction, Score, ScoreKind, SelectionPolicy, StepContext};
use crate::error::{Result, TrainError};

/// Hyper-parameters of the Ada-ESLM controller.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdaConfig {
    /// Initial α.
    pub alpha0: f64,
    /// Lower bound on α.
    pub alpha_min: f64,
    /// Upper bound on α.
    pub alpha_max: f64,
    /// Target share `m*` of the score mass carried by the kept tokens.
    pub target_mass: f64,
    /// Controller gain η.
    pub gain: f64,
    /// EMA coefficient β of the statistic.
    pub ema: f64,
}

impl Default for AdaConfig {
    fn default() -> Self {
        AdaConfig {
            alpha0: 0.5,
            alpha_min: 0.1,
            alpha_max: 0.9,
            target_mass: 0.6,
            gain: 0.05,
            ema: 0.9,
        }
    }
}

/// The controller state, serialised into checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
struct AdaState {
    alpha: f64,
    mass_ema: Option<f64>,
}

/// ESLM with an adaptive α.
#[derive(Debug, Clone)]
pub struct AdaEslm {
    score: ScoreKind,
    config: AdaConfig,
    state: AdaState,
    last_mass: Option<f64>,
}

impl AdaEslm {
    /// A controller with `config` ranking by `score`. Checks `0 < α_min ≤ α_0 ≤ α_max < 1`, `m* ∈ (0, 1)`,
    /// `η > 0` and `β ∈ [0, 1)`.
    pub fn new(score: ScoreKind, config: AdaConfig) -> Result<Self> {
        check_fraction("--alpha-min", config.alpha_min, false)?;
        check_fraction("--alpha-max", config.alpha_max, false)?;
        check_fraction("--target-mass", config.target_mass, false)?;
        if !(config.alpha_min <= config.alpha0 && config.alpha0 <= config.alpha_max) {
            return Err(TrainError::Config(format!(
                "ada-eslm needs alpha-min <= alpha <= alpha-max, got {} <= {} <= {}",
                config.alpha_min, config.alpha0, config.alpha_max
            )));
        }
        if !(config.gain.is_finite() && config.gain > 0.0 && (0.0..1.0).contains(&config.ema)) {
            return Err(TrainError::Config(format!(
                "ada-eslm needs gain > 0 and 0 <= ema < 1, got gain {} ema {}",
                config.gain, config.ema
            )));
        }
        Ok(AdaEslm {
            score,
            config,
            state: AdaState {
                alpha: config.alpha0,
                mass_ema: None,
            },
            last_mass: None,
        })
    }

    /// The kept-mass statistic `m_t` of the last observed step.
    pub fn last_mass(&self) -> Option<f64> {
        self.last_mass
    }

    /// The controller's hyper-parameters.
    pub fn config(&self) -> &AdaConfig {
        &self.config
    }
}

impl SelectionPolicy for AdaEslm {
    fn name(&self) -> &'static str {
        "ada-eslm"
    }
    fn alpha(&self) -> Option<f64> {
        Some(self.state.alpha)
    }
    fn score(&mut self, _ctx: &StepContext<'_>, _host: &mut Vec<f32>) -> Result<Score> {
        Ok(self.score.score())
    }
    fn observe(
        &mut self,
        scores: &[f32],
        keep: &[bool],
        valid: &[bool],
        collective: &dyn Collective,
    ) -> Result<()> {
        let (mut kept_mass, mut total) = (0.0f64, 0.0f64);
        for ((&s, &k), &v) in scores.iter().zip(keep).zip(valid) {
            if v && s.is_finite() {
                let s = s.max(0.0) as f64;
                total += s;
                if k {
                    kept_mass += s;
                }
            }
        }
        let mut sums = [kept_mass, total];
        collective.all_reduce_sum_f64(&mut sums)?;
        let [kept_mass, total] = sums;
        if total <= 0.0 {
            return Ok(()); // no information (all scores zero): leave α where it is
        }
        let m = kept_mass / total;
        self.last_mass = Some(m);
        let ema = match self.state.mass_ema {
            None => m,
            Some(prev) => self.config.ema * prev + (1.0 - self.config.ema) * m,
        };
        self.state.mass_ema = Some(ema);
        let next = self.state.alpha + self.config.gain * (ema - self.config.target_mass);
        self.state.alpha = next.clamp(self.config.alpha_min, self.config.alpha_max);
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.state).unwrap_or(serde_json::Value::Null)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.state = serde_json::from_value(state.clone())?;
        Ok(())
    }
}
