//! Shared helpers for the engine tests: seeded random data and an f64 reference cross-entropy.
#![allow(dead_code)]

use eslm_gpt2::{Gpt2, GptConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded RNG.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` uniform values in [-scale, scale] as f64.
pub fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Random tokens `< v`.
pub fn rand_tokens(rng: &mut ChaCha8Rng, n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(0..v as u32)).collect()
}

/// Mean cross-entropy over `kept` rows (f64) and its gradient w.r.t. the kept rows' logits, compact `[K, Vp]`
/// (padded columns zero), scaled by `1/K`.
pub fn ce_kept(
    logits: &[f32],
    vp: usize,
    v: usize,
    targets: &[u32],
    kept: &[u32],
) -> (f64, Vec<f32>) {
    let k = kept.len();
    let mut d = vec![0.0f32; k * vp];
    let mut loss = 0.0;
    for (j, &r) in kept.iter().enumerate() {
        let row = &logits[r as usize * vp..r as usize * vp + v];
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        let lse = m + s.ln();
        let y = targets[r as usize] as usize;
        loss += lse - row[y] as f64;
        for c in 0..v {
            let p = (row[c] as f64 - lse).exp();
            let g = p - if c == y { 1.0 } else { 0.0 };
            d[j * vp + c] = (g / k as f64) as f32;
        }
    }
    (loss / k as f64, d)
}

/// Mean CE over kept rows of a fresh inference forward (f64 accumulation).
pub fn loss_of(
    model: &mut Gpt2,
    inputs: &[u32],
    targets: &[u32],
    kept: &[u32],
    b: usize,
    t: usize,
) -> f64 {
    let cfg = *model.config();
    let view = model.forward_inference(inputs, b, t).unwrap();
    let logits = view.data().to_vec();
    ce_kept(
        &logits,
        cfg.padded_vocab_size,
        cfg.vocab_size,
        targets,
        kept,
    )
    .0
}

/// A tiny config with a vocabulary that is not a multiple of the padding.
pub fn small_cfg() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        vocab_size: 37,
        padded_vocab_size: 64,
        max_seq_len: 12,
    }
}
