//! The cross-rank VaR threshold (`global_select`) against a sort-based reference and against `select` on the
//! concatenated scores: ties, ±inf, ±0, N = 1, invalid rows, NaN, and ranks simulated by threads whose
//! histograms are summed through a shared buffer (the same reduction an all-reduce performs).

use std::sync::{Barrier, Mutex};

use eslm_kernels::global_select::{global_threshold, ScorePart};
use eslm_kernels::select::{select, var_keep_count, SelectRule, Selection};
use eslm_kernels::KernelError;
use proptest::prelude::*;

/// k-th largest valid score by sorting (f64 comparison; -0.0 reported as +0.0).
fn reference(scores: &[f32], valid: &[bool], alpha: f64) -> (f32, usize) {
    let mut v: Vec<f32> = scores
        .iter()
        .zip(valid)
        .filter(|(_, &ok)| ok)
        .map(|(&s, _)| s)
        .collect();
    v.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let k = var_keep_count(alpha, v.len()).unwrap();
    (v[k - 1] + 0.0, k)
}

/// Runs `global_threshold` on `ranks` threads, rank r holding `parts[r]`, with a summing reduction.
fn simulated(
    parts: Vec<Vec<(Vec<f32>, Vec<bool>)>>,
    alpha: f64,
) -> Vec<Result<(f32, usize, usize), KernelError>> {
    let ranks = parts.len();
    let barrier = Barrier::new(ranks);
    let sum: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(rank, mine)| {
                let (barrier, sum) = (&barrier, &sum);
                s.spawn(move || {
                    let views: Vec<ScorePart> = mine
                        .iter()
                        .map(|(sc, va)| ScorePart {
                            scores: sc,
                            valid: Some(va),
                        })
                        .collect();
                    let mut reduce = |buf: &mut [u32]| {
                        barrier.wait();
                        {
                            let mut acc = sum.lock().unwrap();
                            if acc.is_empty() {
                                acc.resize(buf.len(), 0);
                            }
                            acc.iter_mut().zip(buf.iter()).for_each(|(a, &b)| *a += b);
                        }
                        barrier.wait();
                        buf.copy_from_slice(&sum.lock().unwrap());
                        barrier.wait();
                        if rank == 0 {
                            sum.lock().unwrap().clear();
                        }
                        barrier.wait();
                        Ok(())
                    };
                    global_threshold(&views, alpha, &mut reduce)
                        .map(|g| (g.threshold, g.k, g.valid))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn score_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => (-3i32..4).prop_map(|x| x as f32 * 0.5), // many ties
        3 => any::<f32>().prop_filter("no NaN", |x| !x.is_nan()),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(-0.0f32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn equals_sort_reference_and_select_across_ranks(
        rows in prop::collection::vec((score_strategy(), prop::bool::weighted(0.85)), 1..300),
        ranks in 1usize..4,
        parts_per_rank in 1usize..3,
        alpha in 0.01f64..0.99,
    ) {
        let (scores, valid): (Vec<f32>, Vec<bool>) = rows.iter().cloned().unzip();
        prop_assume!(valid.iter().any(|&v| v));
        let (want, k) = reference(&scores, &valid, alpha);
        let mut one = Selection::new();
        select(&scores, Some(&valid), SelectRule::Var { alpha }, &mut one).unwrap();
        prop_assert_eq!(one.threshold.to_bits(), want.to_bits());
        // Split rows round-robin into ranks × parts.
        let pieces = ranks * parts_per_rank;
        let mut parts: Vec<Vec<(Vec<f32>, Vec<bool>)>> =
            vec![vec![(Vec::new(), Vec::new()); parts_per_rank]; ranks];
        for (i, (&s, &v)) in scores.iter().zip(&valid).enumerate() {
            let p = i % pieces;
            let part = &mut parts[p / parts_per_rank][p % parts_per_rank];
            part.0.push(s);
            part.1.push(v);
        }
        let m = valid.iter().filter(|&&v| v).count();
        for got in simulated(parts, alpha) {
            let (th, gk, gm) = got.unwrap();
            prop_assert_eq!(th.to_bits(), want.to_bits(), "threshold");
            prop_assert_eq!((gk, gm), (k, m));
        }
    }
}

#[test]
fn one_row_ties_and_infinities() {
    let one = [ScorePart {
        scores: &[2.5],
        valid: None,
    }];
    let g = global_threshold(&one, 0.5, &mut |_| Ok(())).unwrap();
    assert_eq!((g.threshold, g.k, g.valid), (2.5, 1, 1));
    let tied = [1.0f32; 7];
    let g = global_threshold(
        &[ScorePart {
            scores: &tied,
            valid: None,
        }],
        0.7,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!((g.threshold, g.k), (1.0, 3));
    let inf = [f32::NEG_INFINITY, f32::INFINITY, -0.0, 0.0];
    let g = global_threshold(
        &[ScorePart {
            scores: &inf,
            valid: None,
        }],
        0.75,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(g.threshold, f32::INFINITY);
    let g = global_threshold(
        &[ScorePart {
            scores: &inf,
            valid: None,
        }],
        0.01,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(g.threshold, f32::NEG_INFINITY);
}

#[test]
fn nan_on_any_rank_is_an_error_on_every_rank() {
    let parts = vec![
        vec![(vec![1.0f32, 2.0], vec![true, true])],
        vec![(vec![f32::NAN, 3.0], vec![true, true])],
    ];
    for r in simulated(parts, 0.5) {
        assert_eq!(r.unwrap_err(), KernelError::NanScores { count: 1 });
    }
    // NaN in an invalid row is never inspected.
    let g = global_threshold(
        &[ScorePart {
            scores: &[f32::NAN, 1.0],
            valid: Some(&[false, true]),
        }],
        0.5,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(g.threshold, 1.0);
}

#[test]
fn errors_are_typed() {
    let s = [1.0f32];
    let none = [ScorePart {
        scores: &s,
        valid: Some(&[false]),
    }];
    assert_eq!(
        global_threshold(&none, 0.5, &mut |_| Ok(())).unwrap_err(),
        KernelError::NoValidRows
    );
    let bad = [ScorePart {
        scores: &s,
        valid: Some(&[true, true]),
    }];
    assert!(matches!(
        global_threshold(&bad, 0.5, &mut |_| Ok(())),
        Err(KernelError::Shape { .. })
    ));
    let ok = [ScorePart {
        scores: &s,
        valid: None,
    }];
    assert_eq!(
        global_threshold(&ok, 1.0, &mut |_| Ok(())).unwrap_err(),
        KernelError::InvalidAlpha(1.0)
    );
    let failing = global_threshold(&ok, 0.5, &mut |_| Err("rank 1 died".into())).unwrap_err();
    assert_eq!(failing, KernelError::Reduce("rank 1 died".into()));
}
