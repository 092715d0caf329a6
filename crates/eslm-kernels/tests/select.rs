//! Selection (VaR and top-k) against a sort-based float64 reference: random scores with heavy ties, negative
//! values, ±inf and ±0, invalid rows, the exact kept-count formula, α near 0 and 1, large N (parallel chunks),
//! and every error.

mod common;

use common::rng;
use eslm_kernels::{select, var_keep_count, KernelError, SelectRule, Selection};
use proptest::prelude::*;
use rand::Rng;

/// Sort-based reference: `(threshold, kept indices ascending)` for `k` and the rule's tie handling.
fn reference(scores: &[f32], valid: Option<&[bool]>, k: usize, top_k: bool) -> (f32, Vec<u32>) {
    let is_valid = |i: usize| valid.is_none_or(|v| v[i]);
    // -0.0 and +0.0 compare equal as f64, so a plain sort works once NaN is excluded.
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| is_valid(i)).collect();
    order.sort_by(|&a, &b| {
        (scores[b] as f64)
            .partial_cmp(&(scores[a] as f64))
            .unwrap()
            .then(a.cmp(&b))
    });
    let threshold = scores[order[k - 1]];
    let mut kept: Vec<u32> = if top_k {
        order[..k].iter().map(|&i| i as u32).collect()
    } else {
        order
            .iter()
            .filter(|&&i| scores[i] >= threshold)
            .map(|&i| i as u32)
            .collect()
    };
    kept.sort_unstable();
    (threshold + 0.0, kept)
}

/// Checks a selection against the reference and its own internal consistency.
fn check(
    scores: &[f32],
    valid: Option<&[bool]>,
    rule: SelectRule,
    sel: &Selection,
    expected_k: usize,
) {
    let top_k = matches!(rule, SelectRule::TopK { .. });
    let (threshold, kept) = reference(scores, valid, expected_k, top_k);
    assert_eq!(sel.k, expected_k, "target count");
    assert_eq!(
        sel.threshold.to_bits(),
        threshold.to_bits(),
        "threshold {} vs {}",
        sel.threshold,
        threshold
    );
    assert_eq!(sel.indices, kept, "kept indices");
    assert_eq!(sel.keep.len(), scores.len());
    let from_mask: Vec<u32> = (0..scores.len())
        .filter(|&i| sel.keep[i])
        .map(|i| i as u32)
        .collect();
    assert_eq!(from_mask, sel.indices, "mask and indices agree");
    // The documented count: exactly k for top-k; k + (other rows tied at the threshold) for VaR.
    let valid_scores: Vec<f32> = (0..scores.len())
        .filter(|&i| valid.is_none_or(|v| v[i]))
        .map(|i| scores[i])
        .collect();
    let above = valid_scores.iter().filter(|&&s| s > threshold).count();
    let equal = valid_scores.iter().filter(|&&s| s == threshold).count();
    assert!(above < expected_k && expected_k <= above + equal);
    let expected_count = if top_k { expected_k } else { above + equal };
    assert_eq!(sel.kept(), expected_count);
}

/// Scores of one of several shapes: spread, heavily tied, negative, with infinities and signed zeros.
fn random_scores(rng: &mut impl Rng, n: usize, kind: u8) -> Vec<f32> {
    (0..n)
        .map(|_| match kind {
            0 => rng.gen_range(0.0f32..12.0),      // losses
            1 => rng.gen_range(0..4) as f32 * 0.5, // heavy ties
            2 => rng.gen_range(-5.0f32..5.0),      // excess losses (negative too)
            3 => [f32::NEG_INFINITY, -0.0, 0.0, 1.0, f32::INFINITY][rng.gen_range(0..5)], // specials
            4 => {
                f32::from_bits(rng.gen::<u32>() & 0x7F7F_FFFF) * if rng.gen() { 1.0 } else { -1.0 }
            } // any finite
            _ => 3.25, // all equal
        })
        .collect()
}

/// α given as a decimal fraction `num / den`, and its exact k by integer arithmetic: ⌈(den − num)·M / den⌉.
fn exact_k(num: u64, den: u64, m: usize) -> usize {
    let k = ((den - num) * m as u64).div_ceil(den) as usize;
    k.clamp(1, m)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn var_and_topk_match_sort_reference(
        seed in any::<u64>(),
        n in prop_oneof![1usize..20, 20usize..3000],
        kind in 0u8..6,
        invalid_fraction in prop_oneof![Just(0.0f64), Just(0.3), Just(0.9)],
        den in prop_oneof![Just(10u64), Just(100), Just(1000), Just(1_000_000)],
        num_frac in 0.0f64..1.0,
        k_frac in 0.0f64..1.0,
    ) {
        let mut rng = rng(seed);
        let mut scores = random_scores(&mut rng, n, kind);
        let mut valid: Vec<bool> = (0..n).map(|_| !rng.gen_bool(invalid_fraction)).collect();
        valid[rng.gen_range(0..n)] = true;
        for i in 0..n {
            if !valid[i] && rng.gen_bool(0.5) {
                scores[i] = f32::NAN; // invalid rows are never inspected
            }
        }
        let m = valid.iter().filter(|&&v| v).count();
        let num = ((num_frac * (den - 1) as f64) as u64 + 1).min(den - 1);
        let alpha = num as f64 / den as f64;
        let mut sel = Selection::new();
        let rule = SelectRule::Var { alpha };
        select(&scores, Some(&valid), rule, &mut sel).unwrap();
        check(&scores, Some(&valid), rule, &sel, exact_k(num, den, m));
        prop_assert_eq!(var_keep_count(alpha, m).unwrap(), exact_k(num, den, m));

        let k = ((k_frac * m as f64) as usize).clamp(1, m);
        let rule = SelectRule::TopK { k };
        select(&scores, Some(&valid), rule, &mut sel).unwrap();
        check(&scores, Some(&valid), rule, &sel, k);
    }
}

#[test]
fn kept_count_formula_explicit() {
    let mut sel = Selection::new();
    // Distinct scores: exactly k = ⌈(1−α)M⌉ kept, k computed without float noise.
    let scores: Vec<f32> = (0..10).map(|i| i as f32).collect();
    for (alpha, k) in [
        (0.7, 3),
        (0.75, 3),
        (0.9, 1),
        (0.1, 9),
        (0.05, 10),
        (0.5, 5),
        (0.3, 7),
        (0.6, 4),
        (0.99, 1),
    ] {
        select(&scores, None, SelectRule::Var { alpha }, &mut sel).unwrap();
        assert_eq!((sel.k, sel.kept()), (k, k), "alpha {alpha}");
        assert_eq!(sel.threshold, (10 - k) as f32);
    }
    // Ties at the threshold: k = 3 but rows 6, 7 and 8 all score 7.0 → kept = 3 + 2 others... i.e. 4 rows.
    let tied = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 7.0, 7.0, 9.0];
    select(&tied, None, SelectRule::Var { alpha: 0.7 }, &mut sel).unwrap();
    assert_eq!(
        (sel.k, sel.threshold, sel.indices.as_slice()),
        (3, 7.0, &[6u32, 7, 8, 9][..])
    );
    // The same with top-k keeps exactly 3: the tie goes to the lower rows.
    select(&tied, None, SelectRule::TopK { k: 3 }, &mut sel).unwrap();
    assert_eq!(sel.indices, vec![6, 7, 9]);
    // The tie not at the threshold does not add rows.
    select(&tied, None, SelectRule::Var { alpha: 0.9 }, &mut sel).unwrap();
    assert_eq!((sel.k, sel.indices.as_slice()), (1, &[9u32][..]));
}

#[test]
fn var_keep_count_snaps_float_noise() {
    assert_eq!((1.0 - 0.7) * 10.0, 3.0000000000000004); // the noise the rule exists for
    assert_eq!(var_keep_count(0.7, 10).unwrap(), 3);
    assert_eq!(var_keep_count(0.3, 10).unwrap(), 7);
    assert_eq!(var_keep_count(0.1, 1000).unwrap(), 900);
    assert_eq!(var_keep_count(0.9, 1_000_000).unwrap(), 100_000);
    assert_eq!(var_keep_count(0.5, 1).unwrap(), 1);
    assert_eq!(var_keep_count(0.5, 3).unwrap(), 2);
    // Exact decimal fractions over many M: always the integer-arithmetic answer.
    for den in [10u64, 100, 1000] {
        for num in 1..den {
            for m in [
                1usize, 2, 3, 7, 10, 99, 100, 101, 1000, 4096, 65_536, 1_000_003,
            ] {
                assert_eq!(
                    var_keep_count(num as f64 / den as f64, m).unwrap(),
                    exact_k(num, den, m),
                    "{num}/{den} M {m}"
                );
            }
        }
    }
}

#[test]
fn alpha_near_0_and_1() {
    let mut rng = rng(5);
    let scores = random_scores(&mut rng, 1000, 0);
    let mut sel = Selection::new();
    // α = 1e-6: ⌈0.999999·1000⌉ = 1000, everything kept.
    select(&scores, None, SelectRule::Var { alpha: 1e-6 }, &mut sel).unwrap();
    assert_eq!((sel.k, sel.kept()), (1000, 1000));
    let min = scores.iter().copied().fold(f32::INFINITY, f32::min);
    assert_eq!(sel.threshold, min);
    // α = 1 − 1e-6: (1−α)·1000 ≈ 0.001 → k = 1, the maximum only.
    select(
        &scores,
        None,
        SelectRule::Var { alpha: 1.0 - 1e-6 },
        &mut sel,
    )
    .unwrap();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!((sel.k, sel.kept(), sel.threshold), (1, 1, max));
    // The smallest and largest α that are still valid.
    select(
        &scores,
        None,
        SelectRule::Var {
            alpha: f64::MIN_POSITIVE,
        },
        &mut sel,
    )
    .unwrap();
    assert_eq!(sel.kept(), 1000);
    select(
        &scores,
        None,
        SelectRule::Var {
            alpha: 1.0 - f64::EPSILON / 2.0,
        },
        &mut sel,
    )
    .unwrap();
    assert_eq!(sel.kept(), 1);
}

#[test]
fn single_row_all_equal_and_signed_zero() {
    let mut sel = Selection::new();
    select(&[-7.5], None, SelectRule::Var { alpha: 0.5 }, &mut sel).unwrap();
    assert_eq!(
        (sel.k, sel.threshold, sel.indices.as_slice()),
        (1, -7.5, &[0u32][..])
    );
    select(&[-7.5], None, SelectRule::TopK { k: 1 }, &mut sel).unwrap();
    assert_eq!(sel.indices, vec![0]);
    // All equal: VaR keeps every row (all tie with the threshold); top-k keeps the first k.
    let equal = vec![2.0f32; 100];
    select(&equal, None, SelectRule::Var { alpha: 0.9 }, &mut sel).unwrap();
    assert_eq!((sel.k, sel.kept()), (10, 100));
    select(&equal, None, SelectRule::TopK { k: 10 }, &mut sel).unwrap();
    assert_eq!(sel.indices, (0..10).collect::<Vec<u32>>());
    // -0.0 equals +0.0: one tie group, threshold reported as +0.0.
    let zeros = [0.0f32, -0.0, -0.0, 0.0, -1.0];
    select(&zeros, None, SelectRule::Var { alpha: 0.5 }, &mut sel).unwrap();
    assert_eq!(
        (sel.k, sel.kept(), sel.threshold.to_bits()),
        (3, 4, 0.0f32.to_bits())
    );
    select(&zeros, None, SelectRule::TopK { k: 2 }, &mut sel).unwrap();
    assert_eq!(sel.indices, vec![0, 1]);
}

#[test]
fn infinities_and_negative_scores_are_ordinary() {
    let scores = [
        f32::NEG_INFINITY,
        -1e30,
        -3.0,
        f32::INFINITY,
        -0.5,
        f32::INFINITY,
        f32::MIN,
        f32::MAX,
    ];
    let mut sel = Selection::new();
    for k in 1..=scores.len() {
        select(&scores, None, SelectRule::TopK { k }, &mut sel).unwrap();
        check(&scores, None, SelectRule::TopK { k }, &sel, k);
    }
    select(&scores, None, SelectRule::Var { alpha: 0.875 }, &mut sel).unwrap();
    assert_eq!(
        (sel.k, sel.threshold, sel.indices.as_slice()),
        (1, f32::INFINITY, &[3u32, 5][..])
    );
    select(&scores, None, SelectRule::Var { alpha: 0.125 }, &mut sel).unwrap();
    assert_eq!((sel.k, sel.threshold, sel.kept()), (7, f32::MIN, 7));
}

#[test]
fn large_inputs_across_parallel_chunks() {
    let mut rng = rng(9);
    let mut sel = Selection::new();
    for (n, kind) in [
        (200_000usize, 0u8),
        (150_001, 1),
        (300_000, 5),
        (100_003, 2),
        (70_000, 4),
    ] {
        let scores = random_scores(&mut rng, n, kind);
        let valid: Vec<bool> = (0..n).map(|i| i % 5 != 3).collect();
        let m = valid.iter().filter(|&&v| v).count();
        for (num, den) in [(7u64, 10u64), (1, 1000), (999, 1000), (1, 2)] {
            let rule = SelectRule::Var {
                alpha: num as f64 / den as f64,
            };
            select(&scores, Some(&valid), rule, &mut sel).unwrap();
            check(&scores, Some(&valid), rule, &sel, exact_k(num, den, m));
        }
        // Top-k whose tie group spans many chunks (kinds 1 and 5), trimmed in row order.
        for k in [1, m / 3, m - 1, m] {
            select(&scores, Some(&valid), SelectRule::TopK { k }, &mut sel).unwrap();
            check(&scores, Some(&valid), SelectRule::TopK { k }, &sel, k);
        }
    }
}

#[test]
fn deterministic_across_runs_and_thread_counts() {
    let mut rng = rng(21);
    let scores = random_scores(&mut rng, 500_000, 1);
    let mut a = Selection::new();
    select(&scores, None, SelectRule::TopK { k: 123_457 }, &mut a).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut b = Selection::new();
    pool.install(|| select(&scores, None, SelectRule::TopK { k: 123_457 }, &mut b))
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn errors_in_documented_order() {
    let mut sel = Selection::new();
    select(&[1.0, 2.0], None, SelectRule::TopK { k: 1 }, &mut sel).unwrap();
    let before = sel.clone();
    let var = |alpha| SelectRule::Var { alpha };
    let err = |scores: &[f32], valid: Option<&[bool]>, rule, sel: &mut Selection| {
        select(scores, valid, rule, sel).unwrap_err()
    };
    assert!(matches!(
        err(&[1.0, 2.0], Some(&[true]), var(0.5), &mut sel),
        KernelError::Shape { what: "valid", .. }
    ));
    for alpha in [0.0, 1.0, -0.1, 1.5, f64::NAN, f64::INFINITY, -0.0] {
        assert!(
            matches!(err(&[1.0], None, var(alpha), &mut sel), KernelError::InvalidAlpha(a) if a.to_bits() == alpha.to_bits())
        );
    }
    let nan = f32::NAN;
    assert_eq!(
        err(&[1.0, nan, 2.0, nan], None, var(0.5), &mut sel),
        KernelError::NanScore { row: 1 }
    );
    assert_eq!(
        err(
            &[nan, 1.0, nan],
            Some(&[false, true, true]),
            var(0.5),
            &mut sel
        ),
        KernelError::NanScore { row: 2 }
    );
    // A NaN deep in a later parallel chunk is still reported at its lowest row.
    let mut big = vec![1.0f32; 100_000];
    big[70_001] = nan;
    big[99_999] = nan;
    assert_eq!(
        err(&big, None, SelectRule::TopK { k: 5 }, &mut sel),
        KernelError::NanScore { row: 70_001 }
    );
    assert_eq!(err(&[], None, var(0.5), &mut sel), KernelError::NoValidRows);
    assert_eq!(
        err(&[], None, SelectRule::TopK { k: 1 }, &mut sel),
        KernelError::NoValidRows
    );
    assert_eq!(
        err(&[nan, 1.0], Some(&[false, false]), var(0.5), &mut sel),
        KernelError::NoValidRows
    );
    assert_eq!(
        err(&[1.0, 2.0], None, SelectRule::TopK { k: 0 }, &mut sel),
        KernelError::InvalidK { k: 0, valid: 2 }
    );
    assert_eq!(
        err(
            &[1.0, 2.0, 3.0],
            Some(&[true, false, true]),
            SelectRule::TopK { k: 3 },
            &mut sel
        ),
        KernelError::InvalidK { k: 3, valid: 2 }
    );
    assert_eq!(
        var_keep_count(0.5, 0).unwrap_err(),
        KernelError::NoValidRows
    );
    assert_eq!(
        var_keep_count(1.0, 5).unwrap_err(),
        KernelError::InvalidAlpha(1.0)
    );
    assert_eq!(sel, before, "errors leave the output unchanged");
}
