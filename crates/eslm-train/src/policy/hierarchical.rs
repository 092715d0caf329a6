//! `hierarchical --exit-layer E --instance-alpha A_i --alpha A`: two-level ESLM.
//!
//! 1. Instance level: a no-grad shallow pass of the model being trained (first `E` blocks, then the final layer
//!    norm and the LM head) gives token scores `s_{b,t}`; each sequence's score is the mean over its valid
//!    tokens `S_b = mean_t s_{b,t}`. Sequences with `S_b` under the VaR threshold at `A_i` over the B sequences
//!    (keep ⌈(1 − A_i)·B⌉, ties kept) are dropped: they cost only the shallow pass. The threshold is the exact
//!    VaR over the sequences of every data-parallel rank (`eslm_kernels::global_select`, histograms summed
//!    through the collective).
//! 2. Token level: plain ESLM at α = `A` on the kept sequences (full forward, selective backward).
//!
//! Kept fraction of tokens ≈ (1 − A_i)·(1 − A).

use eslm_collective::Collective;
use eslm_kernels::global_select::{global_threshold, ScorePart};
use eslm_kernels::KernelError;

use super::{check_fraction, Score, ScoreKind, SelectionPolicy, StepContext};
use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

/// Hierarchical (instance, then token) ESLM.
#[derive(Debug, Clone)]
pub struct Hierarchical {
    score: ScoreKind,
    exit_layer: usize,
    instance_alpha: f64,
    alpha: f64,
    last_threshold: f32,
}

impl Hierarchical {
    /// Instance selection at exit layer `exit_layer ≥ 1` dropping `instance_alpha` of the sequences, then token
    /// ESLM dropping `alpha` of the tokens, both ranked by `score`.
    pub fn new(
        score: ScoreKind,
        exit_layer: usize,
        instance_alpha: f64,
        alpha: f64,
    ) -> Result<Self> {
        check_fraction("--instance-alpha", instance_alpha, false)?;
        check_fraction("--alpha", alpha, false)?;
        if exit_layer == 0 {
            return Err(TrainError::Config("--exit-layer must be at least 1".into()));
        }
        Ok(Hierarchical {
            score,
            exit_layer,
            instance_alpha,
            alpha,
            last_threshold: f32::NAN,
        })
    }

    /// The instance-level VaR threshold of the last filtered micro-batch.
    pub fn last_instance_threshold(&self) -> f32 {
        self.last_threshold
    }
}

/// Mean of `scores` over the valid tokens of each of the `b` sequences of length `t` (`None` when a sequence has
/// no valid token).
pub fn sequence_means(scores: &[f32], valid: &[bool], b: usize, t: usize) -> Vec<Option<f32>> {
    (0..b)
        .map(|s| {
            let (mut sum, mut n) = (0.0f64, 0usize);
            for i in s * t..(s + 1) * t {
                if valid[i] {
                    sum += scores[i] as f64;
                    n += 1;
                }
            }
            (n > 0).then(|| (sum / n as f64) as f32)
        })
        .collect()
}

impl SelectionPolicy for Hierarchical {
    fn name(&self) -> &'static str {
        "hierarchical"
    }
    fn alpha(&self) -> Option<f64> {
        Some(self.alpha)
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
        if self.exit_layer > model.num_layers() {
            return Err(TrainError::Config(format!(
                "--exit-layer {} exceeds the model's {} layers",
                self.exit_layer,
                model.num_layers()
            )));
        }
        let shallow = model.forward_prefix(inputs, targets, b, t, self.exit_layer)?;
        let means = sequence_means(self.score.of(shallow), &shallow.valid, b, t);
        let valid: Vec<bool> = means.iter().map(Option::is_some).collect();
        let scores: Vec<f32> = means.iter().map(|m| m.unwrap_or(0.0)).collect();
        let part = [ScorePart {
            scores: &scores,
            valid: Some(&valid),
        }];
        let mut reduce =
            |h: &mut [u32]| collective.all_reduce_sum_u32(h).map_err(|e| e.to_string());
        let threshold = match global_threshold(&part, self.instance_alpha, &mut reduce) {
            Ok(g) => g.threshold,
            Err(KernelError::NoValidRows) => return Ok(Some(Vec::new())),
            Err(e) => return Err(e.into()),
        };
        self.last_threshold = threshold;
        Ok(Some(
            (0..b)
                .filter(|&s| valid[s] && scores[s] >= threshold)
                .collect(),
        ))
    }
    fn score(&mut self, _ctx: &StepContext<'_>, _host: &mut Vec<f32>) -> Result<Score> {
        Ok(self.score.score())
    }
}
