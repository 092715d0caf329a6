//! The distillation gradient (`eslm_kernels::kd`): finite differences of the loss in f64, the fast row function
//! against its f64 reference (V = 50257, masked and large logits, non-finite maxima), the W = 0 and identical
//! model limits, the batched entry point against the row function, padding writes, and argument errors.

use eslm_kernels::kd::{kd_grad, kd_row, kd_row_reference, KdParams};
use eslm_kernels::{KernelError, LogitsView};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn loss_only(student: &[f32], teacher: &[f32], y: usize, kd: KdParams) -> f64 {
    let mut g = vec![0.0f32; student.len()];
    kd_row(student, teacher, y, kd, 1.0, &mut g)
}

#[test]
fn row_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &(vocab, w, tau) in &[
        (7usize, 0.5, 1.0),
        (13, 0.3, 2.0),
        (5, 1.0, 0.5),
        (9, 0.0, 3.0),
    ] {
        let kd = KdParams {
            kd_weight: w,
            temperature: tau,
        };
        let student: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let teacher: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let y = rng.gen_range(0..vocab);
        let mut grad = vec![9.0f32; vocab + 3];
        let scale = 0.25f32;
        kd_row(&student, &teacher, y, kd, scale, &mut grad);
        assert!(grad[vocab..].iter().all(|&g| g == 0.0), "padding zeroed");
        for j in 0..vocab {
            let h = 1e-2f32;
            let (mut up, mut dn) = (student.clone(), student.clone());
            up[j] += h;
            dn[j] -= h;
            let fd = (loss_only(&up, &teacher, y, kd) - loss_only(&dn, &teacher, y, kd))
                / ((up[j] - dn[j]) as f64);
            let analytic = grad[j] as f64 / scale as f64;
            assert!(
                (fd - analytic).abs() <= 2e-4 + 1e-3 * fd.abs(),
                "V{vocab} W{w} τ{tau} j{j}: fd {fd} vs {analytic}"
            );
        }
    }
}

#[test]
fn fast_row_matches_the_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let kinds = [
        "ordinary",
        "large logits",
        "masked logits",
        "non-finite maximum",
    ];
    for vocab in [1usize, 7, 1000, 50257] {
        for (case, kind) in kinds.iter().enumerate() {
            for &(w, tau) in &[(0.0, 1.0), (0.4, 2.5), (1.0, 0.5), (0.7, 1.0)] {
                let kd = KdParams {
                    kd_weight: w,
                    temperature: tau,
                };
                let amp = if case == 1 { 80.0 } else { 8.0 };
                let mut z: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-amp..amp)).collect();
                let mut u: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-amp..amp)).collect();
                let y = rng.gen_range(0..vocab);
                if case == 2 && vocab > 2 {
                    // Masked columns (not the target): one masked in both models (-FLT_MAX-like in the student,
                    // -inf in the teacher), one in the teacher only.
                    let (j, k) = ((y + 1) % vocab, (y + 2) % vocab);
                    (z[j], u[j], u[k]) = (-3.0e38, f32::NEG_INFINITY, f32::NEG_INFINITY);
                }
                if case == 3 {
                    u[y] = f32::INFINITY;
                }
                let mut got = vec![7.0f32; vocab + 2];
                let mut want = vec![7.0f32; vocab + 2];
                let lg = kd_row(&z, &u, y, kd, 0.5, &mut got);
                let lw = kd_row_reference(&z, &u, y, kd, 0.5, &mut want);
                let what = format!("V{vocab} {kind} W{w} τ{tau}");
                if case == 3 {
                    // The fast path hands non-finite maxima to the reference: identical.
                    assert_eq!(lg.to_bits(), lw.to_bits(), "{what}: loss");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{what}: gradient");
                    continue;
                }
                assert!(
                    (lg - lw).abs() <= 1e-5 * lw.abs().max(1.0),
                    "{what}: loss {lg} vs {lw}"
                );
                for (j, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - r).abs() <= 2e-7 + 1e-5 * r.abs(),
                        "{what}: dz[{j}] {g} vs {r}"
                    );
                }
            }
        }
    }
}

#[test]
fn zero_weight_is_cross_entropy_and_kl_vanishes_for_identical_models() {
    let z = [0.5f32, -1.0, 2.0, 0.1];
    let mut g = [0.0f32; 4];
    let ce = KdParams {
        kd_weight: 0.0,
        temperature: 1.0,
    };
    let loss = kd_row(&z, &[9.0, 9.0, 9.0, 9.0], 2, ce, 1.0, &mut g);
    let lse = z.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
    // f32 arithmetic with f64 sums: the loss to ≈ 1e-7 relative.
    assert!((loss - (lse - 2.0)).abs() < 1e-6, "{loss} vs {}", lse - 2.0);
    let pure = KdParams {
        kd_weight: 1.0,
        temperature: 2.0,
    };
    assert!(kd_row(&z, &z, 2, pure, 1.0, &mut g).abs() < 1e-12);
    assert!(g.iter().all(|&x| x.abs() < 1e-7));
}

#[test]
fn batched_gradient_equals_the_row_function_on_kept_rows() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, vocab, stride, out_stride) = (9usize, 50usize, 56usize, 53usize);
    let s: Vec<f32> = (0..n * stride).map(|_| rng.gen_range(-4.0..4.0)).collect();
    let t: Vec<f32> = (0..n * stride).map(|_| rng.gen_range(-4.0..4.0)).collect();
    let targets: Vec<i32> = (0..n)
        .map(|i| if i == 2 { -100 } else { (i * 7 % vocab) as i32 })
        .collect();
    let kept = [0u32, 3, 8];
    let kd = KdParams {
        kd_weight: 0.4,
        temperature: 1.5,
    };
    let sv = LogitsView::new(&s, n, vocab, stride).unwrap();
    let tv = LogitsView::new(&t, n, vocab, stride).unwrap();
    let mut out = vec![f32::NAN; kept.len() * out_stride];
    let mean = kd_grad(&sv, &tv, &targets, &kept, kd, 0.5, &mut out, out_stride).unwrap();
    let mut want_sum = 0.0;
    for (i, &r) in kept.iter().enumerate() {
        let mut row = vec![0.0f32; out_stride];
        want_sum += kd_row(
            sv.row(r as usize),
            tv.row(r as usize),
            targets[r as usize] as usize,
            kd,
            0.5,
            &mut row,
        );
        assert_eq!(
            &out[i * out_stride..(i + 1) * out_stride],
            &row[..],
            "row {r}"
        );
    }
    assert!((mean as f64 - want_sum / 3.0).abs() < 1e-6);
    // K = 0 writes nothing and returns 0; an ignored kept row and a teacher of another shape are errors.
    assert_eq!(
        kd_grad(&sv, &tv, &targets, &[], kd, 1.0, &mut [], out_stride).unwrap(),
        0.0
    );
    let err = kd_grad(&sv, &tv, &targets, &[2], kd, 1.0, &mut out, out_stride).unwrap_err();
    assert!(
        matches!(err, KernelError::KeptTargetOutOfRange { row: 2, .. }),
        "{err}"
    );
    let short = LogitsView::new(&t[..8 * stride], 8, vocab, stride).unwrap();
    assert!(matches!(
        kd_grad(&sv, &short, &targets, &kept, kd, 1.0, &mut out, out_stride),
        Err(KernelError::Shape { .. })
    ));
    let bad = KdParams {
        kd_weight: 1.5,
        temperature: 1.0,
    };
    assert!(kd_grad(&sv, &tv, &targets, &kept, bad, 1.0, &mut out, out_stride).is_err());
}
