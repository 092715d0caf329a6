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
//! is the mean of `L` over kept tokens; `dlogits` rows are `∂L/∂z · scale`. Computed here in f64 per row (one
//! pass for the maxima, one for the sums, one for the gradient); padded columns get 0.

use eslm_kernels::token_stats::{token_stats, TokenStats, DEFAULT_IGNORE_INDEX};
use eslm_kernels::LogitsView;

use super::{check_fraction, ScoreKind, SelectionPolicy, StepContext};
use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

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
    /// ESLM-KD with a frozen `teacher` (same vocabulary as the student).
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
}

/// Log-sum-exp of `x / tau` over `x`, in f64.
fn lse_scaled(x: &[f32], tau: f64) -> f64 {
    let m = x
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / tau));
    if !m.is_finite() {
        return m;
    }
    m + x
        .iter()
        .map(|&v| (v as f64 / tau - m).exp())
        .sum::<f64>()
        .ln()
}

/// The KD loss of one kept row and its gradient (see the module docs): writes `∂L/∂z · scale` into
/// `grad[..vocab]` (and zeros `grad[vocab..]`), returns `L`. `student` and `teacher` hold the `vocab` real logits.
pub fn kd_row_loss_grad(
    student: &[f32],
    teacher: &[f32],
    target: usize,
    kd_weight: f64,
    temperature: f64,
    scale: f32,
    grad: &mut [f32],
) -> f64 {
    let vocab = student.len();
    let (w, tau) = (kd_weight, temperature);
    let lse1 = lse_scaled(student, 1.0);
    let lse_s = lse_scaled(student, tau);
    let lse_t = lse_scaled(teacher, tau);
    let ce = lse1 - student[target] as f64;
    let mut kl = 0.0f64;
    for j in 0..vocab {
        let (z, u) = (student[j] as f64, teacher[j] as f64);
        let p = (z - lse1).exp();
        let log_qs = z / tau - lse_s;
        let log_qt = u / tau - lse_t;
        let (qs, qt) = (log_qs.exp(), log_qt.exp());
        if qt > 0.0 {
            kl += qt * (log_qt - log_qs);
        }
        let onehot = if j == target { 1.0 } else { 0.0 };
        let g = (1.0 - w) * (p - onehot) + w * tau * (qs - qt);
        grad[j] = (g * scale as f64) as f32;
    }
    grad[vocab..].iter_mut().for_each(|g| *g = 0.0);
    (1.0 - w) * ce + w * tau * tau * kl
}

impl SelectionPolicy for EslmKd {
    fn name(&self) -> &'static str {
        "eslm-kd"
    }
    fn alpha(&self) -> Option<f64> {
        Some(self.config.alpha)
    }
    fn prepare(&mut self, inputs: &[u32], targets: &[i32], b: usize, t: usize) -> Result<()> {
        let vocab = self.teacher.vocab_size();
        let stride = self.teacher.logits_stride();
        let logits = self.teacher.forward_inference(inputs, b, t, None)?;
        let view = LogitsView::new(logits, b * t, vocab, stride)?;
        token_stats(
            &view,
            targets,
            DEFAULT_IGNORE_INDEX,
            &mut self.teacher_stats,
        )?;
        Ok(())
    }
    fn scores(&mut self, ctx: &StepContext<'_>, out: &mut Vec<f32>) -> Result<()> {
        if self.teacher_stats.loss.len() != ctx.stats.loss.len() {
            return Err(TrainError::Model(
                "eslm-kd: teacher statistics do not match the micro-batch".into(),
            ));
        }
        out.clear();
        out.extend_from_slice(self.config.score.of(&self.teacher_stats));
        Ok(())
    }
    fn gradient(
        &mut self,
        ctx: &StepContext<'_>,
        kept: &[u32],
        scale: f32,
        dlogits: &mut [f32],
    ) -> Result<f32> {
        let vocab = ctx.logits.vocab();
        let stride = ctx.logits.stride();
        if self.teacher.vocab_size() != vocab {
            return Err(TrainError::Config(format!(
                "teacher vocabulary {} differs from the student's {vocab}",
                self.teacher.vocab_size()
            )));
        }
        let t_stride = self.teacher.logits_stride();
        let teacher = LogitsView::new(
            self.teacher.last_logits(),
            ctx.logits.rows(),
            vocab,
            t_stride,
        )?;
        if dlogits.len() < kept.len() * stride {
            return Err(TrainError::Model(
                "eslm-kd: dlogits buffer too small".into(),
            ));
        }
        let mut sum = 0.0f64;
        for (i, &r) in kept.iter().enumerate() {
            let r = r as usize;
            let y = ctx.targets.get(r).copied().unwrap_or(-1);
            if y < 0 || y as usize >= vocab {
                return Err(TrainError::Model(format!(
                    "eslm-kd: kept row {r} has no valid target"
                )));
            }
            sum += kd_row_loss_grad(
                ctx.logits.row(r),
                teacher.row(r),
                y as usize,
                self.config.kd_weight,
                self.config.temperature,
                scale,
                &mut dlogits[i * stride..(i + 1) * stride],
            );
        }
        Ok(if kept.is_empty() {
            0.0
        } else {
            (sum / kept.len() as f64) as f32
        })
    }
}
