//! Selection: which rows to train on, from one score per row.
//!
//! Two rules, both exact and deterministic, in O(N):
//!
//! - **VaR** (`SelectRule::Var { alpha }`): α is the fraction of valid rows dropped. With `M` valid rows,
//!   `k = ⌈(1 − α)·M⌉` (see [`var_keep_count`] for the rounding rule), the threshold is the k-th largest valid
//!   score (the empirical value-at-risk at level α) and a row is kept iff it is valid and `score ≥ threshold`.
//!   The kept count is exactly `k` when no other valid row ties with the threshold value, and
//!   `k + (number of further valid rows equal to the threshold)` otherwise: ties are never split, so equal
//!   scores always get the same decision.
//! - **Top-k** (`SelectRule::TopK { k }`): exactly `k` rows kept: every row above the threshold (the k-th largest
//!   score) and, among rows equal to it, the lowest row indices first.
//!
//! **Comparisons.** Scores are compared as totally ordered keys: `-0.0 == +0.0`, `±inf` are ordinary scores, NaN
//! in a valid row is an error ([`KernelError::NanScore`] with the lowest such row). Rows marked invalid are never
//! kept and their scores are never inspected (they may hold NaN).
//!
//! **Algorithm (radix select, not a sort).** Each f32 maps to an order-preserving u32 key: non-negative values get
//! the sign bit set, negative values have all bits flipped (`-0.0` is first turned into `+0.0`). The k-th largest
//! key is found digit by digit, most significant first (digits of 11, 11 and 10 bits):
//! 1. one parallel pass over all rows: a 2048-bin histogram of the top digit (also counts `M` and finds NaN);
//!    walking the bins from the top gives the bin holding the k-th largest key and how many keys lie above it;
//! 2. one parallel pass gathers the keys of that bin (candidates);
//! 3. two small histogram passes over the candidates fix the remaining digits, giving the exact k-th key.
//!
//! A final parallel pass writes the keep mask and the ascending list of kept row indices. All counts are integer
//! sums over fixed chunks, so the result never depends on thread timing.
//!
//! **Errors**, checked in this order: `valid` length ≠ `scores` length or more than 2³² rows → `Shape`;
//! α not in the open interval (0, 1) (NaN included) → `InvalidAlpha`; NaN in a valid row → `NanScore`;
//! no valid row (empty input included) → `NoValidRows`; top-k with `k = 0` or `k > M` → `InvalidK`.
//! On error `out` is left unchanged.

use rayon::prelude::*;

use crate::error::{KernelError, Result};

/// Rows per parallel task in the passes over all rows.
const CHUNK_ROWS: usize = 1 << 14;
/// Widths of the three radix digits, most significant first (they sum to 32).
const DIGIT_BITS: [u32; 3] = [11, 11, 10];
/// Candidate counts above which the candidate histograms run in parallel.
const PAR_CANDIDATES: usize = 1 << 18;

/// How rows are selected from their scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SelectRule {
    /// Keep every valid row whose score is ≥ the k-th largest valid score, `k = ⌈(1 − α)·M⌉`; α ∈ (0, 1) is the
    /// fraction dropped.
    Var {
        /// Fraction of valid rows dropped, strictly between 0 and 1.
        alpha: f64,
    },
    /// Keep exactly `k` valid rows with the largest scores (ties broken by lower row index); `1 ≤ k ≤ M`.
    TopK {
        /// Number of rows kept.
        k: usize,
    },
}

/// Result of [`select`]; buffers are reused across calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// The k-th largest valid score (`-0.0` is reported as `+0.0`).
    pub threshold: f32,
    /// `[N]` whether each row is kept.
    pub keep: Vec<bool>,
    /// The kept row indices, ascending; `indices.len()` is the kept count.
    pub indices: Vec<u32>,
    /// The target count `k` (VaR: `⌈(1 − α)·M⌉`; top-k: the requested k). The kept count is `indices.len()`,
    /// which exceeds `k` only for VaR with ties at the threshold.
    pub k: usize,
}

impl Selection {
    /// An empty selection (no allocation until the first call).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of kept rows (`indices.len()`).
    pub fn kept(&self) -> usize {
        self.indices.len()
    }
}

/// The VaR target count `k = ⌈(1 − α)·M⌉` for `M = valid` rows, clamped to `[1, M]`.
///
/// Rounding rule: `x = (1 − α)·M` is computed in f64; if `x` is within `1e-13·M` of an integer it is snapped to that
/// integer (so float noise such as `(1 − 0.7)·10 = 3.0000000000000004` gives 3, not 4), otherwise it is rounded
/// up. The rounding error of `x` is below `4e-16·M` (a few ulps), so the snap band has a 250× margin, while a real
/// fractional part, e.g. `1/den` for `α = num/den`, is only snapped when it is below `1e-13·M` (never for
/// `M·den < 10¹³`; a looser band such as `1e-9·M` would already turn `(1 − 0.333)·1000003 = 667002.001` into
/// 667002).
///
/// # Errors
/// [`KernelError::InvalidAlpha`] unless `0 < α < 1`; [`KernelError::NoValidRows`] if `valid == 0`.
///
/// ```
/// use eslm_kernels::select::var_keep_count;
/// assert_eq!(var_keep_count(0.7, 10)?, 3);
/// assert_eq!(var_keep_count(0.75, 10)?, 3); // 2.5 rounds up
/// assert_eq!(var_keep_count(0.999, 10)?, 1); // never below 1
/// # Ok::<(), eslm_kernels::KernelError>(())
/// ```
pub fn var_keep_count(alpha: f64, valid: usize) -> Result<usize> {
    check_alpha(alpha)?;
    if valid == 0 {
        return Err(KernelError::NoValidRows);
    }
    let m = valid as f64;
    let x = (1.0 - alpha) * m;
    let nearest = x.round();
    let k = if (x - nearest).abs() <= 1e-13 * m {
        nearest
    } else {
        x.ceil()
    };
    Ok((k as usize).clamp(1, valid))
}

fn check_alpha(alpha: f64) -> Result<()> {
    // Both comparisons are false for NaN, so NaN is rejected too.
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(KernelError::InvalidAlpha(alpha))
    }
}

/// Selects rows by `rule` from `scores` (one per row); rows with `valid[i] == false` are never kept.
/// `valid = None` means every row is valid. See the module docs for the exact semantics and error order.
///
/// ```
/// use eslm_kernels::select::{select, SelectRule, Selection};
/// let scores = [0.5f32, 3.0, 1.0, 3.0, 2.0];
/// let mut sel = Selection::new();
/// // α = 0.6 of 5 rows dropped: k = 2, threshold = 3.0 (rows 1 and 3).
/// select(&scores, None, SelectRule::Var { alpha: 0.6 }, &mut sel)?;
/// assert_eq!((sel.threshold, sel.k, sel.indices.as_slice()), (3.0, 2, &[1u32, 3][..]));
/// // Top-1 with a tie: the lower row index wins.
/// select(&scores, None, SelectRule::TopK { k: 1 }, &mut sel)?;
/// assert_eq!(sel.indices, vec![1]);
/// # Ok::<(), eslm_kernels::KernelError>(())
/// ```
pub fn select(
    scores: &[f32],
    valid: Option<&[bool]>,
    rule: SelectRule,
    out: &mut Selection,
) -> Result<()> {
    let n = scores.len();
    if let Some(v) = valid {
        if v.len() != n {
            return Err(KernelError::Shape {
                what: "valid",
                expected: format!("length {n} (one flag per score)"),
                got: format!("length {}", v.len()),
            });
        }
    }
    if n > u32::MAX as usize + 1 {
        return Err(KernelError::Shape {
            what: "scores",
            expected: "at most 2^32 rows (indices are u32)".into(),
            got: format!("{n} rows"),
        });
    }
    if let SelectRule::Var { alpha } = rule {
        check_alpha(alpha)?;
    }

    // Pass 1: top-digit histogram, valid count and NaN check.
    let top = top_histogram(scores, valid);
    if let Some(row) = top.first_nan {
        return Err(KernelError::NanScore { row });
    }
    let m = top.valid;
    if m == 0 {
        return Err(KernelError::NoValidRows);
    }
    let k = match rule {
        SelectRule::Var { alpha } => var_keep_count(alpha, m)?,
        SelectRule::TopK { k } => {
            if k == 0 || k > m {
                return Err(KernelError::InvalidK { k, valid: m });
            }
            k
        }
    };

    // Find the k-th largest key digit by digit.
    let (digit0, above0) = pick_bin(&top.hist, k);
    let shift0 = 32 - DIGIT_BITS[0];
    let mut candidates = gather(scores, valid, shift0, digit0);
    let mut above = above0;
    let mut rank = k - above0; // rank of the threshold among the candidates (1 = largest)
    let mut prefix = digit0 << shift0;
    let mut shift = shift0;
    let mut equal = candidates.len();
    for &bits in &DIGIT_BITS[1..] {
        shift -= bits;
        let hist = candidate_histogram(&candidates, shift, bits);
        let (digit, above_digit) = pick_bin(&hist, rank);
        above += above_digit;
        rank -= above_digit;
        prefix |= digit << shift;
        equal = hist[digit as usize];
        if shift > 0 {
            let mask = (1u32 << bits) - 1;
            candidates.retain(|&key| (key >> shift) & mask == digit);
        }
    }
    let threshold_key = prefix;
    debug_assert!(above < k && k <= above + equal);

    // Final pass: keep mask and indices.
    let ties_allowed = match rule {
        SelectRule::Var { .. } => equal,
        SelectRule::TopK { .. } => k - above,
    };
    write_selection(scores, valid, threshold_key, ties_allowed, out);
    out.threshold = from_key(threshold_key);
    out.k = k;
    Ok(())
}

/// Order-preserving map from f32 (not NaN) to u32; `-0.0` and `+0.0` map to the same key.
#[inline(always)]
pub(crate) fn to_key(score: f32) -> u32 {
    let bits = (score + 0.0).to_bits(); // -0.0 + 0.0 = +0.0
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Inverse of [`to_key`].
#[inline(always)]
pub(crate) fn from_key(key: u32) -> f32 {
    if key >> 31 == 1 {
        f32::from_bits(key & 0x7FFF_FFFF)
    } else {
        f32::from_bits(!key)
    }
}

#[inline(always)]
fn is_valid(valid: Option<&[bool]>, i: usize) -> bool {
    valid.is_none_or(|v| v[i])
}

/// Runs `f` over the row ranges `[c·CHUNK_ROWS, …)` in parallel (inline when there is one chunk), in order.
fn map_chunks<R: Send>(n: usize, f: impl Fn(std::ops::Range<usize>) -> R + Sync) -> Vec<R> {
    let chunks = n.div_ceil(CHUNK_ROWS);
    let range = |c: usize| c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(n);
    if chunks <= 1 {
        (0..chunks).map(|c| f(range(c))).collect()
    } else {
        (0..chunks).into_par_iter().map(|c| f(range(c))).collect()
    }
}

struct TopHistogram {
    hist: Vec<usize>,
    valid: usize,
    first_nan: Option<usize>,
}

fn top_histogram(scores: &[f32], valid: Option<&[bool]>) -> TopHistogram {
    let bins = 1usize << DIGIT_BITS[0];
    let shift = 32 - DIGIT_BITS[0];
    let parts = map_chunks(scores.len(), |range| {
        let mut hist = vec![0u32; bins];
        let mut count = 0usize;
        let mut first_nan = None;
        for i in range {
            if !is_valid(valid, i) {
                continue;
            }
            let score = scores[i];
            if score.is_nan() {
                first_nan.get_or_insert(i);
                continue;
            }
            count += 1;
            hist[(to_key(score) >> shift) as usize] += 1;
        }
        (hist, count, first_nan)
    });
    let mut total = TopHistogram {
        hist: vec![0; bins],
        valid: 0,
        first_nan: None,
    };
    for (hist, count, first_nan) in parts {
        for (t, h) in total.hist.iter_mut().zip(hist) {
            *t += h as usize;
        }
        total.valid += count;
        if total.first_nan.is_none() {
            total.first_nan = first_nan;
        }
    }
    total
}

/// The bin holding the `rank`-th largest element (1-based) and the number of elements in higher bins.
fn pick_bin(hist: &[usize], rank: usize) -> (u32, usize) {
    let mut above = 0usize;
    for bin in (0..hist.len()).rev() {
        if above + hist[bin] >= rank {
            return (bin as u32, above);
        }
        above += hist[bin];
    }
    unreachable!("rank {rank} exceeds the histogram total {above}")
}

/// Keys of the valid rows whose top digit is `digit`, in row order.
fn gather(scores: &[f32], valid: Option<&[bool]>, shift: u32, digit: u32) -> Vec<u32> {
    let parts = map_chunks(scores.len(), |range| {
        let mut keys = Vec::new();
        for i in range {
            if is_valid(valid, i) {
                let key = to_key(scores[i]);
                if key >> shift == digit {
                    keys.push(key);
                }
            }
        }
        keys
    });
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let mut keys = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for part in parts {
        keys.extend_from_slice(&part);
    }
    keys
}

fn candidate_histogram(keys: &[u32], shift: u32, bits: u32) -> Vec<usize> {
    let bins = 1usize << bits;
    let mask = (1u32 << bits) - 1;
    let count = |keys: &[u32]| {
        let mut hist = vec![0usize; bins];
        for &key in keys {
            hist[((key >> shift) & mask) as usize] += 1;
        }
        hist
    };
    if keys.len() < PAR_CANDIDATES {
        return count(keys);
    }
    keys.par_chunks(CHUNK_ROWS).map(count).reduce(
        || vec![0usize; bins],
        |mut a, b| {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            a
        },
    )
}

/// Writes `out.keep` and `out.indices`: valid rows with key above `threshold_key`, plus the first `ties_allowed`
/// valid rows (by index) whose key equals it.
fn write_selection(
    scores: &[f32],
    valid: Option<&[bool]>,
    threshold_key: u32,
    ties_allowed: usize,
    out: &mut Selection,
) {
    let n = scores.len();
    out.keep.clear();
    out.keep.resize(n, false);
    // Pass A: tentative mask (all ties kept) and per-chunk counts of rows above / equal.
    let mark = |(c, keep): (usize, &mut [bool])| {
        let start = c * CHUNK_ROWS;
        let (mut above, mut equal) = (0usize, 0usize);
        for (j, kept) in keep.iter_mut().enumerate() {
            let i = start + j;
            if is_valid(valid, i) {
                let key = to_key(scores[i]);
                *kept = key >= threshold_key;
                above += (key > threshold_key) as usize;
                equal += (key == threshold_key) as usize;
            }
        }
        (above, equal)
    };
    let counts: Vec<(usize, usize)> = if n <= CHUNK_ROWS {
        out.keep
            .chunks_mut(CHUNK_ROWS)
            .enumerate()
            .map(mark)
            .collect()
    } else {
        out.keep
            .par_chunks_mut(CHUNK_ROWS)
            .enumerate()
            .map(mark)
            .collect()
    };
    // Assign the tie budget to chunks in row order; chunks that must drop ties are trimmed.
    let mut budget = ties_allowed;
    let mut allowed = Vec::with_capacity(counts.len());
    for &(_, equal) in &counts {
        let take = equal.min(budget);
        budget -= take;
        allowed.push(take);
    }
    let trim = |(c, keep): (usize, &mut [bool])| {
        let (_, equal) = counts[c];
        if allowed[c] == equal {
            return;
        }
        let start = c * CHUNK_ROWS;
        let mut left = allowed[c];
        for (j, kept) in keep.iter_mut().enumerate() {
            if *kept && to_key(scores[start + j]) == threshold_key {
                if left == 0 {
                    *kept = false;
                } else {
                    left -= 1;
                }
            }
        }
    };
    if n <= CHUNK_ROWS {
        out.keep.chunks_mut(CHUNK_ROWS).enumerate().for_each(trim);
    } else {
        out.keep
            .par_chunks_mut(CHUNK_ROWS)
            .enumerate()
            .for_each(trim);
    }
    // Indices: each chunk writes its kept rows into its own slice.
    let per_chunk: Vec<usize> = counts
        .iter()
        .zip(&allowed)
        .map(|(&(above, _), &take)| above + take)
        .collect();
    let total: usize = per_chunk.iter().sum();
    out.indices.clear();
    out.indices.resize(total, 0);
    let mut slices = Vec::with_capacity(per_chunk.len());
    let mut rest = out.indices.as_mut_slice();
    for &len in &per_chunk {
        let (head, tail) = rest.split_at_mut(len);
        slices.push(head);
        rest = tail;
    }
    let fill = |(c, (keep, dst)): (usize, (&[bool], &mut &mut [u32]))| {
        let start = c * CHUNK_ROWS;
        let mut w = 0;
        for (j, &kept) in keep.iter().enumerate() {
            if kept {
                dst[w] = (start + j) as u32;
                w += 1;
            }
        }
    };
    if n <= CHUNK_ROWS {
        out.keep
            .chunks(CHUNK_ROWS)
            .zip(slices.iter_mut())
            .enumerate()
            .for_each(fill);
    } else {
        out.keep
            .par_chunks(CHUNK_ROWS)
            .zip(slices.par_iter_mut())
            .enumerate()
            .for_each(fill);
    }
}
