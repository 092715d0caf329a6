//! `clm`: causal language modeling, the baseline. Every valid token is kept; loss = mean CE over all tokens.

use super::{Score, SelectionPolicy, StepContext};
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
    fn score(&mut self, _ctx: &StepContext<'_>, _host: &mut Vec<f32>) -> Result<Score> {
        Ok(Score::Loss) // every valid row is kept (alpha = None): the score is only logged
    }
}
