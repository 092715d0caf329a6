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
//! rows. Three passes per row (maxima; the three sums of exponentials; gradient and KL), rows in parallel: f32
//! arithmetic with the vectorisable [`fast_exp`] in 16 independent lanes and f64 sums (f32 partial sums of 256
//! columns); [`kd_row_reference`] is the same in f64 with libm's `exp` (≈ 10× slower: the tests'
//! reference, and the path for rows whose maximum is not finite). The two agree to ≈ 1e-6 relative, except that a
//! student logit below ≈ −1.7e38·τ (a mask) overflows to −inf in f32: where the teacher gives that column mass,
//! the KL is then +inf instead of the reference's huge finite value.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::cpu_features::has_avx2;
use crate::error::{KernelError, Result};
use crate::fast_exp::fast_exp;
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
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: `has_avx2()` confirmed AVX2 and FMA on this CPU.
        return unsafe { kd_row_avx2(student, teacher, target, kd, scale, grad) };
    }
    kd_row_lanes(student, teacher, target, kd, scale, grad)
}

/// [`kd_row_lanes`] compiled for AVX2 + FMA (8-wide lanes; see `cpu_features`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kd_row_avx2<T: LogitElem>(
    student: &[T],
    teacher: &[T],
    target: usize,
    kd: KdParams,
    scale: f32,
    grad: &mut [f32],
) -> f64 {
    kd_row_lanes(student, teacher, target, kd, scale, grad)
}

/// [`kd_row`]'s portable body (inlined into each instruction-set wrapper).
#[inline(always)]
fn kd_row_lanes<T: LogitElem>(
    student: &[T],
    teacher: &[T],
    target: usize,
    kd: KdParams,
    scale: f32,
    grad: &mut [f32],
) -> f64 {
    let vocab = student.len();
    let (z_max, u_max) = (lane_max(student), lane_max(teacher));
    if !(z_max.is_finite() && u_max.is_finite()) {
        return kd_row_reference(student, teacher, target, kd, scale, grad);
    }
    let (w, tau) = (kd.kd_weight, kd.temperature);
    let inv_tau = (1.0 / tau) as f32;
    // The three sums of exponentials, shifted by the maxima (z/τ's maximum is z_max/τ: τ > 0).
    let sums = lane_sums(student, teacher, |z, u| {
        let (dz, du) = (z - z_max, u - u_max);
        [fast_exp(dz), fast_exp(dz * inv_tau), fast_exp(du * inv_tau)]
    });
    // Log-normalisers relative to the maxima: log p_j = (z_j − z_max) − l1, log q_s,j = (z_j − z_max)/τ − ls, ...
    let (l1, ls, lt) = (
        sums[0].ln() as f32,
        sums[1].ln() as f32,
        sums[2].ln() as f32,
    );
    let ce = (z_max as f64 + sums[0].ln()) - student[target].to_f32() as f64;
    let (gw_ce, gw_kd) = (
        ((1.0 - w) * scale as f64) as f32,
        (w * tau * scale as f64) as f32,
    );
    let term = |z: f32, u: f32| {
        let dz = z - z_max;
        let log_qs = dz * inv_tau - ls;
        let log_qt = (u - u_max) * inv_tau - lt;
        let (p, qs, qt) = (fast_exp(dz - l1), fast_exp(log_qs), fast_exp(log_qt));
        let kl = if qt > 0.0 {
            qt * (log_qt - log_qs)
        } else {
            0.0
        };
        (gw_ce * p + gw_kd * (qs - qt), kl)
    };
    let mut kl = 0.0f64;
    let grad_v = &mut grad[..vocab];
    for ((zc, uc), gc) in student
        .chunks(LANES * 16)
        .zip(teacher.chunks(LANES * 16))
        .zip(grad_v.chunks_mut(LANES * 16))
    {
        let mut part = [0.0f32; LANES];
        let n = zc.len() / LANES * LANES;
        for ((zl, ul), gl) in zc[..n]
            .chunks_exact(LANES)
            .zip(uc[..n].chunks_exact(LANES))
            .zip(gc[..n].chunks_exact_mut(LANES))
        {
            for l in 0..LANES {
                let (g, k) = term(zl[l].to_f32(), ul[l].to_f32());
                gl[l] = g;
                part[l] += k;
            }
        }
        for j in n..zc.len() {
            let (g, k) = term(zc[j].to_f32(), uc[j].to_f32());
            gc[j] = g;
            part[0] += k;
        }
        kl += part.iter().map(|&x| x as f64).sum::<f64>();
    }
    grad[target] -= gw_ce;
    grad[vocab..].iter_mut().for_each(|g| *g = 0.0);
    (1.0 - w) * ce + w * tau * tau * kl
}

/// Independent accumulators per loop step in [`kd_row`]: floating-point sums are only vectorised when each lane
/// keeps its own (the order of additions is fixed, so results do not depend on the machine's vector width).
const LANES: usize = 16;

/// The largest element of `x` as f32 (`-inf` for an empty row, NaN ignored like `f32::max`).
#[inline(always)]
fn lane_max<T: LogitElem>(x: &[T]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let n = x.len() / LANES * LANES;
    for c in x[..n].chunks_exact(LANES) {
        for l in 0..LANES {
            m[l] = m[l].max(c[l].to_f32());
        }
    }
    x[n..].iter().fold(
        m.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |a, v| a.max(v.to_f32()),
    )
}

/// The three sums of `f(z_j, u_j)` over a row, in f32 lanes over blocks of `LANES · 16` columns added in f64.
#[inline(always)]
fn lane_sums<T: LogitElem>(z: &[T], u: &[T], f: impl Fn(f32, f32) -> [f32; 3]) -> [f64; 3] {
    let mut total = [0.0f64; 3];
    for (zc, uc) in z.chunks(LANES * 16).zip(u.chunks(LANES * 16)) {
        let mut part = [[0.0f32; LANES]; 3];
        let n = zc.len() / LANES * LANES;
        for (zl, ul) in zc[..n].chunks_exact(LANES).zip(uc[..n].chunks_exact(LANES)) {
            for l in 0..LANES {
                let v = f(zl[l].to_f32(), ul[l].to_f32());
                for k in 0..3 {
                    part[k][l] += v[k];
                }
            }
        }
        for j in n..zc.len() {
            let v = f(zc[j].to_f32(), uc[j].to_f32());
            for k in 0..3 {
                part[k][0] += v[k];
            }
        }
        for k in 0..3 {
            total[k] += part[k].iter().map(|&x| x as f64).sum::<f64>();
        }
    }
    total
}

/// [`kd_row`] in f64 with libm's `exp` throughout: the reference the fast row function is tested against, and
/// its path for rows whose largest student or teacher logit is not finite.
pub fn kd_row_reference<T: LogitElem>(
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
