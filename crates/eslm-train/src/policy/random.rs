//! `random --keep K`: the control. Each row gets an independent uniform score from a seeded ChaCha8 stream; the
//! top `K` fraction is kept (VaR at α = 1 − K), i.e. a uniformly random subset of ⌈K·M⌉ tokens. Loss = mean CE
//! over the kept rows. The RNG state is checkpointed, so a resumed run draws the same subsets.
//!
//! With `--lazy-head` the keys are drawn before the forward (they do not depend on the model), so the engine
//! computes the LM head — logits, statistics, gradient — for the kept rows only (`Gpt2::forward_stats_rows`):
//! the same rows and gradient, without `2·C·V` forward FLOPs per dropped token. The logged training loss is
//! then the mean over the kept rows, an unbiased estimate of the mean over all rows.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use eslm_kernels::select::{select, SelectRule, Selection};

use super::{check_fraction, Score, SelectionPolicy, StepContext};
use crate::error::Result;

/// Keeps a seeded uniformly random fraction of the tokens.
#[derive(Debug, Clone)]
pub struct RandomKeep {
    keep: f64,
    rng: ChaCha8Rng,
    lazy_head: bool,
}

impl RandomKeep {
    /// Keeps fraction `keep ∈ (0, 1]` of the valid tokens, drawn from a ChaCha8 stream seeded with `seed`.
    pub fn new(keep: f64, seed: u64) -> Result<Self> {
        check_fraction("--keep", keep, true)?;
        Ok(RandomKeep {
            keep,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x005E_ED0F_4A4D),
            lazy_head: false,
        })
    }

    /// With `lazy`, the rows are drawn before the forward ([`SelectionPolicy::rows_before_forward`]) so the
    /// engine computes the LM head for the kept rows only. The draws, and so the rows, are the same either way.
    pub fn with_lazy_head(mut self, lazy: bool) -> Self {
        self.lazy_head = lazy;
        self
    }

    /// One uniform key per row.
    fn draw(&mut self, n: usize, out: &mut Vec<f32>) {
        out.clear();
        out.extend((0..n).map(|_| self.rng.gen::<f32>()));
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
        self.draw(ctx.stats.loss.len(), host);
        Ok(Score::Host)
    }
    fn rows_before_forward(&mut self, targets: &[i32]) -> Result<Option<Vec<u32>>> {
        if !self.lazy_head {
            return Ok(None);
        }
        let valid: Vec<bool> = targets.iter().map(|&y| y >= 0).collect();
        if !valid.iter().any(|&v| v) {
            return Ok(Some(Vec::new()));
        }
        let mut keys = Vec::new();
        self.draw(targets.len(), &mut keys);
        Ok(Some(match self.alpha() {
            None => (0..targets.len() as u32)
                .filter(|&i| valid[i as usize])
                .collect(),
            Some(alpha) => {
                let mut sel = Selection::default();
                select(&keys, Some(&valid), SelectRule::Var { alpha }, &mut sel)?;
                sel.indices
            }
        }))
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.rng).unwrap_or(serde_json::Value::Null)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.rng = serde_json::from_value(state.clone())?;
        Ok(())
    }
}
