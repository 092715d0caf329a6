//! `rho1 --reference CKPT --keep K`: Rho-1's selective language modeling. Score = excess loss
//! `ℓ_i − ℓ_i^ref`, where `ℓ^ref` is a frozen reference model's token loss on the same tokens (one no-grad
//! forward of the reference per micro-batch). Keep the top `K` fraction (VaR at α = 1 − K, ties kept).
//!
//! Normalisation (`--rho1-norm`): `kept` (default) divides the kept loss sum by the number of kept tokens
//! (a mean over kept, like ESLM); `budget` divides by `K·M` (M valid tokens), Rho-1's published choice. They
//! differ only by ties and rounding (⌈K·M⌉ vs K·M, plus ties at the threshold): same direction, slightly
//! different scale.

use eslm_kernels::token_stats::TokenStats;

use super::{check_fraction, Score, SelectionPolicy, StepContext};
use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

/// How the Rho-1 kept loss is normalised.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Rho1Norm {
    /// Divide by the number of kept tokens.
    Kept,
    /// Divide by `keep · valid tokens` (Rho-1's implementation).
    Budget,
}

/// Rho-1 selection by excess loss over a reference model.
pub struct Rho1 {
    reference: Box<dyn LanguageModel>,
    keep: f64,
    norm: Rho1Norm,
    ref_stats: TokenStats,
}

impl Rho1 {
    /// Rho-1 with a frozen `reference` model keeping fraction `keep ∈ (0, 1]`.
    pub fn new(reference: Box<dyn LanguageModel>, keep: f64, norm: Rho1Norm) -> Result<Self> {
        check_fraction("--keep", keep, true)?;
        Ok(Rho1 {
            reference,
            keep,
            norm,
            ref_stats: TokenStats::default(),
        })
    }

    /// The reference model's statistics on the last prepared micro-batch.
    pub fn reference_stats(&self) -> &TokenStats {
        &self.ref_stats
    }
}

impl SelectionPolicy for Rho1 {
    fn name(&self) -> &'static str {
        "rho1"
    }
    fn alpha(&self) -> Option<f64> {
        (self.keep < 1.0).then_some(1.0 - self.keep)
    }
    fn prepare(&mut self, inputs: &[u32], targets: &[i32], b: usize, t: usize) -> Result<()> {
        let stats = self
            .reference
            .forward_inference(inputs, targets, b, t, None)?;
        self.ref_stats.clone_from(stats);
        Ok(())
    }
    fn score(&mut self, ctx: &StepContext<'_>, out: &mut Vec<f32>) -> Result<Score> {
        if self.ref_stats.loss.len() != ctx.stats.loss.len() {
            return Err(TrainError::Model(
                "rho1: reference statistics do not match the micro-batch".into(),
            ));
        }
        out.clear();
        out.extend(
            ctx.stats
                .loss
                .iter()
                .zip(&self.ref_stats.loss)
                .map(|(l, r)| l - r),
        );
        Ok(Score::Host)
    }
    fn normaliser(&self, kept: usize, valid: usize) -> f64 {
        match self.norm {
            Rho1Norm::Kept => kept as f64,
            Rho1Norm::Budget => (self.keep * valid as f64).max(1.0),
        }
    }
}
