//! Shared helpers for the CPU kernel tests: seeded random inputs and float64 naive references.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded generator (tests are reproducible from the seed proptest prints).
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Garbage written into padded columns: none of it may influence any result.
pub const PAD_GARBAGE: [f32; 5] = [f32::NAN, 1e30, f32::INFINITY, f32::NEG_INFINITY, -3e38];

/// `[n, stride]` logits: real columns uniform in `[-scale, scale]`, a fraction `neg_inf` of them `-inf` (never all
/// of a row), padding filled with [`PAD_GARBAGE`].
pub fn random_logits(
    rng: &mut ChaCha8Rng,
    n: usize,
    v: usize,
    stride: usize,
    scale: f32,
    neg_inf: f64,
) -> Vec<f32> {
    let mut data = vec![0.0f32; n * stride];
    for i in 0..n {
        for j in 0..stride {
            data[i * stride + j] = if j >= v {
                PAD_GARBAGE[(i + j) % PAD_GARBAGE.len()]
            } else if j > 0 && rng.gen_bool(neg_inf) {
                f32::NEG_INFINITY
            } else {
                rng.gen_range(-scale..=scale)
            };
        }
    }
    data
}

/// Float64 reference statistics of a row: `(lse, entropy)` for rows with finite values and `-inf` entries.
/// Computed relative to the row max `m` (`entropy = ln s − Σ e^{z−m}(z−m)/s`) so that huge logits such as 3e38,
/// whose `lse − z` is lost in f64, still get an exact reference.
pub fn ref_lse_entropy(row: &[f64]) -> (f64, f64) {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let finite = || row.iter().filter(|z| z.is_finite());
    let s: f64 = finite().map(|z| (z - m).exp()).sum();
    let t: f64 = finite().map(|z| (z - m).exp() * (z - m)).sum();
    (m + s.ln(), s.ln() - t / s)
}

/// Asserts `|got − want| ≤ abs + rel·|want|` (after rounding `want` to f32 for the comparison of specials: equal
/// infinities and NaN on both sides pass).
#[track_caller]
pub fn assert_close(got: f32, want: f64, abs: f64, rel: f64, what: &str) {
    let want32 = want as f32;
    if !want32.is_finite() || !got.is_finite() {
        assert!(
            (got.is_nan() && want32.is_nan()) || got == want32,
            "{what}: got {got}, want {want} (non-finite must match exactly)"
        );
        return;
    }
    let err = (got as f64 - want).abs();
    assert!(
        err <= abs + rel * want.abs(),
        "{what}: got {got}, want {want}, error {err:e}"
    );
}
