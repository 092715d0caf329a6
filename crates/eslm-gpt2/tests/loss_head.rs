//! The engine's loss head (`forward_stats` → `select` → `ce_grad` → `backward_selected`) and optimizer step
//! (`clip_and_update`) give bitwise the gradients and parameters of the host path (host token statistics,
//! selection and sparse CE, then `backward_sparse`; host AdamW), and the same bits as the engine before the
//! `Backend` refactor (checksums captured from that code).

use eslm_gpt2::{clip_grad_norm, AdamW, AdamWConfig, Gpt2, GptConfig, Keep, ParamSet, ScoreSource};
use eslm_kernels::select::{select, SelectRule, Selection};
use eslm_kernels::sparse_ce::sparse_ce;
use eslm_kernels::token_stats::{token_stats, TokenStats, DEFAULT_IGNORE_INDEX};

const B: usize = 3;
const T: usize = 8;

fn batch(cfg: &GptConfig) -> (Vec<u32>, Vec<i32>) {
    let v = cfg.vocab_size;
    let inputs = (0..B * T).map(|i| ((i * 7919 + 13) % v) as u32).collect();
    let targets = (0..B * T)
        .map(|i| {
            if i % 7 == 3 {
                DEFAULT_IGNORE_INDEX
            } else {
                ((i * 104_729 + 5) % v) as i32
            }
        })
        .collect();
    (inputs, targets)
}

/// FNV-1a over the bit patterns.
fn checksum(x: &[f32]) -> u64 {
    x.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn engine_path(keep: Keep) -> (ParamSet, ParamSet) {
    let cfg = GptConfig::tiny();
    let (inputs, targets) = batch(&cfg);
    let mut model = Gpt2::new(cfg, B, T, 11).unwrap();
    model.zero_grad();
    model.forward_stats(&inputs, &targets, B, T).unwrap();
    let k = model.select(ScoreSource::Loss, keep).unwrap().indices.len();
    model.ce_grad(1.0 / k as f32).unwrap();
    model.backward_selected().unwrap();
    let grads = model.grads().clone();
    model
        .clip_and_update(AdamWConfig::default(), 1e-3, 0.5)
        .unwrap();
    (grads, model.params().clone())
}

fn host_path(rule: Option<SelectRule>) -> (ParamSet, ParamSet) {
    let cfg = GptConfig::tiny();
    let (inputs, targets) = batch(&cfg);
    let mut model = Gpt2::new(cfg, B, T, 11).unwrap();
    model.zero_grad();
    let logits = model.forward(&inputs, B, T).unwrap();
    let mut stats = TokenStats::new();
    token_stats(&logits, &targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
    let mut sel = Selection::new();
    let kept: Vec<u32> = match rule {
        Some(rule) => {
            select(&stats.loss, Some(&stats.valid), rule, &mut sel).unwrap();
            sel.indices.clone()
        }
        None => (0..(B * T) as u32)
            .filter(|&i| stats.valid[i as usize])
            .collect(),
    };
    let vp = cfg.padded_vocab_size;
    let mut dz = vec![0.0f32; kept.len() * vp];
    let scale = 1.0 / kept.len() as f32;
    sparse_ce(&logits, &targets, &stats.lse, &kept, scale, &mut dz, vp).unwrap();
    model.backward_sparse(&kept, &dz).unwrap();
    let grads = model.grads().clone();
    clip_grad_norm(model.grads_mut(), 0.5);
    let mut opt = AdamW::new(AdamWConfig::default(), model.params()).unwrap();
    let (p, g) = model.params_and_grads_mut();
    opt.update(p, g, 1e-3).unwrap();
    (grads, model.params().clone())
}

fn assert_bitwise(what: &str, a: &ParamSet, b: &ParamSet) {
    let same = a
        .as_slice()
        .iter()
        .zip(b.as_slice())
        .all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same && a.len() == b.len(), "{what} differ");
}

#[test]
fn selective_loss_head_equals_host_path_bitwise() {
    let rule = SelectRule::Var { alpha: 0.6 };
    let (g_engine, p_engine) = engine_path(Keep::Rule(rule));
    let (g_host, p_host) = host_path(Some(rule));
    assert_bitwise("gradients", &g_engine, &g_host);
    assert_bitwise("updated parameters", &p_engine, &p_host);
    let sums = (checksum(g_engine.as_slice()), checksum(p_engine.as_slice()));
    if captured_kernels() {
        assert_eq!(sums, SELECTIVE);
    }
}

#[test]
fn clm_loss_head_equals_host_path_bitwise() {
    let (g_engine, p_engine) = engine_path(Keep::AllValid);
    let (g_host, p_host) = host_path(None);
    assert_bitwise("gradients", &g_engine, &g_host);
    assert_bitwise("updated parameters", &p_engine, &p_host);
    let sums = (checksum(g_engine.as_slice()), checksum(p_engine.as_slice()));
    if captured_kernels() {
        assert_eq!(sums, CLM);
    }
}

/// `(gradients, updated parameters)` checksums of the engine before the `Backend` refactor (commit "gemm 0.19
/// with x86-v4", this test file), on an AVX-512 CPU. GEMM results depend on the kernels `gemm` picks, so the
/// checksums are only compared where the same (AVX-512) kernels run; the host-path comparison above holds
/// everywhere.
const SELECTIVE: (u64, u64) = (9_066_048_919_346_770_782, 5_289_230_730_439_605_391);
const CLM: (u64, u64) = (584_666_365_928_049_637, 12_796_978_637_609_108_021);

fn captured_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
