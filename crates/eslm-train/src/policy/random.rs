//! `random --keep K`: the control. Each row gets an independent uniform score from a seeded ChaCha8 stream; the
//! top `K` fraction is kept (VaR at α = 1 − K), i.e. a uniformly random subset of ⌈K·M⌉ tokens. Loss = mean CE
//! over the kept rows. The RNG state is checkpointed, so a resumed run draws the same subsets.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{check_fraction, Score, SelectionPolicy, StepContext};
use crate::error::Result;

/// Keeps a seeded uniformly random fraction of the tokens.
#[derive(Debug, Clone)]
pub struct RandomKeep {
    keep: f64,
    rng: ChaCha8Rng,
}

impl RandomKeep {
    /// Keeps fraction `keep ∈ (0, 1]` of the valid tokens, drawn from a ChaCha8 stream seeded with `seed`.
    pub fn new(keep: f64, seed: u64) -> Result<Self> {
        check_fraction("--keep", keep, true)?;
        Ok(RandomKeep {
            keep,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x005E_ED0F_4A4D),
        })
    }
}

impl SelectionPolicy for RandomKeep {
    fn name(&self) -> &'static str {
        "random"
    }
    fn alpha(&self) -> Option<f64> {
        (self.keep < 1.0).then_some(1.0 - self.keep)
    }
    fn score(&mut self, ctx: &StepContext<'_>, host: &mut Vec<f32>) -> Result<Score> {
        host.clear();
        host.extend((0..ctx.stats.loss.len()).map(|_| self.rng.gen::<f32>()));
        Ok(Score::Host)
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.rng).unwrap_or(serde_json::Value::Null)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.rng = serde_json::from_value(state.clone())?;
        Ok(())
    }
}
