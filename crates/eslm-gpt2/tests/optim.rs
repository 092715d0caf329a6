//! AdamW against a hand-computed f64 update, gradient clipping, and LR schedule values.

mod common;
use common::*;
use eslm_gpt2::{
    clip_grad_norm, grad_norm, AdamW, AdamWConfig, Decay, GptConfig, LrSchedule, ParamKind,
    ParamSet,
};

#[test]
fn adamw_matches_f64_reference() {
    let cfg = GptConfig::tiny();
    let mut r = rng(20);
    let mut p = ParamSet::zeros(&cfg);
    let init = rand_vec(&mut r, p.len(), 1.0);
    p.as_mut_slice()
        .iter_mut()
        .zip(&init)
        .for_each(|(d, &x)| *d = x as f32);
    let hp = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(hp, &p).unwrap();
    let mut rp: Vec<f64> = p.as_slice().iter().map(|&x| x as f64).collect();
    let (mut rm, mut rv) = (vec![0.0f64; p.len()], vec![0.0f64; p.len()]);
    let decays: Vec<bool> = {
        let mut d = vec![false; p.len()];
        for k in ParamKind::ALL {
            for i in p.layout().range(k) {
                d[i] = k.decays();
            }
        }
        d
    };
    for step in 1..=3 {
        let lr = 1e-2 * step as f64;
        let mut g = ParamSet::zeros(&cfg);
        let gv = rand_vec(&mut r, g.len(), 1.0);
        g.as_mut_slice()
            .iter_mut()
            .zip(&gv)
            .for_each(|(d, &x)| *d = x as f32);
        opt.update(&mut p, &g, lr as f32).unwrap();
        let (b1, b2) = (0.9f64, 0.95f64);
        for i in 0..rp.len() {
            let gi = g.as_slice()[i] as f64;
            if decays[i] {
                rp[i] -= lr * 0.1 * rp[i];
            }
            rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
            rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
            let mh = rm[i] / (1.0 - b1.powi(step));
            let vh = rv[i] / (1.0 - b2.powi(step));
            rp[i] -= lr * mh / (vh.sqrt() + 1e-8);
        }
        for (i, (&a, &b)) in p.as_slice().iter().zip(&rp).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-5 * b.abs().max(1e-2),
                "step {step} elem {i}: {a} vs {b}"
            );
        }
    }
    assert_eq!(opt.step, 3);
    assert!(AdamW::new(AdamWConfig { beta1: 1.0, ..hp }, &p).is_err());
    let mut g = ParamSet::zeros(&GptConfig { n_layer: 1, ..cfg });
    assert!(opt
        .update(&mut p, &ParamSet::zeros(&cfg), f32::NAN)
        .is_err());
    assert!(opt.update(&mut g.clone(), &g, 0.1).is_err());
    g.fill_zero();
}

#[test]
fn clipping_scales_to_max_norm() {
    let cfg = GptConfig::tiny();
    let mut r = rng(21);
    let mut g = ParamSet::zeros(&cfg);
    let gv = rand_vec(&mut r, g.len(), 1.0);
    g.as_mut_slice()
        .iter_mut()
        .zip(&gv)
        .for_each(|(d, &x)| *d = x as f32);
    let want: f64 = g
        .as_slice()
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = clip_grad_norm(&mut g, 1.0);
    assert!((norm - want).abs() < 1e-9 * want);
    assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
    let before = g.clone();
    let n2 = clip_grad_norm(&mut g, 10.0);
    assert!((n2 - 1.0).abs() < 1e-5);
    assert_eq!(g, before);
}

#[test]
fn lr_schedule_values() {
    let s = LrSchedule {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 10,
        total_steps: 110,
        decay: Decay::Cosine,
    };
    s.validate().unwrap();
    assert!((s.lr(0) - 1e-4).abs() < 1e-12);
    assert!((s.lr(9) - 1e-3).abs() < 1e-12);
    assert!((s.lr(10) - 1e-3).abs() < 1e-12);
    assert!((s.lr(60) - 5.5e-4).abs() < 1e-12);
    assert!((s.lr(110) - 1e-4).abs() < 1e-12);
    assert!((s.lr(1000) - 1e-4).abs() < 1e-12);
    let l = LrSchedule {
        decay: Decay::Linear,
        ..s
    };
    assert!((l.lr(35) - (1e-3 - 0.25 * 9e-4)).abs() < 1e-12);
    assert!(LrSchedule { min_lr: 1.0, ..s }.validate().is_err());
    assert!(LrSchedule {
        warmup_steps: 200,
        ..s
    }
    .validate()
    .is_err());
}

#[test]
fn training_memorises_a_fixed_batch() {
    use eslm_gpt2::{Gpt2, Selector, StepWorkspace, TokenScore};
    use eslm_kernels::select::SelectRule;
    let cfg = GptConfig::tiny();
    let (b, t) = (2, 8);
    let mut r = rng(22);
    let inputs = rand_tokens(&mut r, b * t, cfg.vocab_size);
    let targets: Vec<i32> = rand_tokens(&mut r, b * t, cfg.vocab_size)
        .iter()
        .map(|&x| x as i32)
        .collect();
    for sel in [
        Selector::All,
        Selector::Select {
            score: TokenScore::Loss,
            rule: SelectRule::Var { alpha: 0.5 },
        },
    ] {
        let mut model = Gpt2::new(cfg, b, t, 1).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default(), model.params()).unwrap();
        let sched = LrSchedule {
            max_lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 5,
            total_steps: 60,
            decay: Decay::Cosine,
        };
        let mut ws = StepWorkspace::new();
        let mut first = None;
        let mut last = 0.0;
        for step in 0..60 {
            model.zero_grad();
            let rep = model
                .loss_and_backward(&mut ws, &inputs, &targets, b, t, sel)
                .unwrap();
            first.get_or_insert(rep.loss_all);
            last = rep.loss_all;
            clip_grad_norm(model.grads_mut(), 1.0);
            let (p, g) = model.params_and_grads_mut();
            opt.update(p, g, sched.lr(step) as f32).unwrap();
        }
        let first = first.unwrap();
        assert!(last < 0.3 * first, "{sel:?}: loss {first} -> {last}");
    }
}

#[test]
fn training_is_bitwise_deterministic() {
    use eslm_gpt2::{Gpt2, Selector, StepWorkspace, TokenScore};
    use eslm_kernels::select::SelectRule;
    let cfg = GptConfig::tiny();
    let (b, t) = (4, 16);
    let mut r = rng(23);
    let inputs = rand_tokens(&mut r, b * t, cfg.vocab_size);
    let targets: Vec<i32> = rand_tokens(&mut r, b * t, cfg.vocab_size)
        .iter()
        .map(|&x| x as i32)
        .collect();
    let sel = Selector::Select {
        score: TokenScore::Entropy,
        rule: SelectRule::Var { alpha: 0.6 },
    };
    let run = || {
        let mut model = Gpt2::new(cfg, b, t, 5).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default(), model.params()).unwrap();
        let mut ws = StepWorkspace::new();
        let mut losses = Vec::new();
        for _ in 0..4 {
            model.zero_grad();
            losses.push(
                model
                    .loss_and_backward(&mut ws, &inputs, &targets, b, t, sel)
                    .unwrap()
                    .loss_kept,
            );
            clip_grad_norm(model.grads_mut(), 0.5);
            let (p, g) = model.params_and_grads_mut();
            opt.update(p, g, 1e-2).unwrap();
        }
        (losses, model.params().clone())
    };
    let (l1, p1) = run();
    let (l2, p2) = run();
    assert_eq!(l1, l2);
    assert!(p1
        .as_slice()
        .iter()
        .zip(p2.as_slice())
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
