//! Sparse-gradient cross-entropy: the loss gradient for the kept rows only, in a compact buffer.
//!
//! For kept row `r = kept[i]` with logits `z`, target `y` and `lse_r` from [`crate::token_stats()`]:
//!
//! ```text
//! dlogits[i, j] = (softmax(z)_j − [j = y]) · scale = (e^{z_j − lse_r} − [j = y]) · scale     (j < V)
//! dlogits[i, j] = 0                                                                         (V ≤ j < out_stride)
//! mean loss     = (1/K) Σ_i (lse_{kept[i]} − z_{y, kept[i]})        (accumulated in f64, in kept order)
//! ```
//!
//! Row `i` of the output is written at `dlogits[i·out_stride ..]`, so the LM-head backward can run on the K gathered
//! rows. Rows not in `kept` are never read or written; `kept` may be in any order and may repeat a row (each entry
//! gets its own output row). One `exp` per kept logit ([`crate::fast_exp`]); `-inf` logits get a gradient of exactly
//! 0 (their probability), NaN logits or a NaN `lse` give NaN gradients. Output rows are computed in parallel
//! (rayon), each row's loop vectorised.
//!
//! `K = 0` is allowed: nothing is written and the mean loss is reported as 0.

use rayon::prelude::*;

use crate::cpu_features::has_avx2;
use crate::error::{check_len, KernelError, Result};
use crate::fast_exp::fast_exp;
use crate::layout::{LogitElem, LogitsView};

/// Minimum number of logits handled by one rayon task.
const TASK_ELEMS: usize = 1 << 15;

/// Writes `(softmax(z) − onehot(y))·scale` for every kept row into `dlogits` (row `i` at `i·out_stride`, padded
/// columns zeroed) and returns the mean loss over the kept rows. See the module docs.
///
/// `lse` is the per-row log-sum-exp (`[N]`, e.g. [`TokenStats::lse`](crate::token_stats::TokenStats)); `dlogits`
/// must hold at least `kept.len()·out_stride` elements (only that prefix is written).
///
/// # Errors
/// [`KernelError::Shape`] if `targets` or `lse` is not `[N]`, `out_stride < V`, or `dlogits` is too short;
/// [`KernelError::KeptRowOutOfRange`] for a kept index `≥ N`; [`KernelError::KeptTargetOutOfRange`] if a kept row's
/// target is not in `[0, V)` (e.g. an ignored row). Nothing is written on error.
///
/// ```
/// use eslm_kernels::{sparse_ce::sparse_ce, LogitsView};
/// let logits = [0.0f32, 0.0, /* row 1 */ 1.0, -1.0];
/// let view = LogitsView::new(&logits, 2, 2, 2)?;
/// let lse = [2f32.ln(), (1f32.exp() + (-1f32).exp()).ln()];
/// let mut dlogits = [9.0f32; 3]; // one kept row in a stride of 3
/// let loss = sparse_ce(&view, &[1, 0], &lse, &[0], 1.0, &mut dlogits, 3)?;
/// assert!((loss - 2f32.ln()).abs() < 1e-6);
/// assert!((dlogits[0] - 0.5).abs() < 1e-6 && (dlogits[1] + 0.5).abs() < 1e-6 && dlogits[2] == 0.0);
/// # Ok::<(), eslm_kernels::KernelError>(())
/// ```
pub fn sparse_ce<T: LogitElem>(
    logits: &LogitsView<T>,
    targets: &[i32],
    lse: &[f32],
    kept: &[u32],
    scale: f32,
    dlogits: &mut [f32],
    out_stride: usize,
) -> Result<f32> {
    let n = logits.rows();
    let vocab = logits.vocab();
    let needed = check_sparse_ce_args(n, vocab, targets, lse, kept, out_stride, dlogits.len())?;
    let k = kept.len();
    let loss_sum: f64 = kept
        .iter()
        .map(|&row| {
            let r = row as usize;
            lse[r] as f64 - logits.row(r)[targets[r] as usize].to_f32() as f64
        })
        .sum();
    if k == 0 {
        return Ok(0.0);
    }
    let avx2 = has_avx2();
    let rows_per_task = (TASK_ELEMS / vocab).max(1);
    dlogits[..needed]
        .par_chunks_mut(out_stride)
        .zip(kept.par_iter())
        .with_min_len(rows_per_task)
        .for_each(|(out, &row)| {
            let r = row as usize;
            let grad_row = GradRow {
                logits: logits.row(r),
                lse: lse[r],
                scale,
                target: targets[r] as usize,
            };
            grad_row.write(out, avx2);
        });
    Ok((loss_sum / k as f64) as f32)
}

/// The argument checks shared by the CPU and CUDA sparse CE: `targets` and `lse` have one entry per row,
/// `out_stride ≥ vocab`, `dlogits` holds `K·out_stride` elements, and every kept row is in range with a target in
/// `[0, vocab)`. Returns `K·out_stride`, the number of gradient elements written.
pub(crate) fn check_sparse_ce_args(
    n: usize,
    vocab: usize,
    targets: &[i32],
    lse: &[f32],
    kept: &[u32],
    out_stride: usize,
    dlogits_len: usize,
) -> Result<usize> {
    check_len("targets", targets.len(), n)?;
    check_len("lse", lse.len(), n)?;
    if out_stride < vocab {
        return Err(KernelError::Shape {
            what: "out_stride",
            expected: format!("at least vocab = {vocab}"),
            got: format!("{out_stride}"),
        });
    }
    let k = kept.len();
    let needed = k
        .checked_mul(out_stride)
        .ok_or_else(|| KernelError::Shape {
            what: "dlogits",
            expected: "a size that fits in memory".into(),
            got: format!("{k} rows of stride {out_stride}"),
        })?;
    if dlogits_len < needed {
        return Err(KernelError::Shape {
            what: "dlogits",
            expected: format!("at least {needed} elements ({k} kept rows, stride {out_stride})"),
            got: format!("{dlogits_len} elements"),
        });
    }
    for (position, &row) in kept.iter().enumerate() {
        let r = row as usize;
        if r >= n {
            return Err(KernelError::KeptRowOutOfRange {
                position,
                row,
                rows: n,
            });
        }
        let target = targets[r];
        if target < 0 || target as usize >= vocab {
            return Err(KernelError::KeptTargetOutOfRange {
                row: r,
                target: target as i64,
                vocab,
            });
        }
    }
    Ok(needed)
}

/// One kept row's inputs.
struct GradRow<'a, T> {
    logits: &'a [T],
    lse: f32,
    scale: f32,
    target: usize,
}

impl<T: LogitElem> GradRow<'_, T> {
    #[inline]
    fn write(&self, out: &mut [f32], avx2: bool) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `avx2` is only true when `has_avx2()` confirmed AVX2 and FMA on this CPU.
            unsafe { self.write_avx2(out) };
            return;
        }
        let _ = avx2;
        self.write_portable(out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn write_avx2(&self, out: &mut [f32]) {
        self.write_portable(out);
    }

    #[inline(always)]
    fn write_portable(&self, out: &mut [f32]) {
        let (dst, padding) = out.split_at_mut(self.logits.len());
        let (lse, scale) = (self.lse, self.scale);
        for (d, z) in dst.iter_mut().zip(self.logits) {
            *d = fast_exp(z.to_f32() - lse) * scale;
        }
        dst[self.target] = (fast_exp(self.logits[self.target].to_f32() - lse) - 1.0) * scale;
        padding.fill(0.0);
    }
}
