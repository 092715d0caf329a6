//! Accuracy of the vectorisable `fast_exp` against f64 `exp`, and its special values.

use eslm_kernels::fast_exp::{fast_exp, EXP_HI, EXP_LO};

fn rel_err(x: f32) -> f64 {
    let exact = (x as f64).exp();
    ((fast_exp(x) as f64) - exact).abs() / exact
}

#[test]
fn relative_error_over_the_whole_range() {
    // Dense sweep of [EXP_LO, EXP_HI] (2^21 + 1 points) plus a fine bit-pattern sweep of [-1, 1].
    let steps = 1u32 << 21;
    let sweep = (0..=steps)
        .map(|i| (EXP_LO + (EXP_HI - EXP_LO) * (i as f32 / steps as f32)).clamp(EXP_LO, EXP_HI));
    let negative = ((-1.0f32).to_bits()..0x8000_0000u32 + 1)
        .rev()
        .step_by(997)
        .map(f32::from_bits);
    let positive = (0..=1.0f32.to_bits()).step_by(997).map(f32::from_bits);
    let mut worst = (0.0f64, 0.0f32);
    let mut count = 0usize;
    for x in sweep.chain(negative).chain(positive) {
        let e = rel_err(x);
        count += 1;
        if e > worst.0 {
            worst = (e, x);
        }
    }
    println!(
        "fast_exp: {count} points, worst relative error {:.3e} at x = {}",
        worst.0, worst.1
    );
    assert!(count > 3_000_000);
    assert!(
        worst.0 < 1.5e-7,
        "relative error {} at x = {}",
        worst.0,
        worst.1
    );
}

#[test]
fn subnormal_edge_and_exact_points() {
    assert_eq!(fast_exp(0.0), 1.0);
    assert_eq!(fast_exp(-0.0), 1.0);
    // Just above the flush point the result is the (normal or barely subnormal) true value.
    let x = EXP_LO;
    let exact = (x as f64).exp();
    assert!(
        ((fast_exp(x) as f64) - exact).abs() <= exact * 1e-6,
        "{} vs {exact}",
        fast_exp(x)
    );
}

#[test]
fn special_values() {
    assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(fast_exp(-1e30), 0.0);
    assert_eq!(fast_exp(-3.4e38), 0.0);
    assert_eq!(fast_exp(EXP_LO - 1e-3), 0.0);
    assert_eq!(fast_exp(f32::INFINITY), f32::INFINITY);
    assert_eq!(fast_exp(1e30), f32::INFINITY);
    assert_eq!(fast_exp(EXP_HI + 0.01), f32::INFINITY);
    assert!(fast_exp(f32::NAN).is_nan());
    assert!(fast_exp(-f32::NAN).is_nan());
    assert!(fast_exp(EXP_HI).is_finite());
}

#[test]
fn vectorised_loop_matches_scalar_calls() {
    // The same function inside a loop (auto-vectorised) must give bit-identical results.
    let xs: Vec<f32> = (0..4099)
        .map(|i| -90.0 + i as f32 * 0.0443)
        .chain([f32::NEG_INFINITY, f32::NAN])
        .collect();
    let ys: Vec<f32> = xs.iter().map(|&x| fast_exp(x)).collect();
    for (&x, &y) in xs.iter().zip(&ys) {
        let single = std::hint::black_box(fast_exp)(std::hint::black_box(x));
        assert!(
            single.to_bits() == y.to_bits() || (single.is_nan() && y.is_nan()),
            "x = {x}"
        );
    }
}
