//! `clm`: causal language modeling, the baseline. Every valid token is kept; loss = mean CE over all tokens.

use super::{SelectionPolicy, StepContext};
use crate::error::Result;

/// Keeps every valid token.
#[derive(Debug, Clone, Default)]
pub struct Clm;

impl SelectionPolicy for Clm {
    fn name(&self) -> &'static str {
        "clm"
    }
    fn alpha(&self) -> Option<f64> {
        None
    }
    fn scores(&mut self, ctx: &StepContext<'_>, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&ctx.stats.loss);
        Ok(())
    }
}
