//! Model-level behaviour: padded vocabulary never changes results, the kernel-based step path equals the
//! reference loss/gradient, shallow forwards match the full forward's prefix, bad inputs give typed errors.

mod common;
use common::*;
use eslm_gpt2::{Gpt2, Gpt2Error, GptConfig, ParamKind, Selector, StepWorkspace, TokenScore};
use eslm_kernels::select::SelectRule;

#[test]
fn padded_vocab_never_changes_results() {
    let base = small_cfg();
    let wide = GptConfig {
        padded_vocab_size: 128,
        ..base
    };
    let (b, t) = (2, 6);
    let mut r = rng(3);
    let inputs = rand_tokens(&mut r, b * t, base.vocab_size);
    let targets: Vec<i32> = rand_tokens(&mut r, b * t, base.vocab_size)
        .iter()
        .map(|&x| x as i32)
        .collect();
    let mut m1 = Gpt2::new(base, b, t, 9).unwrap();
    let mut m2 = Gpt2::new(wide, b, t, 9).unwrap();
    // Garbage in the padded rows of the wider model must not matter either.
    let (v, c) = (base.vocab_size, base.n_embd);
    m2.params_mut().get_mut(ParamKind::Wte)[v * c..]
        .iter_mut()
        .for_each(|x| *x = 1e3);
    let sel = Selector::Select {
        score: TokenScore::Loss,
        rule: SelectRule::Var { alpha: 0.5 },
    };
    let (mut w1, mut w2) = (StepWorkspace::new(), StepWorkspace::new());
    m1.zero_grad();
    m2.zero_grad();
    let r1 = m1
        .loss_and_backward(&mut w1, &inputs, &targets, b, t, sel)
        .unwrap();
    let r2 = m2
        .loss_and_backward(&mut w2, &inputs, &targets, b, t, sel)
        .unwrap();
    assert_eq!(r1, r2);
    let (l1, l2) = (m1.logits().unwrap(), m2.logits().unwrap());
    for i in 0..b * t {
        assert_eq!(l1.row(i), l2.row(i));
    }
    for ((name, _, g1), (_, _, g2)) in m1.grads().tensors().zip(m2.grads().tensors()) {
        let g2 = if name == "wte" { &g2[..v * c] } else { g2 };
        assert_eq!(
            &g1[..g2.len().min(g1.len())],
            &g2[..g2.len().min(g1.len())],
            "{name}"
        );
        if name == "wte" {
            assert!(m2.grads().get(ParamKind::Wte)[v * c..]
                .iter()
                .all(|&x| x == 0.0));
        }
    }
}

#[test]
fn step_path_matches_reference_ce() {
    let cfg = small_cfg();
    let (b, t) = (2, 8);
    let n = b * t;
    let mut r = rng(4);
    let inputs = rand_tokens(&mut r, n, cfg.vocab_size);
    let mut targets: Vec<i32> = rand_tokens(&mut r, n, cfg.vocab_size)
        .iter()
        .map(|&x| x as i32)
        .collect();
    targets[3] = -100; // ignored row
    let mut model = Gpt2::new(cfg, b, t, 5).unwrap();
    let mut ws = StepWorkspace::new();
    for (sel, k) in [
        (Selector::All, n - 1),
        (
            Selector::Select {
                score: TokenScore::Loss,
                rule: SelectRule::TopK { k: 5 },
            },
            5,
        ),
        (
            Selector::Select {
                score: TokenScore::Entropy,
                rule: SelectRule::TopK { k: 1 },
            },
            1,
        ),
    ] {
        model.zero_grad();
        let rep = model
            .loss_and_backward(&mut ws, &inputs, &targets, b, t, sel)
            .unwrap();
        assert_eq!(rep.kept, k);
        assert_eq!(rep.valid, n - 1);
        let kept = ws.selection.indices.clone();
        assert!(!kept.contains(&3));
        let got = model.grads().clone();
        let logits = model.logits().unwrap().data().to_vec();
        let tu: Vec<u32> = targets.iter().map(|&x| x.max(0) as u32).collect();
        let (loss, dk) = ce_kept(&logits, cfg.padded_vocab_size, cfg.vocab_size, &tu, &kept);
        assert!(
            (loss - rep.loss_kept).abs() < 1e-4 * loss.abs().max(1.0),
            "{loss} vs {}",
            rep.loss_kept
        );
        model.zero_grad();
        model.backward_sparse(&kept, &dk).unwrap();
        for ((name, _, a), (_, _, bb)) in got.tensors().zip(model.grads().tensors()) {
            let scale = a.iter().fold(1e-12f32, |m, &x| m.max(x.abs()));
            let diff = a
                .iter()
                .zip(bb)
                .fold(0.0f32, |m, (&x, &y)| m.max((x - y).abs()));
            assert!(diff / scale < 1e-4, "{name}: {}", diff / scale);
        }
    }
}

#[test]
fn shallow_forward_at_full_depth_equals_forward() {
    let cfg = small_cfg();
    let (b, t) = (2, 5);
    let mut r = rng(6);
    let inputs = rand_tokens(&mut r, b * t, cfg.vocab_size);
    let mut model = Gpt2::new(cfg, b, t, 1).unwrap();
    let full = model.forward(&inputs, b, t).unwrap().data().to_vec();
    let inf = model
        .forward_inference(&inputs, b, t)
        .unwrap()
        .data()
        .to_vec();
    assert_eq!(full, inf);
    let shallow = model
        .forward_shallow(&inputs, b, t, 1)
        .unwrap()
        .data()
        .to_vec();
    assert_ne!(full, shallow);
    // A shallow pass keeps no activations for a backward.
    assert_eq!(
        model.backward_sparse(&[0], &vec![0.0; cfg.padded_vocab_size]),
        Err(Gpt2Error::NoForward)
    );
    // Smaller batches than the maximum reuse the buffers.
    let one = model.forward(&inputs[..t], 1, t).unwrap().data().to_vec();
    // (GEMM blocking depends on the row count, so equal up to rounding.)
    for (x, y) in one.iter().zip(&full[..t * cfg.padded_vocab_size]) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn bad_inputs_give_typed_errors() {
    let cfg = small_cfg();
    let (b, t) = (2, 4);
    let vp = cfg.padded_vocab_size;
    let mut model = Gpt2::new(cfg, b, t, 1).unwrap();
    assert!(matches!(model.backward(&[]), Err(Gpt2Error::NoForward)));
    assert!(matches!(
        model.forward(&[0; 7], b, t),
        Err(Gpt2Error::Shape { .. })
    ));
    assert!(matches!(
        model.forward(&[0; 12], 3, t),
        Err(Gpt2Error::BatchTooLarge { .. })
    ));
    assert!(matches!(
        model.forward(&[0; 10], b, 5),
        Err(Gpt2Error::BatchTooLarge { .. })
    ));
    assert!(matches!(
        model.forward(&[], 0, t),
        Err(Gpt2Error::BatchTooLarge { .. })
    ));
    let mut bad = vec![0u32; 8];
    bad[5] = cfg.vocab_size as u32;
    assert!(matches!(
        model.forward(&bad, b, t),
        Err(Gpt2Error::TokenOutOfRange { pos: 5, .. })
    ));
    assert!(matches!(
        model.forward_shallow(&[0; 8], b, t, 0),
        Err(Gpt2Error::InvalidConfig(_))
    ));
    assert!(matches!(
        model.forward_shallow(&[0; 8], b, t, 3),
        Err(Gpt2Error::InvalidConfig(_))
    ));
    model.forward(&[1; 8], b, t).unwrap();
    assert!(matches!(
        model.backward_sparse(&[], &[]),
        Err(Gpt2Error::InvalidKept(_))
    ));
    assert!(matches!(
        model.backward_sparse(&[2, 1], &vec![0.0; 2 * vp]),
        Err(Gpt2Error::InvalidKept(_))
    ));
    assert!(matches!(
        model.backward_sparse(&[1, 1], &vec![0.0; 2 * vp]),
        Err(Gpt2Error::InvalidKept(_))
    ));
    assert!(matches!(
        model.backward_sparse(&[8], &vec![0.0; vp]),
        Err(Gpt2Error::InvalidKept(_))
    ));
    assert!(matches!(
        model.backward_sparse(&[0, 1], &vec![0.0; 2 * vp - 1]),
        Err(Gpt2Error::Shape { .. })
    ));
    assert!(matches!(
        model.backward(&vec![0.0; 8 * vp - 1]),
        Err(Gpt2Error::Shape { .. })
    ));
    let mut ws = StepWorkspace::new();
    assert!(model
        .loss_and_backward(&mut ws, &[1; 8], &[0; 7], b, t, Selector::All)
        .is_err());
    assert!(matches!(
        model.loss_and_backward(&mut ws, &[1; 8], &[99; 8], b, t, Selector::All),
        Err(Gpt2Error::Kernel(_))
    ));
    // Configs.
    for bad in [
        GptConfig { n_head: 3, ..cfg },
        GptConfig { n_layer: 0, ..cfg },
        GptConfig {
            padded_vocab_size: 10,
            ..cfg
        },
        GptConfig {
            max_seq_len: 0,
            ..cfg
        },
    ] {
        assert!(matches!(
            Gpt2::new(bad, 1, 1, 0),
            Err(Gpt2Error::InvalidConfig(_))
        ));
    }
    assert!(matches!(
        Gpt2::new(cfg, 1, cfg.max_seq_len + 1, 0),
        Err(Gpt2Error::InvalidConfig(_))
    ));
    assert!(matches!(
        Gpt2::new(cfg, 0, 1, 0),
        Err(Gpt2Error::InvalidConfig(_))
    ));
}

#[test]
fn presets_and_layout() {
    assert_eq!(GptConfig::gpt2_124m().num_params_unpadded(), 124_439_808);
    assert_eq!(GptConfig::gpt2_350m().num_params_unpadded(), 354_823_168);
    assert_eq!(GptConfig::gpt2_774m().num_params_unpadded(), 774_030_080);
    assert_eq!(GptConfig::gpt2_1558m().num_params_unpadded(), 1_557_611_200);
    for c in [
        GptConfig::tiny(),
        GptConfig::config_t(),
        GptConfig::config_s(),
    ] {
        c.validate().unwrap();
    }
    let cfg = GptConfig::tiny();
    let p = eslm_gpt2::ParamSet::zeros(&cfg);
    let mut off = 0;
    for ((name, shape, data), kind) in p.tensors().zip(ParamKind::ALL) {
        assert_eq!(ParamKind::from_name(name), Some(kind));
        assert_eq!(shape.iter().product::<usize>(), data.len());
        assert_eq!(p.layout().range(kind).start, off);
        off += data.len();
    }
    assert_eq!(off, p.len());
    // Initialisation: LN weights 1, biases 0, residual projections with the smaller std, padded wte rows 0.
    let m = Gpt2::new(GptConfig::config_t(), 1, 1, 0).unwrap();
    let ps = m.params();
    assert!(ps.get(ParamKind::Ln1W).iter().all(|&x| x == 1.0));
    assert!(ps.get(ParamKind::QkvB).iter().all(|&x| x == 0.0));
    let std =
        |x: &[f32]| (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
    assert!((std(ps.get(ParamKind::FcW)) - 0.02).abs() < 1e-3);
    assert!((std(ps.get(ParamKind::FcProjW)) - 0.02 / 8f64.sqrt()).abs() < 1e-3);
    let (v, c) = (50257, 256);
    assert!(ps.get(ParamKind::Wte)[v * c..].iter().all(|&x| x == 0.0));
}
