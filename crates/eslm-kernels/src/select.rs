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
    let mut candidates = gather(scores, valid, digit0);
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

/// Which rows are valid: every row, or a flag per row. Passes are monomorphised per mask so the all-valid case
/// has no per-row test.
trait Mask: Copy + Send + Sync {
    /// Whether row `i` is valid.
    fn get(self, i: usize) -> bool;
}

#[derive(Clone, Copy)]
struct AllValid;

impl Mask for AllValid {
    #[inline(always)]
    fn get(self, _i: usize) -> bool {
        true
    }
}

impl Mask for &[bool] {
    #[inline(always)]
    fn get(self, i: usize) -> bool {
        self[i]
    }
}

/// Runs `f(start, end)` over the row chunks `[c·CHUNK_ROWS, …)` in parallel (inline when there is one chunk) and
/// returns the results in chunk order.
fn map_chunks<R: Send>(n: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    let chunks = n.div_ceil(CHUNK_ROWS);
    let run = |c: usize| f(c * CHUNK_ROWS, ((c + 1) * CHUNK_ROWS).min(n));
    if chunks <= 1 {
        (0..chunks).map(run).collect()
    } else {
        (0..chunks).into_par_iter().map(run).collect()
    }
}

const TOP_BINS: usize = 1 << DIGIT_BITS[0];
const TOP_SHIFT: u32 = 32 - DIGIT_BITS[0];
/// Interleaved sub-histograms: consecutive rows in the same bin do not wait on each other's increments.
const SUB_HISTOGRAMS: usize = 4;

struct TopHistogram {
    hist: Vec<usize>,
    valid: usize,
    first_nan: Option<usize>,
}

fn top_histogram(scores: &[f32], valid: Option<&[bool]>) -> TopHistogram {
    let parts = match valid {
        None => map_chunks(scores.len(), |start, end| {
            top_histogram_chunk(scores, AllValid, start, end)
        }),
        Some(v) => map_chunks(scores.len(), |start, end| {
            top_histogram_chunk(scores, v, start, end)
        }),
    };
    let mut total = TopHistogram {
        hist: vec![0; TOP_BINS],
        valid: 0,
        first_nan: None,
    };
    for (hist, count, first_nan) in parts {
        for (t, h) in total.hist.iter_mut().zip(hist.iter()) {
            *t += *h as usize;
        }
        total.valid += count;
        if total.first_nan.is_none() {
            total.first_nan = first_nan;
        }
    }
    total
}

/// Top-digit histogram, valid count and first NaN row of rows `start..end` (branch-free: invalid rows add 0).
#[allow(clippy::type_complexity)]
fn top_histogram_chunk<M: Mask>(
    scores: &[f32],
    valid: M,
    start: usize,
    end: usize,
) -> (Box<[u32; TOP_BINS]>, usize, Option<usize>) {
    let mut sub = vec![[0u32; TOP_BINS]; SUB_HISTOGRAMS];
    let mut count = 0usize;
    let mut nan = false;
    let chunk = &scores[start..end];
    let mut blocks = chunk.chunks_exact(SUB_HISTOGRAMS);
    let mut i = start;
    for block in &mut blocks {
        for (h, &score) in sub.iter_mut().zip(block) {
            let ok = valid.get(i);
            nan |= ok & score.is_nan();
            count += ok as usize;
            h[(to_key(score) >> TOP_SHIFT) as usize] += ok as u32;
            i += 1;
        }
    }
    for &score in blocks.remainder() {
        let ok = valid.get(i);
        nan |= ok & score.is_nan();
        count += ok as usize;
        sub[0][(to_key(score) >> TOP_SHIFT) as usize] += ok as u32;
        i += 1;
    }
    let mut hist = Box::new([0u32; TOP_BINS]);
    for h in &sub {
        for (t, x) in hist.iter_mut().zip(h) {
            *t += x;
        }
    }
    let first_nan = if nan {
        (start..end).find(|&i| valid.get(i) && scores[i].is_nan())
    } else {
        None
    };
    (hist, count, first_nan)
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
fn gather(scores: &[f32], valid: Option<&[bool]>, digit: u32) -> Vec<u32> {
    let parts = match valid {
        None => map_chunks(scores.len(), |start, end| {
            gather_chunk(scores, AllValid, start, end, digit)
        }),
        Some(v) => map_chunks(scores.len(), |start, end| {
            gather_chunk(scores, v, start, end, digit)
        }),
    };
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let mut keys = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for part in parts {
        keys.extend_from_slice(&part);
    }
    keys
}

/// Rows per stack block in the branch-free compaction loops.
const BLOCK: usize = 512;

/// Branch-free gather: every key is written into a stack block, the write position only advances for candidates;
/// each block's candidates are then appended.
fn gather_chunk<M: Mask>(
    scores: &[f32],
    valid: M,
    start: usize,
    end: usize,
    digit: u32,
) -> Vec<u32> {
    let mut keys = Vec::new();
    let mut block = [0u32; BLOCK];
    let mut i = start;
    for rows in scores[start..end].chunks(BLOCK) {
        let mut w = 0usize;
        for &score in rows {
            let key = to_key(score);
            block[w] = key;
            w += (valid.get(i) & (key >> TOP_SHIFT == digit)) as usize;
            i += 1;
        }
        keys.extend_from_slice(&block[..w]);
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

/// One chunk's share of the final pass: its kept row indices and its count of valid rows equal to the threshold
/// key.
struct ChunkKept {
    indices: Vec<u32>,
    equal: usize,
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
    out.indices.clear();
    // One pass: mask and index list with every tie kept, plus per-chunk tie counts. A single chunk appends to
    // `out.indices` directly (no temporary).
    let mut parts: Vec<ChunkKept> = if n <= CHUNK_ROWS {
        let equal = mark_any(
            scores,
            valid,
            0,
            &mut out.keep,
            threshold_key,
            &mut out.indices,
        );
        vec![ChunkKept {
            indices: Vec::new(),
            equal,
        }]
    } else {
        out.keep
            .par_chunks_mut(CHUNK_ROWS)
            .enumerate()
            .map(|(c, keep)| {
                let mut indices = Vec::new();
                let equal = mark_any(
                    scores,
                    valid,
                    c * CHUNK_ROWS,
                    keep,
                    threshold_key,
                    &mut indices,
                );
                ChunkKept { indices, equal }
            })
            .collect()
    };
    if n <= CHUNK_ROWS {
        std::mem::swap(&mut parts[0].indices, &mut out.indices);
    }
    // Hand the tie budget to chunks in row order; chunks that must drop ties keep their first ones only.
    let mut budget = ties_allowed;
    for (c, part) in parts.iter_mut().enumerate() {
        let take = part.equal.min(budget);
        budget -= take;
        if take < part.equal {
            let start = c * CHUNK_ROWS;
            let keep = &mut out.keep[start..];
            let mut left = take;
            part.indices.retain(|&i| {
                if to_key(scores[i as usize]) != threshold_key {
                    return true;
                }
                if left > 0 {
                    left -= 1;
                    return true;
                }
                keep[i as usize - start] = false;
                false
            });
        }
    }
    if n <= CHUNK_ROWS {
        std::mem::swap(&mut parts[0].indices, &mut out.indices);
    } else {
        out.indices
            .reserve(parts.iter().map(|p| p.indices.len()).sum());
        for part in &parts {
            out.indices.extend_from_slice(&part.indices);
        }
    }
}

fn mark_any(
    scores: &[f32],
    valid: Option<&[bool]>,
    start: usize,
    keep: &mut [bool],
    threshold_key: u32,
    indices: &mut Vec<u32>,
) -> usize {
    match valid {
        None => mark_chunk(scores, AllValid, start, keep, threshold_key, indices),
        Some(v) => mark_chunk(scores, v, start, keep, threshold_key, indices),
    }
}

/// Branch-free mark of rows `start..start + keep.len()`: `keep = valid && key ≥ threshold`; kept row indices are
/// appended to `indices` (through a stack block); returns the number of valid rows equal to the threshold.
fn mark_chunk<M: Mask>(
    scores: &[f32],
    valid: M,
    start: usize,
    keep: &mut [bool],
    threshold_key: u32,
    indices: &mut Vec<u32>,
) -> usize {
    let mut block = [0u32; BLOCK];
    let mut equal = 0usize;
    let mut i = start;
    for (keep, scores) in keep.chunks_mut(BLOCK).zip(scores[start..].chunks(BLOCK)) {
        let mut w = 0usize;
        for (kept, &score) in keep.iter_mut().zip(scores) {
            let ok = valid.get(i);
            let key = to_key(score);
            let k = ok & (key >= threshold_key);
            *kept = k;
            equal += (ok & (key == threshold_key)) as usize;
            block[w] = i as u32;
            w += k as usize;
            i += 1;
        }
        indices.extend_from_slice(&block[..w]);
    }
    equal
}
