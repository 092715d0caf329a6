//! `eslm-kd --teacher CKPT --alpha A --kd-weight W --temperature τ`: ESLM selection by a frozen teacher's token
//! score, with a distillation term on the kept tokens.
//!
//! Selection: score = the teacher's token loss (or entropy, `--score`) on the same tokens; keep score ≥ VaR_A.
//! Loss on a kept token with student logits `z`, teacher logits `u`, target `y`, `p = softmax(z)`,
//! `q_s = softmax(z/τ)`, `q_t = softmax(u/τ)`:
//!
//! ```text
//! L    = (1 − W)·(lse(z) − z_y) + W·τ²·KL(q_t ‖ q_s),     KL(q_t ‖ q_s) = Σ_j q_t,j·(ln q_t,j − ln q_s,j)
//! ∂L/∂z_j = (1 − W)·(p_j − [j = y]) + W·τ·(q_s,j − q_t,j)
//! ```
//!
//! (the τ² factor keeps the distillation gradient's scale independent of τ, as in Hinton et al.). The step loss
//! is the mean of `L` over kept tokens. The gradient is computed by the engine (`eslm_kernels::kd`) with both
//! models' logits on its side; this policy only chooses the rows (teacher statistics) and names the teacher.

use eslm_kernels::kd::KdParams;
use eslm_kernels::token_stats::TokenStats;

use super::{check_fraction, Score, ScoreKind, SelectionPolicy, StepContext};
use crate::error::{Result, TrainError};
use crate::model::{LanguageModel, LossSpec};

/// Hyper-parameters of ESLM-KD.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KdConfig {
    /// Which teacher statistic ranks the tokens.
    pub score: ScoreKind,
    /// Fraction of tokens dropped.
    pub alpha: f64,
    /// Weight `W ∈ [0, 1]` of the distillation term.
    pub kd_weight: f64,
    /// Temperature `τ > 0`.
    pub temperature: f64,
}

/// ESLM with teacher-score selection and knowledge distillation on the kept tokens.
pub struct EslmKd {
    teacher: Box<dyn LanguageModel>,
    config: KdConfig,
    teacher_stats: TokenStats,
}

impl EslmKd {
    /// ESLM-KD with a frozen `teacher` (same vocabulary and engine as the student).
    pub fn new(teacher: Box<dyn LanguageModel>, config: KdConfig) -> Result<Self> {
        check_fraction("--alpha", config.alpha, false)?;
        if !(0.0..=1.0).contains(&config.kd_weight) {
            return Err(TrainError::Config(format!(
                "--kd-weight must be in [0, 1], got {}",
                config.kd_weight
            )));
        }
        if !(config.temperature.is_finite() && config.temperature > 0.0) {
            return Err(TrainError::Config(format!(
                "--temperature must be > 0, got {}",
                config.temperature
            )));
        }
        Ok(EslmKd {
            teacher,
            config,
            teacher_stats: TokenStats::default(),
        })
    }

    /// The teacher's statistics of the last prepared micro-batch.
    pub fn teacher_stats(&self) -> &TokenStats {
        &self.teacher_stats
    }
}

impl SelectionPolicy for EslmKd {
    fn name(&self) -> &'static str {
        "eslm-kd"
    }
    fn alpha(&self) -> Option<f64> {
        Some(self.config.alpha)
    }
    fn prepare(&mut self, inputs: &[u32], targets: &[i32], b: usize, t: usize) -> Result<()> {
        let stats = self
            .teacher
            .forward_inference(inputs, targets, b, t, None)?;
        self.teacher_stats.clone_from(stats);
        Ok(())
    }
    fn score(&mut self, ctx: &StepContext<'_>, host: &mut Vec<f32>) -> Result<Score> {
        if self.teacher_stats.loss.len() != ctx.stats.loss.len() {
            return Err(TrainError::Model(
                "eslm-kd: teacher statistics do not match the micro-batch".into(),
            ));
        }
        host.clear();
        host.extend_from_slice(self.config.score.of(&self.teacher_stats));
        Ok(Score::Host)
    }
    fn loss(&self) -> LossSpec<'_> {
        LossSpec::Distill {
            teacher: self.teacher.as_ref(),
            params: KdParams {
                kd_weight: self.config.kd_weight,
                temperature: self.config.temperature,
            },
        }
    }
}
