//! Hierarchical ESLM's reuse of the shallow pass: `forward_prefix_stats` (the first E blocks over the whole
//! batch, activations kept) then `forward_sequences_stats` for the kept sequences gives the statistics, the kept
//! set and the gradients of a fresh `forward_stats` on those sequences — for E = 1, L − 1 and L, and for kept
//! sets at the start, the end, the middle, all sequences and a single one — while the realized FLOPs drop by the
//! first E blocks of the kept sequences. Without a matching shallow pass it falls back to the full forward.

mod common;

use eslm_gpt2::{Gpt2, GptConfig, Keep, ParamSet, ScoreSource};
use eslm_kernels::select::SelectRule;
use eslm_kernels::token_stats::DEFAULT_IGNORE_INDEX;

const B: usize = 5;
const T: usize = 7;

fn config() -> GptConfig {
    GptConfig {
        n_layer: 3,
        ..common::small_cfg()
    }
}

fn batch(cfg: &GptConfig, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut r = common::rng(seed);
    let inputs = common::rand_tokens(&mut r, B * T, cfg.vocab_size);
    let targets = common::rand_tokens(&mut r, B * T, cfg.vocab_size)
        .into_iter()
        .enumerate()
        .map(|(i, y)| {
            if i % 5 == 2 {
                DEFAULT_IGNORE_INDEX
            } else {
                y as i32
            }
        })
        .collect();
    (inputs, targets)
}

/// Bit patterns (ignored rows hold NaN statistics).
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Largest difference of two statistics vectors (NaN where both are NaN counts as equal; a NaN on one side only
/// as infinite).
fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x.is_nan(), y.is_nan()) {
            (true, true) => 0.0,
            (false, false) => (x - y).abs(),
            _ => f32::INFINITY,
        })
        .fold(0.0, f32::max)
}

fn pick<T: Copy>(x: &[T], seqs: &[usize]) -> Vec<T> {
    seqs.iter()
        .flat_map(|&s| x[s * T..(s + 1) * T].iter().copied())
        .collect()
}

/// Loss, entropy, kept rows and gradients after one selective step of `model`'s current forward.
fn step_result(model: &mut Gpt2) -> (Vec<f32>, Vec<f32>, Vec<u32>, ParamSet) {
    let stats = (model.stats().loss.clone(), model.stats().entropy.clone());
    let keep = Keep::Rule(SelectRule::Var { alpha: 0.4 });
    let kept = model
        .select(ScoreSource::Loss, keep)
        .unwrap()
        .indices
        .clone();
    model.ce_grad(1.0 / kept.len().max(1) as f32).unwrap();
    model.backward_selected().unwrap();
    (stats.0, stats.1, kept, model.grads().clone())
}

#[test]
fn continuing_the_shallow_pass_equals_a_fresh_forward() {
    let cfg = config();
    let (inputs, targets) = batch(&cfg, 3);
    let kept_sets: [&[usize]; 6] = [
        &[0, 1],
        &[3, 4],
        &[1, 3],
        &[0, 1, 2, 3, 4],
        &[2],
        &[0, 2, 4],
    ];
    for exit in [1, cfg.n_layer - 1, cfg.n_layer] {
        for seqs in kept_sets {
            let fresh_model = Gpt2::new(cfg, B, T, 5).unwrap();
            let (ki, kt) = (pick(&inputs, seqs), pick(&targets, seqs));

            let mut reference = fresh_model.clone();
            reference.zero_grad();
            reference.forward_stats(&ki, &kt, seqs.len(), T).unwrap();
            let want_flops = reference.realized_flops().forward;
            let want = step_result(&mut reference);

            let mut reuse = fresh_model.clone();
            reuse.zero_grad();
            reuse
                .forward_prefix_stats(&inputs, &targets, B, T, exit)
                .unwrap();
            reuse.forward_sequences_stats(seqs, &ki, &kt, T).unwrap();
            let got_flops = reuse.realized_flops().forward;
            let got = step_result(&mut reuse);

            let what = format!("exit {exit}, kept sequences {seqs:?}");
            // The matrix products of fewer rows may round differently in the last bit (blocking depends on
            // the row count), so the statistics agree to rounding, not bitwise.
            assert!(
                worst(&got.0, &want.0) <= 1e-5,
                "{what}: loss {:?} vs {:?}",
                got.0,
                want.0
            );
            assert!(worst(&got.1, &want.1) <= 1e-5, "{what}: entropy");
            assert_eq!(got.2, want.2, "{what}: kept rows");
            let g = worst(got.3.as_slice(), want.3.as_slice());
            assert!(g <= 1e-6, "{what}: gradients differ by {g}");
            // The continuation skips the first E blocks of the kept sequences.
            assert!(
                got_flops < want_flops,
                "{what}: continuation {got_flops} FLOPs vs fresh {want_flops}"
            );
        }
    }
}

#[test]
fn without_a_matching_shallow_pass_the_full_forward_runs() {
    let cfg = config();
    let (inputs, targets) = batch(&cfg, 4);
    let seqs = [1usize, 4];
    let (ki, kt) = (pick(&inputs, &seqs), pick(&targets, &seqs));
    let mut reference = Gpt2::new(cfg, B, T, 6).unwrap();
    reference.forward_stats(&ki, &kt, 2, T).unwrap();
    let want = reference.stats().loss.clone();
    let full_flops = reference.realized_flops().forward;

    // Another forward since the shallow pass: no reuse, same result.
    let mut m = Gpt2::new(cfg, B, T, 6).unwrap();
    m.forward_prefix_stats(&inputs, &targets, B, T, 1).unwrap();
    m.forward_scores(&inputs, &targets, B, T, None).unwrap();
    m.forward_sequences_stats(&seqs, &ki, &kt, T).unwrap();
    assert_eq!(bits(&m.stats().loss), bits(&want));
    assert_eq!(m.realized_flops().forward, full_flops);

    // Ids that are not those sequences of the shallow batch: no reuse, the given ids are trained.
    let mut m = Gpt2::new(cfg, B, T, 6).unwrap();
    m.forward_prefix_stats(&inputs, &targets, B, T, 1).unwrap();
    m.forward_sequences_stats(&[0, 4], &ki, &kt, T).unwrap();
    assert_eq!(bits(&m.stats().loss), bits(&want));
    assert_eq!(m.realized_flops().forward, full_flops);

    // A shallow pass is continued once.
    let mut m = Gpt2::new(cfg, B, T, 6).unwrap();
    m.forward_prefix_stats(&inputs, &targets, B, T, 2).unwrap();
    m.forward_sequences_stats(&seqs, &ki, &kt, T).unwrap();
    assert!(m.realized_flops().forward < full_flops);
    m.forward_sequences_stats(&seqs, &ki, &kt, T).unwrap();
    assert_eq!(m.realized_flops().forward, full_flops);
    assert_eq!(bits(&m.stats().loss), bits(&want));
}
