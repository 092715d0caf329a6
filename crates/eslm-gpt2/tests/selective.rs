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
    let cfg = small_cfg();
    let (b, t) = (3, 7);
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
