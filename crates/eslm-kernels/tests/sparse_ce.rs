//! Sparse-gradient cross-entropy against a dense float64 gradient: random kept sets (K = 1, K = N, unsorted,
//! repeated), padded output strides, bf16 input, the GPT-2 padded layout, masked vocab entries, untouched memory
//! outside the kept rows, and every error.

mod common;

use common::{random_logits, ref_lse_entropy, rng};
use eslm_kernels::{
    sparse_ce, token_stats, KernelError, LogitElem, LogitsView, TokenStats, DEFAULT_IGNORE_INDEX,
};
use half::bf16;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::Rng;

const SENTINEL: f32 = -12345.0;

/// Runs token_stats then sparse_ce on `kept` and compares with the dense f64 gradient
/// `(softmax(z) − onehot(y))·scale` and the f64 mean loss; checks padding and the untouched tail.
fn run_and_check<T: LogitElem>(
    view: &LogitsView<T>,
    targets: &[i32],
    kept: &[u32],
    scale: f32,
    out_stride: usize,
) {
    let mut stats = TokenStats::new();
    token_stats(view, targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
    let v = view.vocab();
    let extra = 2 * out_stride + 3; // memory after the K rows must stay untouched
    let mut dlogits = vec![SENTINEL; kept.len() * out_stride + extra];
    let loss = sparse_ce(
        view,
        targets,
        &stats.lse,
        kept,
        scale,
        &mut dlogits,
        out_stride,
    )
    .unwrap();

    let mut loss_ref = 0.0f64;
    for (i, &r) in kept.iter().enumerate() {
        let r = r as usize;
        let row: Vec<f64> = view.row(r).iter().map(|z| z.to_f32() as f64).collect();
        let (lse, _) = ref_lse_entropy(&row);
        let y = targets[r] as usize;
        loss_ref += lse - row[y];
        let out = &dlogits[i * out_stride..(i + 1) * out_stride];
        let mut sum = 0.0f64;
        for j in 0..v {
            let p = (row[j] - lse).exp();
            let want = (p - (j == y) as u8 as f64) * scale as f64;
            // p is relative to the f32 lse: error ≈ p·(|lse|·2⁻²⁴ + 1e-6); plus f32 rounding.
            let tol = scale.abs() as f64 * (1e-7 + p * (2e-6 + lse.abs() * 1.2e-7));
            let got = out[j] as f64;
            assert!(
                (got - want).abs() <= tol,
                "kept {i} (row {r}) col {j}: got {got}, want {want}, tol {tol:e}"
            );
            if row[j] == f64::NEG_INFINITY {
                assert_eq!(out[j], 0.0, "masked entry has exactly zero gradient");
            }
            sum += got;
        }
        assert!(
            sum.abs() <= 1e-4 * scale.abs() as f64,
            "row gradient sums to 0: {sum}"
        );
        assert!(out[v..].iter().all(|&d| d == 0.0), "padding zeroed");
    }
    assert!(
        dlogits[kept.len() * out_stride..]
            .iter()
            .all(|&d| d == SENTINEL),
        "nothing written past K rows"
    );
    if !kept.is_empty() {
        loss_ref /= kept.len() as f64;
        let err = (loss as f64 - loss_ref).abs();
        assert!(
            err <= 1e-5 * (1.0 + loss_ref.abs()),
            "mean loss {loss} vs {loss_ref}"
        );
    } else {
        assert_eq!(loss, 0.0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn random_kept_sets_match_dense_gradient(
        seed in any::<u64>(),
        n in 1usize..12,
        v in prop_oneof![1usize..50, 1000usize..2100],
        pad in 0usize..5,
        out_pad in 0usize..7,
        scale in prop_oneof![Just(1.0f32), Just(0.125), Just(-3.0)],
        logit_scale in prop_oneof![Just(3.0f32), Just(30.0)],
        neg_inf in prop_oneof![Just(0.0f64), Just(0.2)],
        kept_kind in 0u8..4,
    ) {
        let mut rng = rng(seed);
        let stride = v + pad;
        let data = random_logits(&mut rng, n, v, stride, logit_scale, neg_inf);
        let targets: Vec<i32> = (0..n).map(|i| if i % 4 == 3 { DEFAULT_IGNORE_INDEX } else { 0 }).collect();
        let valid: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize] >= 0).collect();
        let kept: Vec<u32> = match kept_kind {
            0 => vec![valid[rng.gen_range(0..valid.len())]], // K = 1
            1 => valid.clone(),                                 // every valid row
            2 => valid.iter().copied().filter(|_| rng.gen_bool(0.5)).collect(), // random subset, ascending
            _ => {
                let mut k: Vec<u32> = (0..rng.gen_range(1..8)).map(|_| valid[rng.gen_range(0..valid.len())]).collect();
                k.shuffle(&mut rng); // unsorted, possibly repeated
                k
            }
        };
        let out_stride = v + out_pad;
        run_and_check(&LogitsView::new(&data, n, v, stride).unwrap(), &targets, &kept, scale, out_stride);
        let data16: Vec<bf16> = data.iter().map(|&z| bf16::from_f32(z)).collect();
        run_and_check(&LogitsView::new(&data16, n, v, stride).unwrap(), &targets, &kept, scale, out_stride);
    }
}

#[test]
fn all_rows_kept_k_equals_n_with_random_targets() {
    let (n, v) = (16, 333);
    let mut rng = rng(2);
    let data = random_logits(&mut rng, n, v, v, 8.0, 0.0);
    let targets: Vec<i32> = (0..n).map(|_| rng.gen_range(0..v as i32)).collect();
    let kept: Vec<u32> = (0..n as u32).collect();
    run_and_check(
        &LogitsView::new(&data, n, v, v).unwrap(),
        &targets,
        &kept,
        1.0 / n as f32,
        v,
    );
}

#[test]
fn gpt2_vocab_padded_in_and_out() {
    let (n, v, stride) = (5, 50257, 50304);
    let mut rng = rng(4);
    let data = random_logits(&mut rng, n, v, stride, 10.0, 0.0);
    let targets = [17, DEFAULT_IGNORE_INDEX, 50256, 0, 25000];
    let view = LogitsView::new(&data, n, v, stride).unwrap();
    run_and_check(&view, &targets, &[0, 2, 4], 1.0 / 3.0, stride);
    run_and_check(&view, &targets, &[3], 1.0, v);
}

#[test]
fn rows_not_kept_are_never_read() {
    // NaN in every non-kept row (and NaN lse there) must not reach the output or the loss.
    let (n, v) = (6, 70);
    let mut data = random_logits(&mut rng(8), n, v, v, 4.0, 0.0);
    let targets = [1, 2, 3, 4, 5, 6];
    let mut stats = TokenStats::new();
    token_stats(
        &LogitsView::new(&data, n, v, v).unwrap(),
        &targets,
        DEFAULT_IGNORE_INDEX,
        &mut stats,
    )
    .unwrap();
    let mut lse = stats.lse.clone();
    for r in [0usize, 2, 3, 5] {
        data[r * v..(r + 1) * v].fill(f32::NAN);
        lse[r] = f32::NAN;
    }
    let view = LogitsView::new(&data, n, v, v).unwrap();
    let mut dlogits = vec![0.0f32; 2 * v];
    let loss = sparse_ce(&view, &targets, &lse, &[1, 4], 0.5, &mut dlogits, v).unwrap();
    assert!(loss.is_finite() && dlogits.iter().all(|d| d.is_finite()));
    let mean = ((stats.loss[1] as f64 + stats.loss[4] as f64) / 2.0) as f32;
    assert!((loss - mean).abs() <= 1e-5 * mean.abs().max(1.0));
}

#[test]
fn empty_kept_set() {
    let data = [0.0f32; 4];
    let view = LogitsView::new(&data, 2, 2, 2).unwrap();
    let mut dlogits: [f32; 0] = [];
    assert_eq!(
        sparse_ce(&view, &[0, 1], &[0.0, 0.0], &[], 1.0, &mut dlogits, 2).unwrap(),
        0.0
    );
}

#[test]
fn errors() {
    let data = [0.0f32; 12];
    let view = LogitsView::new(&data, 3, 4, 4).unwrap();
    let lse = [4f32.ln(); 3];
    let targets = [0, DEFAULT_IGNORE_INDEX, 3];
    let mut d = vec![SENTINEL; 8];
    let shape = |r: Result<f32, KernelError>, name: &str| {
        assert!(
            matches!(r, Err(KernelError::Shape { what, .. }) if what == name),
            "{name}: {r:?}"
        )
    };
    shape(
        sparse_ce(&view, &targets[..2], &lse, &[0], 1.0, &mut d, 4),
        "targets",
    );
    shape(
        sparse_ce(&view, &targets, &lse[..2], &[0], 1.0, &mut d, 4),
        "lse",
    );
    shape(
        sparse_ce(&view, &targets, &lse, &[0], 1.0, &mut d, 3),
        "out_stride",
    );
    shape(
        sparse_ce(&view, &targets, &lse, &[0, 2, 0], 1.0, &mut d, 4),
        "dlogits",
    );
    shape(
        sparse_ce(&view, &targets, &lse, &[0, 2], 1.0, &mut d, usize::MAX),
        "dlogits",
    );
    assert_eq!(
        sparse_ce(&view, &targets, &lse, &[0, 3], 1.0, &mut d, 4),
        Err(KernelError::KeptRowOutOfRange {
            position: 1,
            row: 3,
            rows: 3
        })
    );
    assert_eq!(
        sparse_ce(&view, &targets, &lse, &[2, 1], 1.0, &mut d, 4),
        Err(KernelError::KeptTargetOutOfRange {
            row: 1,
            target: -100,
            vocab: 4
        })
    );
    assert_eq!(
        sparse_ce(&view, &[0, 4, 0], &lse, &[1], 1.0, &mut d, 4),
        Err(KernelError::KeptTargetOutOfRange {
            row: 1,
            target: 4,
            vocab: 4
        })
    );
    assert!(d.iter().all(|&x| x == SENTINEL), "nothing written on error");
    // A bad target in a row that is not kept is not an error (the row is never read).
    let loss = sparse_ce(&view, &[0, 99, 3], &lse, &[0, 2], 1.0, &mut d, 4).unwrap();
    assert!((loss as f64 - 4f64.ln()).abs() < 1e-6);
}
