//! `token_stats` (CPU) against a float64 naive reference: random rows, the GPT-2 padded layout, bf16 input,
//! special values, ignored rows and every error.

mod common;

use common::{assert_close, random_logits, ref_lse_entropy, rng};
use eslm_kernels::token_stats::CHUNK;
use eslm_kernels::{
    token_stats, KernelError, LogitElem, LogitsView, TokenStats, DEFAULT_IGNORE_INDEX,
};
use half::bf16;
use proptest::prelude::*;
use rand::Rng;

/// Checks every row of `out` against the f64 reference computed from the same (possibly bf16-rounded) values.
fn check_against_reference<T: LogitElem>(
    view: &LogitsView<T>,
    targets: &[i32],
    ignore: i32,
    out: &TokenStats,
) {
    assert_eq!(out.rows(), view.rows());
    for (i, &target) in targets.iter().enumerate() {
        if target == ignore {
            assert!(!out.valid[i], "row {i} should be invalid");
            assert!(out.lse[i].is_nan() && out.loss[i].is_nan() && out.entropy[i].is_nan());
            continue;
        }
        assert!(out.valid[i]);
        let row: Vec<f64> = view.row(i).iter().map(|z| z.to_f32() as f64).collect();
        let (lse, entropy) = ref_lse_entropy(&row);
        let loss = lse - row[target as usize];
        // Tolerances: f32 lane sums of ≤ 64 terms per chunk (relative ~1e-6) plus f32 rounding of the outputs.
        assert_close(out.lse[i], lse, 1e-5, 1e-6, &format!("lse row {i}"));
        assert_close(out.loss[i], loss, 1e-5, 1e-6, &format!("loss row {i}"));
        assert_close(
            out.entropy[i],
            entropy,
            2e-5,
            2e-6,
            &format!("entropy row {i}"),
        );
    }
    assert_eq!(
        out.num_valid(),
        targets.iter().filter(|&&t| t != ignore).count()
    );
}

fn random_targets(rng: &mut impl Rng, n: usize, v: usize, ignore_fraction: f64) -> Vec<i32> {
    (0..n)
        .map(|_| {
            if rng.gen_bool(ignore_fraction) {
                DEFAULT_IGNORE_INDEX
            } else {
                rng.gen_range(0..v) as i32
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random shapes (ragged V around the chunk size, padded strides), scales, masked entries and ignored rows.
    #[test]
    fn random_rows_match_f64_reference(
        seed in any::<u64>(),
        n in 1usize..6,
        v in prop_oneof![1usize..40, (CHUNK - 20)..(CHUNK + 20), 2000usize..3100],
        pad in 0usize..9,
        scale in prop_oneof![Just(1.0f32), Just(20.0), Just(1e4)],
        neg_inf in prop_oneof![Just(0.0f64), Just(0.3)],
        ignore_fraction in prop_oneof![Just(0.0f64), Just(0.4)],
    ) {
        let mut rng = rng(seed);
        let stride = v + pad;
        let data = random_logits(&mut rng, n, v, stride, scale, neg_inf);
        let mut targets = random_targets(&mut rng, n, v, ignore_fraction);
        // Targets on a -inf logit are legal (loss = +inf); keep most on finite ones for a useful check.
        for (i, t) in targets.iter_mut().enumerate() {
            if *t >= 0 && data[i * stride + *t as usize].is_infinite() && rng.gen_bool(0.8) {
                *t = 0; // column 0 is never -inf
            }
        }
        let view = LogitsView::new(&data, n, v, stride).unwrap();
        let mut out = TokenStats::new();
        token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap();
        check_against_reference(&view, &targets, DEFAULT_IGNORE_INDEX, &out);

        // bf16 input: the reference sees the same bf16-rounded values.
        let data16: Vec<bf16> = data.iter().map(|&z| bf16::from_f32(z)).collect();
        let view16 = LogitsView::new(&data16, n, v, stride).unwrap();
        token_stats(&view16, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap();
        check_against_reference(&view16, &targets, DEFAULT_IGNORE_INDEX, &out);
    }
}

#[test]
fn gpt2_vocab_in_padded_stride() {
    let (n, v, stride) = (4, 50257, 50304);
    let mut rng = rng(7);
    let data = random_logits(&mut rng, n, v, stride, 12.0, 0.0);
    let targets = vec![0, 50256, DEFAULT_IGNORE_INDEX, 31337];
    let view = LogitsView::new(&data, n, v, stride).unwrap();
    let mut out = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap();
    check_against_reference(&view, &targets, DEFAULT_IGNORE_INDEX, &out);
    // The padding (NaN, 1e30, ±inf) must not matter: same result with zero padding.
    let mut clean = data.clone();
    for i in 0..n {
        clean[i * stride + v..(i + 1) * stride].fill(0.0);
    }
    let mut out_clean = TokenStats::new();
    token_stats(
        &LogitsView::new(&clean, n, v, stride).unwrap(),
        &targets,
        DEFAULT_IGNORE_INDEX,
        &mut out_clean,
    )
    .unwrap();
    assert_eq!(format!("{out:?}"), format!("{out_clean:?}"));

    let data16: Vec<bf16> = data.iter().map(|&z| bf16::from_f32(z)).collect();
    let view16 = LogitsView::new(&data16, n, v, stride).unwrap();
    token_stats(&view16, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap();
    check_against_reference(&view16, &targets, DEFAULT_IGNORE_INDEX, &out);
}

#[test]
fn single_row_and_single_column() {
    let mut out = TokenStats::new();
    let data = [3.5f32];
    token_stats(
        &LogitsView::new(&data, 1, 1, 1).unwrap(),
        &[0],
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    assert_eq!((out.lse[0], out.loss[0], out.entropy[0]), (3.5, 0.0, 0.0));
    let data = [1.0f32, 2.0, 3.0];
    token_stats(
        &LogitsView::new(&data, 1, 3, 3).unwrap(),
        &[2],
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    let (lse, h) = ref_lse_entropy(&[1.0, 2.0, 3.0]);
    assert_close(out.lse[0], lse, 1e-6, 1e-7, "lse");
    assert_close(out.loss[0], lse - 3.0, 1e-6, 1e-7, "loss");
    assert_close(out.entropy[0], h, 1e-6, 1e-7, "entropy");
}

#[test]
fn uniform_row_has_entropy_ln_v() {
    let v = 50257;
    let data = vec![-2.25f32; v];
    let mut out = TokenStats::new();
    token_stats(
        &LogitsView::new(&data, 1, v, v).unwrap(),
        &[5],
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    let ln_v = (v as f64).ln();
    assert_close(out.entropy[0], ln_v, 2e-6, 1e-6, "entropy");
    assert_close(out.loss[0], ln_v, 2e-6, 1e-6, "loss");
    assert_close(out.lse[0], ln_v - 2.25, 2e-6, 1e-6, "lse");
}

#[test]
fn monotone_rows_rescale_every_chunk() {
    // Increasing rows raise the running max in every chunk; decreasing rows never do.
    let v = 5 * CHUNK + 7;
    let up: Vec<f32> = (0..v).map(|j| j as f32 * 0.01).collect();
    let down: Vec<f32> = up.iter().rev().copied().collect();
    let data: Vec<f32> = up.iter().chain(&down).copied().collect();
    let targets = [3, v as i32 - 1];
    let view = LogitsView::new(&data, 2, v, v).unwrap();
    let mut out = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap();
    check_against_reference(&view, &targets, DEFAULT_IGNORE_INDEX, &out);
}

#[test]
fn huge_finite_logits() {
    // ±3e38: differences overflow to -inf in f32 and must just contribute 0.
    let v = 40;
    let mut data = vec![0.0f32; 3 * v];
    data[..v]
        .iter_mut()
        .enumerate()
        .for_each(|(j, z)| *z = if j % 2 == 0 { 3e38 } else { -3e38 });
    data[v..2 * v]
        .iter_mut()
        .enumerate()
        .for_each(|(j, z)| *z = (j as f32 - 20.0) * 1e4);
    data[2 * v..]
        .iter_mut()
        .enumerate()
        .for_each(|(j, z)| *z = if j == 7 { -3e38 } else { j as f32 });
    let targets = [1, 0, 7];
    let view = LogitsView::new(&data, 3, v, v).unwrap();
    let mut out = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap();
    // Row 0: 20 equal maxima at 3e38: lse = 3e38 + ln 20, loss = 6e38 → +inf in f32, entropy = ln 20.
    assert_eq!(out.lse[0], 3e38);
    assert_eq!(out.loss[0], f32::INFINITY);
    assert_close(out.entropy[0], 20f64.ln(), 1e-6, 1e-6, "entropy row 0");
    check_against_reference(&view, &targets, DEFAULT_IGNORE_INDEX, &out);
    assert_eq!(out.loss[2], 3e38 + out.lse[2]); // f32 rounding of 3e38 + lse
}

#[test]
fn rows_masked_with_f32_min_and_a_3e38_logit() {
    // Masking with -FLT_MAX instead of -inf, then a larger logit in a LATER chunk: the running max jumps from
    // -3.4e38 to a normal value (or to 3e38), so the rescale's m − m' is ±6.8e38 and (m − m')·s overflows f32.
    // The GPU kernel rescales in f32 (tests/kernel_emulation.rs); the CPU must agree with the f64 reference too.
    let v = 3 * CHUNK + 5;
    let mut data = vec![f32::MIN; 5 * v];
    let mut rng = rng(7);
    // Row 0: the first two chunks masked, then ordinary logits.
    for z in &mut data[2 * CHUNK..v] {
        *z = rng.gen_range(-4.0f32..4.0);
    }
    // Row 1: ordinary logits, then one 3e38 logit in the last chunk.
    for z in &mut data[v..2 * v] {
        *z = rng.gen_range(-4.0f32..4.0);
    }
    data[2 * v - 3] = 3e38;
    // Row 2: masked with -FLT_MAX everywhere except a 3e38 logit at the end and an ordinary one at the start.
    data[2 * v] = 1.0;
    data[3 * v - 1] = 3e38;
    // Row 3: every logit -FLT_MAX (a fully masked row: uniform, entropy ln V). Row 4: -FLT_MAX interleaved.
    for (j, z) in data[4 * v..].iter_mut().enumerate() {
        if j % 3 != 0 {
            *z = rng.gen_range(-4.0f32..4.0);
        }
    }
    let targets = [2 * CHUNK as i32 + 1, 0, (v - 1) as i32, 4, 1];
    let view = LogitsView::new(&data, 5, v, v).unwrap();
    let mut out = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap();
    for i in 0..5 {
        assert!(
            out.lse[i].is_finite() && out.entropy[i].is_finite(),
            "row {i}: lse {} entropy {}",
            out.lse[i],
            out.entropy[i]
        );
    }
    assert_eq!(out.lse[3], f32::MIN); // -FLT_MAX + ln V rounds back to -FLT_MAX
    assert_close(out.entropy[3], (v as f64).ln(), 1e-5, 1e-6, "entropy row 3");
    // (Its loss, lse − z_y, is (−FLT_MAX + ln V) − (−FLT_MAX): ln V is below the ulp of FLT_MAX even in f64, so the
    // loss comes out 0, like the f64 reference's; only the entropy keeps ln V.)
    assert_eq!(out.entropy[1], 0.0); // one logit holds all the mass
    assert_eq!(out.entropy[2], 0.0);
    check_against_reference(&view, &targets, DEFAULT_IGNORE_INDEX, &out);
}

#[test]
fn infinities_and_nan_follow_the_documented_policy() {
    let ninf = f32::NEG_INFINITY;
    let rows: [[f32; 4]; 7] = [
        [1.0, ninf, 2.0, ninf],         // masked vocab: exact, no NaN from 0·(−inf)
        [ninf, ninf, ninf, ninf],       // all masked
        [0.0, f32::INFINITY, 1.0, 2.0], // +inf, finite target
        [0.0, f32::INFINITY, 1.0, 2.0], // +inf, target on the +inf
        [0.0, f32::NAN, 1.0, 2.0],      // NaN
        [f32::NAN, ninf, f32::INFINITY, 1.0], // NaN wins over +inf
        [1.0, ninf, 2.0, ninf],         // target on a −inf logit: loss +inf
    ];
    let targets = [2, 0, 0, 1, 0, 3, 1];
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    let mut out = TokenStats::new();
    token_stats(
        &LogitsView::new(&data, 7, 4, 4).unwrap(),
        &targets,
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    let (lse, h) = ref_lse_entropy(&[1.0, f64::NEG_INFINITY, 2.0, f64::NEG_INFINITY]);
    assert_close(out.lse[0], lse, 1e-6, 1e-7, "lse");
    assert_close(out.loss[0], lse - 2.0, 1e-6, 1e-7, "loss");
    assert_close(out.entropy[0], h, 1e-6, 1e-7, "entropy");
    assert!(out.lse[1] == ninf && out.loss[1].is_nan() && out.entropy[1].is_nan());
    assert!(out.lse[2] == f32::INFINITY && out.loss[2] == f32::INFINITY && out.entropy[2].is_nan());
    assert!(out.lse[3] == f32::INFINITY && out.loss[3].is_nan() && out.entropy[3].is_nan());
    for i in [4, 5] {
        assert!(
            out.lse[i].is_nan() && out.loss[i].is_nan() && out.entropy[i].is_nan(),
            "row {i}"
        );
    }
    assert!(out.loss[6] == f32::INFINITY && out.entropy[6] == out.entropy[0]);
    assert!(out.valid.iter().all(|&v| v));
}

#[test]
fn nan_hidden_in_a_leading_masked_chunk_still_propagates() {
    // The first chunk holds only -inf and one NaN (no finite max yet), later chunks are finite.
    let v = 3 * CHUNK;
    let mut data = vec![f32::NEG_INFINITY; v];
    data[5] = f32::NAN;
    data[CHUNK..].iter_mut().for_each(|z| *z = 1.0);
    let mut out = TokenStats::new();
    token_stats(
        &LogitsView::new(&data, 1, v, v).unwrap(),
        &[v as i32 - 1],
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    assert!(out.lse[0].is_nan() && out.loss[0].is_nan() && out.entropy[0].is_nan());
    // Without the NaN the masked chunk contributes nothing.
    data[5] = f32::NEG_INFINITY;
    token_stats(
        &LogitsView::new(&data, 1, v, v).unwrap(),
        &[v as i32 - 1],
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    let ln_finite = ((2 * CHUNK) as f64).ln();
    assert_close(out.entropy[0], ln_finite, 1e-6, 1e-6, "entropy");
    assert_close(out.lse[0], 1.0 + ln_finite, 1e-6, 1e-6, "lse");
}

#[test]
fn ignored_rows_are_skipped_and_custom_ignore_value_works() {
    let (n, v) = (5, 9);
    let mut data = random_logits(&mut rng(3), n, v, v, 3.0, 0.0);
    data[2 * v..3 * v].fill(f32::NAN); // an ignored row full of NaN must not matter
    let targets = [1, 8, -1, 0, -1];
    let view = LogitsView::new(&data, n, v, v).unwrap();
    let mut out = TokenStats::new();
    token_stats(&view, &targets, -1, &mut out).unwrap();
    check_against_reference(&view, &targets, -1, &out);
    assert_eq!(out.valid, vec![true, true, false, true, false]);
    assert_eq!(out.num_valid(), 3);
    // With the default ignore value, -1 is out of range.
    let err = token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut out).unwrap_err();
    assert_eq!(
        err,
        KernelError::TargetOutOfRange {
            row: 2,
            target: -1,
            vocab: v
        }
    );
}

#[test]
fn errors_and_unchanged_output() {
    let data = vec![0.0f32; 12];
    let view = LogitsView::new(&data, 3, 4, 4).unwrap();
    let mut out = TokenStats::new();
    token_stats(&view, &[0, 1, 2], DEFAULT_IGNORE_INDEX, &mut out).unwrap();
    let before = out.clone();
    assert!(matches!(
        token_stats(&view, &[0, 1], DEFAULT_IGNORE_INDEX, &mut out),
        Err(KernelError::Shape {
            what: "targets",
            ..
        })
    ));
    for (bad, row) in [
        ([0, 4, 1], 1usize),
        ([0, 1, i32::MIN], 2),
        ([-2, 0, 0], 0),
        ([0, i32::MAX, 0], 1),
    ] {
        let err = token_stats(&view, &bad, DEFAULT_IGNORE_INDEX, &mut out).unwrap_err();
        assert_eq!(
            err,
            KernelError::TargetOutOfRange {
                row,
                target: bad[row] as i64,
                vocab: 4
            }
        );
    }
    assert_eq!(out, before);
    // Layout errors come from the view.
    assert!(matches!(
        LogitsView::new(&data, 3, 5, 4),
        Err(KernelError::Shape { .. })
    ));
    assert!(matches!(
        LogitsView::new(&data, 4, 4, 4),
        Err(KernelError::Shape { .. })
    ));
    assert!(matches!(
        LogitsView::new(&data, 1, 0, 4),
        Err(KernelError::Shape { .. })
    ));
}

#[test]
fn zero_rows_and_buffer_reuse() {
    let data: Vec<f32> = vec![];
    let mut out = TokenStats::new();
    token_stats(
        &LogitsView::new(&data, 0, 4, 4).unwrap(),
        &[],
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    assert_eq!(out.rows(), 0);
    let big = random_logits(&mut rng(1), 64, 10, 10, 1.0, 0.0);
    let targets = vec![3; 64];
    token_stats(
        &LogitsView::new(&big, 64, 10, 10).unwrap(),
        &targets,
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    let ptr = out.lse.as_ptr();
    token_stats(
        &LogitsView::new(&big, 16, 10, 10).unwrap(),
        &targets[..16],
        DEFAULT_IGNORE_INDEX,
        &mut out,
    )
    .unwrap();
    assert_eq!(out.rows(), 16);
    assert_eq!(out.lse.as_ptr(), ptr, "a big-enough buffer is reused");
    check_against_reference(
        &LogitsView::new(&big, 16, 10, 10).unwrap(),
        &targets[..16],
        DEFAULT_IGNORE_INDEX,
        &out,
    );
}

#[test]
fn many_rows_in_parallel_match_row_by_row() {
    // Small V means many rows per rayon task; results must not depend on the task split.
    let (n, v) = (3000, 37);
    let mut rng = rng(11);
    let data = random_logits(&mut rng, n, v, v + 3, 5.0, 0.1);
    let targets: Vec<i32> = (0..n)
        .map(|i| if i % 7 == 0 { DEFAULT_IGNORE_INDEX } else { 0 })
        .collect();
    let view = LogitsView::new(&data, n, v, v + 3).unwrap();
    let mut all = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut all).unwrap();
    check_against_reference(&view, &targets, DEFAULT_IGNORE_INDEX, &all);
    let mut one = TokenStats::new();
    for i in (0..n).step_by(97) {
        let row = LogitsView::new(view.row(i), 1, v, v).unwrap();
        token_stats(&row, &targets[i..i + 1], DEFAULT_IGNORE_INDEX, &mut one).unwrap();
        assert_eq!(one.lse[0].to_bits(), all.lse[i].to_bits());
        assert_eq!(one.entropy[0].to_bits(), all.entropy[i].to_bits());
    }
}
