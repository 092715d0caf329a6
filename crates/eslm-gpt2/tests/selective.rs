//! The selective (row-sparse) backward equals the dense backward of the masked mean loss (zero gradient for
//! unselected rows), for random keep masks including K = 1 and K = N; and the model's dense gradient matches
//! central finite differences of the loss.

mod common;
use common::*;
use eslm_gpt2::{Gpt2, ParamSet};
use rand::seq::index::sample;

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = a
        .iter()
        .chain(b)
        .fold(0.0f64, |m, &x| m.max((x as f64).abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn grads_dense_vs_sparse(
    model: &mut Gpt2,
    inputs: &[u32],
    targets: &[u32],
    kept: &[u32],
    b: usize,
    t: usize,
) {
    let cfg = *model.config();
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size);
    let n = b * t;
    let logits = model.forward(inputs, b, t).unwrap().data().to_vec();
    let (_, dk) = ce_kept(&logits, vp, v, targets, kept);
    // Dense: scatter into a full [N, Vp] gradient with zero rows for unselected tokens.
    let mut full = vec![0.0f32; n * vp];
    for (j, &r) in kept.iter().enumerate() {
        full[r as usize * vp..(r as usize + 1) * vp].copy_from_slice(&dk[j * vp..(j + 1) * vp]);
    }
    model.zero_grad();
    model.backward(&full).unwrap();
    let dense: ParamSet = model.grads().clone();
    model.zero_grad();
    model.backward_sparse(kept, &dk).unwrap();
    let sparse = model.grads();
    for ((name, _, a), (_, _, b)) in dense.tensors().zip(sparse.tensors()) {
        let e = rel_err(a, b);
        assert!(e <= 1e-5, "{name}: rel err {e:e} with K = {}", kept.len());
    }
    let fl = model.realized_flops();
    if kept.len() < n {
        assert!(fl.backward_row_sparse > 0.0);
    }
}

#[test]
fn selective_backward_matches_masked_dense() {
    let other = eslm_gpt2::GptConfig {
        n_layer: 3,
        n_head: 3,
        n_embd: 12,
        vocab_size: 50,
        padded_vocab_size: 64,
        max_seq_len: 9,
    };
    for (cfg, b, t) in [(small_cfg(), 3, 7), (other, 2, 9), (other, 1, 1)] {
        check_config(cfg, b, t);
    }
}

fn check_config(cfg: eslm_gpt2::GptConfig, b: usize, t: usize) {
    let n = b * t;
    let mut model = Gpt2::new(cfg, b, t, 7).unwrap();
    let mut r = rng(1);
    for trial in 0..6 {
        let inputs = rand_tokens(&mut r, n, cfg.vocab_size);
        let targets = rand_tokens(&mut r, n, cfg.vocab_size);
        let k = match trial {
            0 => 1,
            1 => n,
            _ => 1 + (trial * 5) % n,
        };
        let mut kept: Vec<u32> = sample(&mut r, n, k).into_iter().map(|x| x as u32).collect();
        kept.sort_unstable();
        grads_dense_vs_sparse(&mut model, &inputs, &targets, &kept, b, t);
    }
}

#[test]
fn realized_flops_follow_the_row_sets() {
    let cfg = small_cfg();
    let (b, t) = (2, 6);
    let n = b * t;
    let (l, c, v, vp) = (
        cfg.n_layer as f64,
        cfg.n_embd as f64,
        cfg.vocab_size as f64,
        cfg.padded_vocab_size,
    );
    let mut model = Gpt2::new(cfg, b, t, 1).unwrap();
    let inputs = vec![1u32; n];
    model.forward(&inputs, b, t).unwrap();
    let nf = n as f64;
    // Linear layers 24·C² per token per layer, attention 4·B·T²·C per layer (full T×T products), LM head.
    let fwd = nf * l * 24.0 * c * c + l * 4.0 * (b * t * t) as f64 * c + 2.0 * nf * c * v;
    assert!((model.realized_flops().forward - fwd).abs() < 1e-6 * fwd);
    assert_eq!(
        model.forward_shallow_flops(b, t, cfg.n_layer),
        model.realized_flops().forward
    );
    let long = eslm_gpt2::ops::attention::AttnDims {
        b: 1,
        t: 70,
        c: 8,
        nh: 2,
    };
    // Blocks of 32 query rows: rows 0..32 × 32 keys, 32..64 × 64, 64..70 × 70.
    let want = 4.0 * 8.0 * (32.0 * 32.0 + 32.0 * 64.0 + 6.0 * 70.0);
    assert_eq!(eslm_gpt2::ops::attention::forward_flops(long), want);
    let kept = [2u32, 7];
    model.backward_sparse(&kept, &vec![0.0; 2 * vp]).unwrap();
    let fl = model.realized_flops();
    assert_eq!(fl.backward_head, 4.0 * 2.0 * c * v);
    // Last block's fcproj, fc, attproj on K = 2 rows: 4·K·(4C·C + C·4C + C·C).
    assert_eq!(fl.backward_row_sparse, 4.0 * 2.0 * 9.0 * c * c);
    let paper = model.paper_flops(n, 0.5);
    let p = cfg.num_params_unpadded() as f64;
    assert_eq!(paper, nf * (2.0 * p + 2.0 * p));
    model.backward(&vec![0.0; n * vp]).unwrap();
    let dense = model.realized_flops();
    assert_eq!(dense.backward_row_sparse, 0.0);
    assert_eq!(dense.backward_head, 4.0 * nf * c * v);
    assert!(dense.backward_dense > fl.backward_dense);
}

#[test]
fn dense_gradient_matches_finite_differences() {
    let cfg = small_cfg();
    let (b, t) = (2, 5);
    let n = b * t;
    let mut model = Gpt2::new(cfg, b, t, 3).unwrap();
    let mut r = rng(2);
    let inputs = rand_tokens(&mut r, n, cfg.vocab_size);
    let targets = rand_tokens(&mut r, n, cfg.vocab_size);
    let kept: Vec<u32> = vec![0, 3, 4, 8];
    let logits = model.forward(&inputs, b, t).unwrap().data().to_vec();
    let (_, dk) = ce_kept(
        &logits,
        cfg.padded_vocab_size,
        cfg.vocab_size,
        &targets,
        &kept,
    );
    model.zero_grad();
    model.backward_sparse(&kept, &dk).unwrap();
    let grads = model.grads().clone();
    let names: Vec<&str> = grads.tensors().map(|(n, _, _)| n).collect();
    for (ti, name) in names.iter().enumerate() {
        let g = grads.tensors().nth(ti).unwrap().2.to_vec();
        // Probe the 3 largest-gradient entries of each tensor (well above f32 noise).
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&i, &j| g[j].abs().total_cmp(&g[i].abs()));
        for &i in idx.iter().take(3) {
            let h = 1e-2f32;
            let orig = model.params_mut().tensors_mut().nth(ti).unwrap().2[i];
            model.params_mut().tensors_mut().nth(ti).unwrap().2[i] = orig + h;
            let lp = loss_of(&mut model, &inputs, &targets, &kept, b, t);
            model.params_mut().tensors_mut().nth(ti).unwrap().2[i] = orig - h;
            let lm = loss_of(&mut model, &inputs, &targets, &kept, b, t);
            model.params_mut().tensors_mut().nth(ti).unwrap().2[i] = orig;
            let fd = (lp - lm) / (2.0 * h as f64);
            let an = g[i] as f64;
            let err = (fd - an).abs() / (fd.abs().max(an.abs()).max(1e-3));
            assert!(
                err < 3e-2,
                "{name}[{i}]: analytic {an:e} vs fd {fd:e} (rel {err:e})"
            );
        }
    }
}
