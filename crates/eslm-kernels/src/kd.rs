//! Distillation gradient on the kept rows (ESLM-KD): cross-entropy blended with a temperature-softened KL to a
//! teacher, for a student's and a teacher's logits of the same rows.
//!
//! For a kept row with student logits `z`, teacher logits `u`, target `y`, `p = softmax(z)`,
//! `q_s = softmax(z/τ)`, `q_t = softmax(u/τ)` and weight `W ∈ [0, 1]`:
//!
//! ```text
//! L       = (1 − W)·(lse(z) − z_y) + W·τ²·KL(q_t ‖ q_s),     KL(q_t ‖ q_s) = Σ_j q_t,j·(ln q_t,j − ln q_s,j)
//! ∂L/∂z_j = (1 − W)·(p_j − [j = y]) + W·τ·(q_s,j − q_t,j)
//! ```
//!
//! (τ² keeps the distillation gradient's scale independent of τ, as in Hinton et al.). Rows of `dlogits` are
//! `∂L/∂z · scale` in the order of `kept`, padded columns zero; the return value is the mean of `L` over the kept
//! rows. Computed in f64 per row (three passes: maxima, sums, gradient), rows in parallel.

use rayon::prelude::*;

use crate::error::{KernelError, Result};
use crate::layout::{LogitElem, LogitsView};
use crate::sparse_ce::check_sparse_ce_args;

/// Weight and temperature of the distillation term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdParams {
    /// Weight `W ∈ [0, 1]` of the distillation term.
    pub kd_weight: f64,
    /// Temperature `τ > 0`.
    pub temperature: f64,
}

impl KdParams {
    /// Checks `0 ≤ W ≤ 1` and `τ > 0` (finite).
    pub fn validate(&self) -> Result<()> {
        let ok = (0.0..=1.0).contains(&self.kd_weight)
            && self.temperature.is_finite()
            && self.temperature > 0.0;
        if ok {
            Ok(())
        } else {
            Err(KernelError::Shape {
                what: "KD parameters",
                expected: "0 <= kd_weight <= 1 and temperature > 0".into(),
                got: format!("{self:?}"),
            })
        }
    }
}

/// Log-sum-exp of `x / tau` in f64.
fn lse_scaled<T: LogitElem>(x: &[T], tau: f64) -> f64 {
    let m = x
        .iter()
        .fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f32() as f64 / tau));
    if !m.is_finite() {
        return m;
    }
    m + x
        .iter()
        .map(|v| (v.to_f32() as f64 / tau - m).exp())
        .sum::<f64>()
        .ln()
}

/// The KD loss of one row and its gradient times `scale` into `grad[..V]` (zeros in `grad[V..]`).
pub fn kd_row<T: LogitElem>(
    student: &[T],
    teacher: &[T],
    target: usize,
    kd: KdParams,
    scale: f32,
    grad: &mut [f32],
) -> f64 {
    let vocab = student.len();
    let (w, tau) = (kd.kd_weight, kd.temperature);
    let lse1 = lse_scaled(student, 1.0);
    let lse_s = lse_scaled(student, tau);
    let lse_t = lse_scaled(teacher, tau);
    let ce = lse1 - student[target].to_f32() as f64;
    let mut kl = 0.0f64;
    for j in 0..vocab {
        let (z, u) = (student[j].to_f32() as f64, teacher[j].to_f32() as f64);
        let p = (z - lse1).exp();
        let log_qs = z / tau - lse_s;
        let log_qt = u / tau - lse_t;
        let (qs, qt) = (log_qs.exp(), log_qt.exp());
        if qt > 0.0 {
            kl += qt * (log_qt - log_qs);
        }
        let onehot = if j == target { 1.0 } else { 0.0 };
        grad[j] = (((1.0 - w) * (p - onehot) + w * tau * (qs - qt)) * scale as f64) as f32;
    }
    grad[vocab..].iter_mut().for_each(|g| *g = 0.0);
    (1.0 - w) * ce + w * tau * tau * kl
}

/// The KD gradient of the `kept` rows of `student` against the same rows of `teacher` (same shape), written
/// compact into `dlogits [K, out_stride]`; returns the mean loss over kept rows (0 for K = 0).
///
/// # Errors
/// The sparse CE argument checks (targets, kept rows, output size; a kept row must have a valid target), a
/// teacher of another shape, or invalid [`KdParams`].
#[allow(clippy::too_many_arguments)] // sparse_ce's arguments plus the teacher, in the same order
pub fn kd_grad<T: LogitElem>(
    student: &LogitsView<T>,
    teacher: &LogitsView<T>,
    targets: &[i32],
    kept: &[u32],
    kd: KdParams,
    scale: f32,
    dlogits: &mut [f32],
    out_stride: usize,
) -> Result<f32> {
    kd.validate()?;
    let (n, vocab) = (student.rows(), student.vocab());
    if teacher.rows() != n || teacher.vocab() != vocab {
        return Err(KernelError::Shape {
            what: "teacher logits",
            expected: format!("[{n}, {vocab}] like the student's"),
            got: format!("[{}, {}]", teacher.rows(), teacher.vocab()),
        });
    }
    // The sparse CE checks (targets, kept rows and their targets, output size); KD has no lse argument, so the
    // shared check gets a placeholder of the right length.
    let no_lse = vec![0.0f32; n];
    let needed = check_sparse_ce_args(n, vocab, targets, &no_lse, kept, out_stride, dlogits.len())?;
    if kept.is_empty() {
        return Ok(0.0);
    }
    let sum: f64 = dlogits[..needed]
        .par_chunks_mut(out_stride)
        .zip(kept.par_iter())
        .map(|(out, &row)| {
            let r = row as usize;
            kd_row(
                student.row(r),
                teacher.row(r),
                targets[r] as usize,
                kd,
                scale,
                out,
            )
        })
        .sum();
    Ok((sum / kept.len() as f64) as f32)
}
