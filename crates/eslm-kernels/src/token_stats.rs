//! Token statistics: per-row log-sum-exp, cross-entropy loss and predictive entropy, in one pass over the logits.
//!
//! For a row of logits `z` (length V) with target `y`:
//!
//! ```text
//! lse     = ln Σ_j e^{z_j}
//! loss    = lse − z_y                      (cross-entropy, −ln softmax(z)_y)
//! entropy = lse − Σ_j softmax(z)_j · z_j    (= −Σ p ln p)
//! ```
//!
//! **One pass, one `exp` per logit.** The row is processed in chunks of [`CHUNK`] logits (kept in L1). For each
//! chunk we first take its maximum `m_c` (vectorised, no `exp`), raise the running maximum `m ← max(m, m_c)` and
//! rescale the running sums once, then add every logit of the chunk with a single `exp`:
//!
//! ```text
//! s = Σ e^{z−m}          t = Σ e^{z−m}·(z−m)           (t relative to m, so large logits do not cancel)
//! on m → m':   s ← s·e^{m−m'},   t ← e^{m−m'}·(t + (m−m')·s)
//! lse = m + ln s          entropy = ln s − t/s
//! ```
//!
//! Inside a chunk the sums use 16 f32 lane accumulators (so LLVM vectorises the loop); the per-chunk lane sums are
//! added into f64 running sums, so accuracy does not degrade with V. The `exp` is [`crate::fast_exp`].
//!
//! **Special values** (policy):
//! - `-inf` logits (a masked vocabulary entry) contribute exactly 0 probability and 0 to the entropy.
//! - A row containing NaN gives NaN for `lse`, `loss` and `entropy`.
//! - Otherwise a row containing `+inf` gives `lse = +inf`, `loss = +inf` (or NaN when `z_y` is itself `+inf`:
//!   `+inf − +inf`), `entropy = NaN`. These are what the formulas give in IEEE arithmetic; selecting on such an
//!   entropy reports [`crate::KernelError::NanScore`], which flags the diverged model.
//! - A row whose logits are all `-inf` gives `lse = -inf`, `loss = NaN`, `entropy = NaN`.
//! - Very large finite logits (±3e38) are fine: differences that overflow to `-inf` just contribute 0; a loss larger
//!   than `f32::MAX` is stored as `+inf`.
//!
//! **Ignored rows** (`target == ignore_index`): `valid = false`, all three outputs NaN, the row is not read.
//! Targets outside `[0, V)` that are not the ignore value are an error.
//!
//! Rows are processed in parallel (rayon, several rows per task when V is small).

use rayon::prelude::*;

use crate::cpu_features::has_avx2;
use crate::error::{check_len, KernelError, Result};
use crate::fast_exp::{exp_core, EXP_LO};
use crate::layout::{LogitElem, LogitsView};

/// The conventional ignore value for targets (PyTorch's `ignore_index`).
pub const DEFAULT_IGNORE_INDEX: i32 = -100;

/// Logits per chunk: the chunk maximum is taken before the chunk's `exp`s (a multiple of `LANES`).
pub const CHUNK: usize = 1024;
/// Number of independent f32 accumulators in the inner loops (two AVX2 or four SSE registers).
const LANES: usize = 16;
/// Minimum number of logits handled by one rayon task.
const TASK_ELEMS: usize = 1 << 15;

/// Per-row outputs of [`token_stats`]; buffers are reused across calls (resized, not reallocated when big enough).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStats {
    /// `[N]` log-sum-exp of each row (NaN for ignored rows).
    pub lse: Vec<f32>,
    /// `[N]` cross-entropy `lse − z_y` (NaN for ignored rows).
    pub loss: Vec<f32>,
    /// `[N]` predictive entropy `lse − Σ softmax(z)·z` (NaN for ignored rows).
    pub entropy: Vec<f32>,
    /// `[N]` whether the row's target is not the ignore value.
    pub valid: Vec<bool>,
}

impl TokenStats {
    /// Empty outputs (no allocation until the first call).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of rows of the last call.
    pub fn rows(&self) -> usize {
        self.lse.len()
    }

    /// Number of valid (not ignored) rows of the last call.
    pub fn num_valid(&self) -> usize {
        self.valid.iter().filter(|&&v| v).count()
    }

    fn resize(&mut self, n: usize) {
        for buf in [&mut self.lse, &mut self.loss, &mut self.entropy] {
            buf.clear();
            buf.resize(n, f32::NAN);
        }
        self.valid.clear();
        self.valid.resize(n, false);
    }
}

/// Computes `lse`, `loss` and `entropy` for every row of `logits` (see the module docs for the math and the
/// special-value policy).
///
/// `targets` has one id per row; rows whose target equals `ignore_index` are skipped (`valid = false`, NaN outputs).
///
/// # Errors
/// [`KernelError::Shape`] if `targets.len() != logits.rows()`; [`KernelError::TargetOutOfRange`] for the first
/// row whose target is neither `ignore_index` nor in `[0, V)`. On error `out` is left unchanged.
///
/// ```
/// use eslm_kernels::{token_stats::{token_stats, TokenStats, DEFAULT_IGNORE_INDEX}, LogitsView};
/// let logits = [0.0f32, 0.0, 1.0, 2.0, /* row 1 */ 5.0, 5.0, 5.0, 5.0];
/// let view = LogitsView::new(&logits, 2, 4, 4)?;
/// let mut stats = TokenStats::new();
/// token_stats(&view, &[3, DEFAULT_IGNORE_INDEX], DEFAULT_IGNORE_INDEX, &mut stats)?;
/// let lse = (1.0f64 + 1.0 + 1f64.exp() + 2f64.exp()).ln();
/// assert!((stats.loss[0] as f64 - (lse - 2.0)).abs() < 1e-5);
/// assert!(!stats.valid[1] && stats.loss[1].is_nan());
/// # Ok::<(), eslm_kernels::KernelError>(())
/// ```
pub fn token_stats<T: LogitElem>(
    logits: &LogitsView<T>,
    targets: &[i32],
    ignore_index: i32,
    out: &mut TokenStats,
) -> Result<()> {
    let n = logits.rows();
    let vocab = logits.vocab();
    check_len("targets", targets.len(), n)?;
    for (row, &target) in targets.iter().enumerate() {
        if target != ignore_index && (target < 0 || target as usize >= vocab) {
            return Err(KernelError::TargetOutOfRange {
                row,
                target: target as i64,
                vocab,
            });
        }
    }
    out.resize(n);
    let rows_per_task = (TASK_ELEMS / vocab).max(1);
    let avx2 = has_avx2();
    out.lse
        .par_chunks_mut(rows_per_task)
        .zip(out.loss.par_chunks_mut(rows_per_task))
        .zip(out.entropy.par_chunks_mut(rows_per_task))
        .zip(out.valid.par_chunks_mut(rows_per_task))
        .enumerate()
        .for_each(|(task, (((lse, loss), entropy), valid))| {
            for j in 0..lse.len() {
                let i = task * rows_per_task + j;
                let target = targets[i];
                if target == ignore_index {
                    continue; // outputs stay NaN / false from resize
                }
                let row = logits.row(i);
                let stats = row_stats(row, target as usize, avx2);
                lse[j] = stats.lse;
                loss[j] = stats.loss;
                entropy[j] = stats.entropy;
                valid[j] = true;
            }
        });
    Ok(())
}

/// The three statistics of one row.
#[derive(Debug, Clone, Copy)]
struct RowStats {
    lse: f32,
    loss: f32,
    entropy: f32,
}

/// Statistics of one row with target `target` (already checked to be in range).
#[inline]
fn row_stats<T: LogitElem>(row: &[T], target: usize, avx2: bool) -> RowStats {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is only true when `has_avx2()` confirmed AVX2 and FMA on this CPU.
        return unsafe { row_stats_avx2(row, target) };
    }
    let _ = avx2;
    row_stats_portable(row, target)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stats_avx2<T: LogitElem>(row: &[T], target: usize) -> RowStats {
    row_stats_portable(row, target)
}

/// The accumulated sums of a row, or why they are not usable.
enum RowSums {
    /// Finite maximum `m`, `s = Σ e^{z−m}`, `t = Σ e^{z−m}·(z−m)`; NaN logits make `s`, `t` NaN.
    Finite { m: f32, s: f64, t: f64 },
    /// The row holds a `+inf` (and possibly NaN): resolved by [`special_row`].
    PosInf,
    /// No finite logit: every logit is `-inf` or NaN; `nan` says whether any is NaN.
    NoFinite { nan: bool },
}

#[inline(always)]
fn row_stats_portable<T: LogitElem>(row: &[T], target: usize) -> RowStats {
    let z_y = row[target].to_f32();
    match row_sums(row) {
        RowSums::Finite { m, s, t } => {
            let ln_s = s.ln();
            let lse = m as f64 + ln_s;
            RowStats {
                lse: lse as f32,
                loss: (lse - z_y as f64) as f32,
                entropy: (ln_s - t / s) as f32,
            }
        }
        RowSums::PosInf => special_row(row, z_y),
        RowSums::NoFinite { nan: true } => RowStats {
            lse: f32::NAN,
            loss: f32::NAN,
            entropy: f32::NAN,
        },
        RowSums::NoFinite { nan: false } => RowStats {
            lse: f32::NEG_INFINITY,
            loss: f32::NAN,
            entropy: f32::NAN,
        },
    }
}

/// A row holding `+inf`: NaN anywhere wins, otherwise `lse = +inf`, `loss = +inf − z_y`, `entropy = NaN`.
#[cold]
fn special_row<T: LogitElem>(row: &[T], z_y: f32) -> RowStats {
    if row.iter().any(|z| z.to_f32().is_nan()) {
        return RowStats {
            lse: f32::NAN,
            loss: f32::NAN,
            entropy: f32::NAN,
        };
    }
    RowStats {
        lse: f32::INFINITY,
        loss: f32::INFINITY - z_y,
        entropy: f32::NAN,
    }
}

/// The single pass over a row (see the module docs).
#[inline(always)]
fn row_sums<T: LogitElem>(row: &[T]) -> RowSums {
    let mut m = f32::NEG_INFINITY;
    let mut s = 0.0f64;
    let mut t = 0.0f64;
    let mut nan_before_finite = false;
    for chunk in row.chunks(CHUNK) {
        let chunk_max = max_of(chunk);
        if chunk_max == f32::INFINITY {
            return RowSums::PosInf;
        }
        if chunk_max > m {
            if m > f32::NEG_INFINITY {
                let diff = m as f64 - chunk_max as f64;
                let factor = diff.exp();
                t = factor * (t + diff * s);
                s *= factor;
            }
            m = chunk_max;
        }
        if m == f32::NEG_INFINITY {
            // Only -inf and NaN so far; the max pass skips NaN, so look for it explicitly (rare path).
            nan_before_finite |= chunk.iter().any(|z| z.to_f32().is_nan());
            continue;
        }
        let (cs, ct) = exp_sums(chunk, m);
        s += cs;
        t += ct;
    }
    if m == f32::NEG_INFINITY {
        return RowSums::NoFinite {
            nan: nan_before_finite,
        };
    }
    if nan_before_finite {
        s = f64::NAN;
        t = f64::NAN;
    }
    RowSums::Finite { m, s, t }
}

/// Maximum of a chunk (NaN ignored), with [`LANES`] independent lanes so it vectorises.
#[inline(always)]
fn max_of<T: LogitElem>(chunk: &[T]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut blocks = chunk.chunks_exact(LANES);
    for block in &mut blocks {
        for (acc, z) in lanes.iter_mut().zip(block) {
            let z = z.to_f32();
            *acc = if z > *acc { z } else { *acc };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for z in blocks.remainder() {
        let z = z.to_f32();
        max = if z > max { z } else { max };
    }
    for acc in lanes {
        max = if acc > max { acc } else { max };
    }
    max
}

/// `(Σ e^{z−m}, Σ e^{z−m}·(z−m))` over a chunk whose elements are all `≤ m` (or NaN); one `exp` per logit.
/// `-inf` logits (and differences that overflow to `-inf`) add exactly 0 to both sums.
#[inline(always)]
fn exp_sums<T: LogitElem>(chunk: &[T], m: f32) -> (f64, f64) {
    let mut s = [0.0f32; LANES];
    let mut t = [0.0f32; LANES];
    let mut blocks = chunk.chunks_exact(LANES);
    for block in &mut blocks {
        for ((s, t), z) in s.iter_mut().zip(t.iter_mut()).zip(block) {
            let (p, pd) = exp_term(z.to_f32() - m);
            *s += p;
            *t += pd;
        }
    }
    let (mut s_sum, mut t_sum) = (0.0f64, 0.0f64);
    for z in blocks.remainder() {
        let (p, pd) = exp_term(z.to_f32() - m);
        s_sum += p as f64;
        t_sum += pd as f64;
    }
    for l in 0..LANES {
        s_sum += s[l] as f64;
        t_sum += t[l] as f64;
    }
    (s_sum, t_sum)
}

/// `(e^d, e^d·d)` for `d = z − m ≤ 0`, with `e^d = 0` and `e^d·d = 0` (not `0·(−inf) = NaN`) below [`EXP_LO`].
#[inline(always)]
fn exp_term(d: f32) -> (f32, f32) {
    let low = d < EXP_LO;
    let clamped = if low { EXP_LO } else { d };
    let p = exp_core(clamped);
    let p = if low { 0.0 } else { p };
    (p, p * clamped)
}
