//! Unit tests of the selection policies, the KD gradient, the Ada-ESLM controller and the config layers.

use eslm_collective::SingleProcess;
use eslm_kernels::select::{select, SelectRule, Selection};
use eslm_kernels::token_stats::TokenStats;
use eslm_train::bigram::BigramModel;
use eslm_train::config::{RunConfig, TrainArgs};
use eslm_train::model::LanguageModel;
use eslm_train::policy::hierarchical::sequence_means;
use eslm_train::policy::{
    AdaConfig, AdaEslm, EslmKd, Hierarchical, KdConfig, RandomKeep, Rho1, Rho1Norm, Score,
    ScoreKind, SelectionPolicy, StepContext,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_weights(vocab: usize, seed: u64, scale: f32) -> Vec<f32> {
    let stride = vocab.div_ceil(8) * 8;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = vec![0.0f32; vocab * stride];
    for r in 0..vocab {
        for c in 0..vocab {
            w[r * stride + c] = rng.gen_range(-scale..scale);
        }
    }
    w
}

/// Forward a bigram model: its row statistics.
fn stats_of(model: &mut BigramModel, inputs: &[u32], targets: &[i32]) -> TokenStats {
    model
        .forward(inputs, targets, 1, inputs.len())
        .unwrap()
        .clone()
}

#[test]
fn random_policy_keeps_the_right_count_and_is_reproducible() {
    let n = 997;
    let stats = TokenStats {
        lse: vec![0.0; n],
        loss: vec![1.0; n],
        entropy: vec![1.0; n],
        valid: vec![true; n],
    };
    let targets = vec![0i32; n];
    let ctx = StepContext {
        targets: &targets,
        stats: &stats,
        b: 1,
        t: n,
        step: 0,
    };
    for keep in [0.1, 0.3, 0.5, 0.77] {
        let mut p = RandomKeep::new(keep, 7).unwrap();
        let state = p.state();
        let mut scores = Vec::new();
        assert_eq!(p.score(&ctx, &mut scores).unwrap(), Score::Host);
        let mut sel = Selection::default();
        select(
            &scores,
            None,
            SelectRule::Var {
                alpha: p.alpha().unwrap(),
            },
            &mut sel,
        )
        .unwrap();
        assert_eq!(
            sel.indices.len(),
            (keep * n as f64).ceil() as usize,
            "keep {keep}"
        );
        // Restoring the RNG state reproduces the same draw; a further draw differs.
        let mut again = Vec::new();
        p.restore(&state).unwrap();
        p.score(&ctx, &mut again).unwrap();
        assert_eq!(scores, again);
        p.score(&ctx, &mut again).unwrap();
        assert_ne!(scores, again);
    }
    assert!(RandomKeep::new(0.0, 1).is_err());
    assert!(RandomKeep::new(1.5, 1).is_err());
    assert_eq!(RandomKeep::new(1.0, 1).unwrap().alpha(), None);
}

#[test]
fn rho1_scores_are_excess_loss_over_the_reference() {
    let vocab = 13;
    let reference = BigramModel::from_weights(vocab, random_weights(vocab, 1, 2.0)).unwrap();
    let mut student = BigramModel::from_weights(vocab, random_weights(vocab, 2, 2.0)).unwrap();
    let mut ref_copy = reference.clone();
    let mut rho = Rho1::new(Box::new(reference), 0.4, Rho1Norm::Kept).unwrap();
    let inputs: Vec<u32> = (0..40).map(|i| (i * 7 % vocab) as u32).collect();
    let targets: Vec<i32> = (0..40).map(|i| (i * 5 % vocab) as i32).collect();
    rho.prepare(&inputs, &targets, 1, 40).unwrap();
    let st = stats_of(&mut student, &inputs, &targets);
    let ref_st = stats_of(&mut ref_copy, &inputs, &targets);
    let ctx = StepContext {
        targets: &targets,
        stats: &st,
        b: 1,
        t: 40,
        step: 0,
    };
    let mut scores = Vec::new();
    assert_eq!(rho.score(&ctx, &mut scores).unwrap(), Score::Host);
    assert_eq!(scores.len(), 40);
    for (i, &s) in scores.iter().enumerate() {
        assert_eq!(s, st.loss[i] - ref_st.loss[i]);
    }
    assert!((rho.alpha().unwrap() - 0.6).abs() < 1e-12);
    assert_eq!(rho.normaliser(17, 40), 17.0);
    let budget = Rho1::new(Box::new(ref_copy), 0.4, Rho1Norm::Budget).unwrap();
    assert!((budget.normaliser(17, 40) - 16.0).abs() < 1e-12);
}

#[test]
fn kd_policy_scores_by_the_teacher_and_rejects_bad_hyper_parameters() {
    let vocab = 11;
    let teacher = BigramModel::from_weights(vocab, random_weights(vocab, 5, 1.0)).unwrap();
    let mut t2 = teacher.clone();
    let cfg = KdConfig {
        score: ScoreKind::Entropy,
        alpha: 0.5,
        kd_weight: 0.5,
        temperature: 2.0,
    };
    let mut kd = EslmKd::new(Box::new(teacher), cfg).unwrap();
    let mut student = BigramModel::from_weights(vocab, random_weights(vocab, 6, 1.0)).unwrap();
    let inputs: Vec<u32> = (0..20).map(|i| (i % vocab) as u32).collect();
    let targets: Vec<i32> = (0..20).map(|i| ((i + 3) % vocab) as i32).collect();
    kd.prepare(&inputs, &targets, 1, 20).unwrap();
    let st = stats_of(&mut student, &inputs, &targets);
    let tst = stats_of(&mut t2, &inputs, &targets);
    let ctx = StepContext {
        targets: &targets,
        stats: &st,
        b: 1,
        t: 20,
        step: 0,
    };
    let mut scores = Vec::new();
    kd.score(&ctx, &mut scores).unwrap();
    assert_eq!(scores, tst.entropy);
    // The KD loss of the kept rows, computed by the student's engine against the teacher's last forward.
    student
        .select(
            eslm_train::model::ScoreSource::Host(&scores),
            eslm_train::model::Keep::Rule(SelectRule::Var { alpha: 0.5 }),
        )
        .unwrap();
    let mean = student.loss_grad(kd.loss(), 1.0 / 10.0).unwrap();
    assert!(mean.is_finite() && mean > 0.0);
    let bad = KdConfig {
        kd_weight: 1.5,
        ..cfg
    };
    assert!(EslmKd::new(Box::new(BigramModel::new(4)), bad).is_err());
    let bad = KdConfig {
        temperature: 0.0,
        ..cfg
    };
    assert!(EslmKd::new(Box::new(BigramModel::new(4)), bad).is_err());
}

#[test]
fn ada_alpha_moves_in_the_documented_direction_and_stays_in_bounds() {
    let cfg = AdaConfig {
        alpha0: 0.5,
        alpha_min: 0.2,
        alpha_max: 0.8,
        target_mass: 0.6,
        gain: 0.05,
        ema: 0.5,
    };
    let n = 100;
    let valid = vec![true; n];
    let keep_top = |alpha: f64, scores: &[f32]| {
        let mut sel = Selection::default();
        select(scores, None, SelectRule::Var { alpha }, &mut sel).unwrap();
        sel.keep
    };
    // Heavy tail: 10 tokens carry almost all the loss → kept mass ≈ 1 > 0.6 → α rises.
    let heavy: Vec<f32> = (0..n).map(|i| if i < 10 { 10.0 } else { 0.01 }).collect();
    let mut ada = AdaEslm::new(ScoreKind::Loss, cfg).unwrap();
    let a0 = ada.alpha().unwrap();
    let keep = keep_top(a0, &heavy);
    ada.observe(&heavy, &keep, &valid, &SingleProcess).unwrap();
    assert!(ada.last_mass().unwrap() > 0.6);
    assert!(ada.alpha().unwrap() > a0, "heavy tail must raise alpha");
    for _ in 0..500 {
        let a = ada.alpha().unwrap();
        ada.observe(&heavy, &keep_top(a, &heavy), &valid, &SingleProcess)
            .unwrap();
        let a = ada.alpha().unwrap();
        assert!((0.2..=0.8).contains(&a));
    }
    assert!(
        (ada.alpha().unwrap() - 0.8).abs() < 1e-12,
        "saturates at alpha_max"
    );
    // Flat scores: kept mass = 1 − α = 0.5 < 0.6 → α falls, down to the fixed point 1 − α = 0.6 → α = 0.4.
    // (Distinct values: with exact ties VaR keeps every tied token.)
    let flat: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 1e-4).collect();
    let mut ada = AdaEslm::new(ScoreKind::Loss, cfg).unwrap();
    ada.observe(&flat, &keep_top(0.5, &flat), &valid, &SingleProcess)
        .unwrap();
    assert!(ada.alpha().unwrap() < 0.5, "flat scores must lower alpha");
    for _ in 0..2000 {
        let a = ada.alpha().unwrap();
        ada.observe(&flat, &keep_top(a, &flat), &valid, &SingleProcess)
            .unwrap();
        assert!((0.2..=0.8).contains(&ada.alpha().unwrap()));
    }
    assert!(
        (ada.alpha().unwrap() - 0.4).abs() < 0.03,
        "fixed point 0.4, got {}",
        ada.alpha().unwrap()
    );
    // State round trip.
    let st = ada.state();
    let mut other = AdaEslm::new(ScoreKind::Loss, cfg).unwrap();
    other.restore(&st).unwrap();
    assert_eq!(other.alpha(), ada.alpha());
    // Bounds are validated.
    assert!(AdaEslm::new(ScoreKind::Loss, AdaConfig { alpha0: 0.9, ..cfg }).is_err());
    assert!(AdaEslm::new(ScoreKind::Loss, AdaConfig { gain: 0.0, ..cfg }).is_err());
}

#[test]
fn hierarchical_drops_the_lowest_scoring_sequences() {
    let scores = [1.0f32, 1.0, 5.0, 5.0, 3.0, 3.0, 0.0, 0.0];
    let valid = [true; 8];
    let means = sequence_means(&scores, &valid, 4, 2);
    assert_eq!(means, vec![Some(1.0), Some(5.0), Some(3.0), Some(0.0)]);
    let invalid = [false, false, true, true, true, true, true, true];
    assert_eq!(sequence_means(&scores, &invalid, 4, 2)[0], None);

    let vocab = 9;
    let mut model = BigramModel::from_weights(vocab, random_weights(vocab, 3, 3.0)).unwrap();
    let mut h = Hierarchical::new(ScoreKind::Loss, 1, 0.5, 0.5).unwrap();
    let (b, t) = (6, 5);
    let inputs: Vec<u32> = (0..b * t).map(|i| (i * 4 % vocab) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| (i * 2 % vocab) as i32).collect();
    let kept = h
        .filter_sequences(&mut model, &inputs, &targets, b, t, &SingleProcess)
        .unwrap()
        .unwrap();
    assert_eq!(kept.len(), 3);
    let st = stats_of(&mut model, &inputs, &targets);
    let means = sequence_means(&st.loss, &st.valid, b, t);
    let min_kept = kept
        .iter()
        .map(|&s| means[s].unwrap())
        .fold(f32::INFINITY, f32::min);
    for (s, mean) in means.iter().enumerate() {
        if !kept.contains(&s) {
            assert!(mean.unwrap() <= min_kept);
        }
    }
    assert!(
        Hierarchical::new(ScoreKind::Loss, 2, 0.5, 0.5)
            .unwrap()
            .filter_sequences(&mut model, &inputs, &targets, b, t, &SingleProcess)
            .is_err(),
        "exit layer beyond the model is an error"
    );
}

#[test]
fn flags_override_the_toml_file_which_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(
        &path,
        "alpha = 0.3\nsteps = 5\nselect = \"random\"\nkeep = 0.25\n",
    )
    .unwrap();
    let args = TrainArgs {
        config: Some(path.clone()),
        alpha: Some(0.9),
        ..Default::default()
    };
    let cfg = RunConfig::resolve(&args).unwrap();
    assert_eq!(cfg.alpha, 0.9, "flag beats file");
    assert_eq!(cfg.steps, 5, "file beats default");
    assert_eq!(cfg.keep, 0.25);
    assert_eq!(cfg.select, eslm_train::PolicyKind::Random);
    assert_eq!(
        cfg.batch_size,
        RunConfig::default().batch_size,
        "default kept"
    );
    let cfg = RunConfig::resolve(&TrainArgs::default()).unwrap();
    assert_eq!(cfg, RunConfig::default());
    std::fs::write(&path, "alpah = 0.3\n").unwrap();
    let err = RunConfig::resolve(&TrainArgs {
        config: Some(path),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("alpah"), "{err}");
    let err = RunConfig::resolve(&TrainArgs {
        select: Some(eslm_train::PolicyKind::Rho1),
        ..Default::default()
    });
    assert!(err.unwrap_err().to_string().contains("--reference"));
}

#[test]
fn lr_schedule_warms_up_and_decays_to_the_floor() {
    let cfg = RunConfig {
        steps: 100,
        warmup_steps: 10,
        lr: 1.0,
        min_lr_ratio: 0.1,
        ..Default::default()
    };
    assert!((cfg.lr_at(0) - 0.1).abs() < 1e-12);
    assert!((cfg.lr_at(9) - 1.0).abs() < 1e-12);
    assert!((cfg.lr_at(10) - 1.0).abs() < 1e-12);
    assert!((cfg.lr_at(100) - 0.1).abs() < 1e-12);
    let mut prev = f64::INFINITY;
    for s in 10..100 {
        assert!(cfg.lr_at(s) <= prev);
        prev = cfg.lr_at(s);
    }
}

#[test]
fn scheduled_selection_starts_with_clm_then_ramps_alpha() {
    use eslm_train::policy::{Eslm, Scheduled};
    let mut p = Scheduled::new(Box::new(Eslm::new(ScoreKind::Loss, 0.6).unwrap()), 3, 4);
    let alphas: Vec<Option<f64>> = (0..9)
        .map(|s| {
            p.start_step(s);
            p.alpha()
        })
        .collect();
    assert_eq!(&alphas[..3], &[None, None, None], "CLM warm-up");
    let ramp: Vec<f64> = alphas[3..].iter().map(|a| a.unwrap()).collect();
    let want = [0.15, 0.3, 0.45, 0.6, 0.6, 0.6];
    for (got, want) in ramp.iter().zip(want) {
        assert!((got - want).abs() < 1e-12, "{ramp:?}");
    }
    // Without a ramp the policy's α applies at once after the warm-up.
    let mut q = Scheduled::new(Box::new(Eslm::new(ScoreKind::Loss, 0.6).unwrap()), 2, 0);
    q.start_step(1);
    assert_eq!(q.alpha(), None);
    q.start_step(2);
    assert_eq!(q.alpha(), Some(0.6));
}

#[test]
fn importance_probabilities_hit_the_budget_and_the_estimate_is_unbiased() {
    use eslm_train::policy::importance::keep_probabilities;
    use eslm_train::policy::Importance;
    // Water-filling: the largest weight is clipped at 1, the rest scale to the remaining budget.
    let p = keep_probabilities(&[10.0, 1.0, 1.0, 2.0, -1.0], 2.0);
    assert_eq!(p[0], 1.0);
    assert_eq!(
        p[4], 0.0,
        "rows with a negative weight (invalid) are never kept"
    );
    assert!((p.iter().sum::<f64>() - 2.0).abs() < 1e-12);
    assert!((p[3] - 0.5).abs() < 1e-12 && (p[1] - 0.25).abs() < 1e-12);
    // The inverse-probability weighted kept loss, divided by M, averages to the mean loss over valid rows.
    let n = 64;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let loss: Vec<f32> = (0..n).map(|_| rng.gen_range(0.01..6.0)).collect();
    let mut valid = vec![true; n];
    valid[5] = false;
    let stats = TokenStats {
        lse: vec![0.0; n],
        loss: loss.clone(),
        entropy: vec![1.0; n],
        valid: valid.clone(),
    };
    let targets = vec![0i32; n];
    let ctx = StepContext {
        targets: &targets,
        stats: &stats,
        b: 1,
        t: n,
        step: 0,
    };
    let m = valid.iter().filter(|&&v| v).count() as f64;
    let want: f64 = (0..n)
        .filter(|&i| valid[i])
        .map(|i| loss[i] as f64)
        .sum::<f64>()
        / m;
    let mut p = Importance::new(ScoreKind::Loss, 0.25, 0.2, 11).unwrap();
    let (mut est, mut kept_total, draws) = (0.0f64, 0usize, 4000);
    for _ in 0..draws {
        let mut host = Vec::new();
        assert_eq!(p.score(&ctx, &mut host).unwrap(), Score::Host);
        assert_eq!(host[5], 0.0, "an invalid row is never sampled");
        let eslm_train::model::LossSpec::WeightedCrossEntropy { row_weights } = p.loss() else {
            panic!("importance uses weighted cross-entropy");
        };
        for i in 0..n {
            if host[i] == 1.0 {
                est += row_weights[i] as f64 * loss[i] as f64 / p.normaliser(0, m as usize);
                kept_total += 1;
            }
        }
    }
    est /= draws as f64;
    assert!(
        (est - want).abs() < 0.02 * want,
        "E[estimate] {est} vs mean loss {want}"
    );
    let mean_kept = kept_total as f64 / draws as f64;
    assert!(
        (mean_kept - 0.25 * m).abs() < 0.3,
        "expected kept count {mean_kept}"
    );
    assert!(Importance::new(ScoreKind::Loss, 0.3, 1.5, 1).is_err());
}
