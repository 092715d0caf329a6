//! `eslm`: the paper's method. Score = the model's own token loss `ℓ_i = lse_i − z_{i,y}` or entropy `H_i`, from
//! this step's forward (no reference model, no extra pass). Threshold = the empirical α-quantile (VaR_α) of the
//! scores in the selection scope; keep score ≥ threshold (k = ⌈(1 − α)·M⌉ rows, ties kept); loss = mean CE over
//! the kept rows (with the loss score: the CVaR_α estimator).

use super::{check_fraction, Score, ScoreKind, SelectionPolicy, StepContext};
use crate::error::Result;

/// ESLM with a fixed α.
#[derive(Debug, Clone)]
pub struct Eslm {
    score: ScoreKind,
    alpha: f64,
}

impl Eslm {
    /// ESLM ranking by `score`, dropping fraction `alpha ∈ (0, 1)`.
    pub fn new(score: ScoreKind, alpha: f64) -> Result<Self> {
        check_fraction("--alpha", alpha, false)?;
        Ok(Eslm { score, alpha })
    }
}

impl SelectionPolicy for Eslm {
    fn name(&self) -> &'static str {
        "eslm"
    }
    fn alpha(&self) -> Option<f64> {
        Some(self.alpha)
    }
    fn score(&mut self, _ctx: &StepContext<'_>, _host: &mut Vec<f32>) -> Result<Score> {
        Ok(self.score.score())
    }
}
