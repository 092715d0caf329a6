//! GPT-2 initialisation: every weight matrix and embedding `~ N(0, 0.02)`, the residual projections
//! (`attprojw`, `fcprojw`) `~ N(0, 0.02/√(2L))`, biases 0, layer-norm weights 1. Padded `wte` rows stay 0.
//! Deterministic for a seed (ChaCha8, Box–Muller).

use crate::params::{ParamKind, ParamSet};
use crate::GptConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Standard deviation of the GPT-2 initialisation.
pub const INIT_STD: f32 = 0.02;

fn fill_normal(rng: &mut ChaCha8Rng, out: &mut [f32], std: f32) {
    let mut chunks = out.chunks_exact_mut(2);
    for pair in &mut chunks {
        let (z0, z1) = box_muller(rng);
        pair[0] = z0 * std;
        pair[1] = z1 * std;
    }
    if let [last] = chunks.into_remainder() {
        *last = box_muller(rng).0 * std;
    }
}

fn box_muller(rng: &mut ChaCha8Rng) -> (f32, f32) {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen::<f64>();
    let r = (-2.0 * u1.ln()).sqrt();
    let th = 2.0 * std::f64::consts::PI * u2;
    ((r * th.cos()) as f32, (r * th.sin()) as f32)
}

/// A freshly initialised parameter set for `cfg` (assumed valid).
pub fn gpt2_init(cfg: &GptConfig, seed: u64) -> ParamSet {
    let mut p = ParamSet::zeros(cfg);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let resid_std = INIT_STD / ((2 * cfg.n_layer) as f32).sqrt();
    let (v, c) = (cfg.vocab_size, cfg.n_embd);
    for k in ParamKind::ALL {
        let t = p.get_mut(k);
        match k {
            ParamKind::Wte => fill_normal(&mut rng, &mut t[..v * c], INIT_STD),
            ParamKind::AttProjW | ParamKind::FcProjW => fill_normal(&mut rng, t, resid_std),
            ParamKind::Ln1W | ParamKind::Ln2W | ParamKind::LnfW => {
                t.iter_mut().for_each(|x| *x = 1.0)
            }
            _ if k.decays() => fill_normal(&mut rng, t, INIT_STD),
            _ => {}
        }
    }
    p
}
