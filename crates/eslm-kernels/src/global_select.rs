//! The exact VaR threshold over scores that are spread across several buffers and several processes, without
//! gathering them: a most-significant-digit radix select whose per-pass histograms are summed by a caller-given
//! reduction (an all-reduce across data-parallel ranks, or nothing in a single process).
//!
//! With `M` valid rows in total (every part on every rank) and `k = ⌈(1 − α)·M⌉` ([`var_keep_count`]), the
//! threshold is the k-th largest valid score; a row is kept iff it is valid and `score ≥ threshold` (ties kept),
//! exactly as [`crate::select::select`] does on one buffer. Scores map to order-preserving u32 keys
//! (`-0.0 == +0.0`, `±inf` ordinary); the key is fixed 8 bits at a time in 4 passes. Pass `p` builds a 256-bin
//! histogram of digit `p` of the keys whose first `p` digits equal the prefix found so far, sums it over ranks
//! (1 KiB per pass), and walks the bins from the top to the bin holding the k-th largest key. The first pass also
//! sums the valid count `M` and the number of NaN scores among valid rows (NaN is an error on every rank, so
//! every rank stops together). Every rank computes the same threshold from the same reduced counts: the result
//! is bitwise identical across ranks and equal to the single-buffer selection.
//!
//! Counts are u32: at most 2³² − 1 valid rows in total.

use crate::error::{KernelError, Result};
use crate::select::{from_key, to_key, var_keep_count};

/// One buffer of scores with its valid mask (`None`: every row valid).
#[derive(Debug, Clone, Copy)]
pub struct ScorePart<'a> {
    /// One score per row.
    pub scores: &'a [f32],
    /// Whether each row takes part (`None`: all do).
    pub valid: Option<&'a [bool]>,
}

/// The global threshold and the counts it was derived from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalThreshold {
    /// The k-th largest valid score over every part and rank (`-0.0` reported as `+0.0`).
    pub threshold: f32,
    /// `k = ⌈(1 − α)·M⌉`.
    pub k: usize,
    /// `M`, the valid rows over every part and rank.
    pub valid: usize,
}

const BINS: usize = 256;

fn valid_keys<'a>(parts: &'a [ScorePart<'a>]) -> impl Iterator<Item = f32> + 'a {
    parts.iter().flat_map(|p| {
        p.scores
            .iter()
            .enumerate()
            .filter(move |(i, _)| p.valid.is_none_or(|v| v[*i]))
            .map(|(_, &s)| s)
    })
}

/// The exact VaR threshold at drop fraction `alpha` over `parts` on every rank; `reduce` sums a u32 buffer
/// element-wise over ranks in place (the identity in a single process) and is called exactly 4 times, with the
/// same lengths on every rank.
///
/// # Errors
/// `Shape` when a valid mask's length differs from its scores'; `InvalidAlpha` unless `0 < α < 1`;
/// `NanScores` when any rank has a NaN score in a valid row; `NoValidRows` when no rank has a valid row;
/// `Reduce` when the reduction fails.
///
/// ```
/// use eslm_kernels::global_select::{global_threshold, ScorePart};
/// let (a, b) = ([0.5f32, 3.0, 1.0], [3.0f32, 2.0]);
/// let parts = [ScorePart { scores: &a, valid: None }, ScorePart { scores: &b, valid: None }];
/// let g = global_threshold(&parts, 0.6, &mut |_| Ok(()))?; // one process: no reduction
/// assert_eq!((g.threshold, g.k, g.valid), (3.0, 2, 5));
/// # Ok::<(), eslm_kernels::KernelError>(())
/// ```
pub fn global_threshold(
    parts: &[ScorePart<'_>],
    alpha: f64,
    reduce: &mut dyn FnMut(&mut [u32]) -> std::result::Result<(), String>,
) -> Result<GlobalThreshold> {
    for p in parts {
        if let Some(v) = p.valid {
            crate::error::check_len("valid", v.len(), p.scores.len())?;
        }
    }
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(KernelError::InvalidAlpha(alpha));
    }
    let mut reduce = |buf: &mut [u32]| reduce(buf).map_err(KernelError::Reduce);
    // Pass 0: top digit, plus [valid count, NaN count] in two extra bins.
    let mut hist = vec![0u32; BINS + 2];
    for s in valid_keys(parts) {
        if s.is_nan() {
            hist[BINS + 1] += 1;
        } else {
            hist[(to_key(s) >> 24) as usize] += 1;
        }
        hist[BINS] += 1;
    }
    reduce(&mut hist)?;
    let (m, nans) = (hist[BINS] as usize, hist[BINS + 1] as usize);
    if nans > 0 {
        return Err(KernelError::NanScores { count: nans });
    }
    let k = var_keep_count(alpha, m)?;
    let (mut prefix, mut rank) = walk(&hist[..BINS], k);
    for pass in 1..4u32 {
        let shift = 24 - 8 * pass;
        let mut hist = vec![0u32; BINS];
        for s in valid_keys(parts) {
            let key = to_key(s);
            if key >> (shift + 8) == prefix {
                hist[((key >> shift) & 0xFF) as usize] += 1;
            }
        }
        reduce(&mut hist)?;
        let (digit, r) = walk(&hist, rank);
        prefix = (prefix << 8) | digit;
        rank = r;
    }
    Ok(GlobalThreshold {
        threshold: from_key(prefix),
        k,
        valid: m,
    })
}

/// The bin (from the top) holding the `rank`-th largest key (1-based) and its rank inside that bin.
fn walk(hist: &[u32], rank: usize) -> (u32, usize) {
    let mut above = 0usize;
    for d in (0..hist.len()).rev() {
        let c = hist[d] as usize;
        if above + c >= rank {
            return (d as u32, rank - above);
        }
        above += c;
    }
    (0, rank) // unreachable when 1 ≤ rank ≤ the histogram's total
}
