//! The engine's loss head for every policy equals the host computation it replaced: the trainer's calls
//! (forward + statistics → policy score → engine selection → CE or KD gradient on the kept rows → row-sparse
//! backward) give the same kept rows, loss and parameter gradients, bit for bit, as computing statistics,
//! selection and `dlogits` on host copies of the logits with the eslm-kernels functions and calling
//! `Gpt2::backward_sparse` — on random inputs and weights, with ignored targets.

use eslm_collective::SingleProcess;
use eslm_gpt2::{Gpt2, GptConfig};
use eslm_kernels::kd::{kd_grad, KdParams};
use eslm_kernels::select::{select, SelectRule, Selection};
use eslm_kernels::sparse_ce::sparse_ce;
use eslm_kernels::token_stats::{token_stats, TokenStats, DEFAULT_IGNORE_INDEX};
use eslm_train::engine::Gpt2Model;
use eslm_train::model::{Keep, LanguageModel, LossSpec, ScoreSource};
use eslm_train::policy::{
    Clm, Eslm, EslmKd, KdConfig, RandomKeep, Rho1, Rho1Norm, Score, ScoreKind, SelectionPolicy,
    StepContext,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 2;
const T: usize = 9;

fn config() -> GptConfig {
    GptConfig::new(2, 2, 16, 67, 16).unwrap() // V = 67 in a padded stride
}

fn batch(seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let inputs = (0..B * T).map(|_| rng.gen_range(0..67)).collect();
    let targets = (0..B * T)
        .map(|i| {
            if i % 7 == 3 {
                DEFAULT_IGNORE_INDEX
            } else {
                rng.gen_range(0..67)
            }
        })
        .collect();
    (inputs, targets)
}

/// What the host reference needs to know about a policy.
enum Reference {
    All,
    Own(ScoreKind, f64),
    Excess(u64, f64),
    Random(u64, f64),
    Teacher(u64, ScoreKind, f64, KdParams),
}

fn host_stats(model: &mut Gpt2, inputs: &[u32], targets: &[i32], train: bool) -> TokenStats {
    let mut st = TokenStats::default();
    let view = if train {
        model.forward(inputs, B, T).unwrap()
    } else {
        model.forward_inference(inputs, B, T).unwrap()
    };
    token_stats(&view, targets, DEFAULT_IGNORE_INDEX, &mut st).unwrap();
    st
}

/// The old host path: returns (kept rows, kept loss, gradients).
fn host_step(reference: &Reference, inputs: &[u32], targets: &[i32]) -> (Vec<u32>, f32, Vec<f32>) {
    let cfg = config();
    let mut model = Gpt2::new(cfg, B, T, 1).unwrap();
    let mut aux = match reference {
        Reference::Excess(seed, _) | Reference::Teacher(seed, ..) => {
            let mut m = Gpt2::new(cfg, B, T, *seed).unwrap();
            let st = host_stats(&mut m, inputs, targets, false);
            Some((m, st))
        }
        _ => None,
    };
    let st = host_stats(&mut model, inputs, targets, true);
    let mut sel = Selection::default();
    let var = |a: f64| SelectRule::Var { alpha: a };
    match reference {
        Reference::All => {
            sel.indices = (0..(B * T) as u32)
                .filter(|&i| st.valid[i as usize])
                .collect();
        }
        Reference::Own(kind, a) => {
            select(kind.of(&st), Some(&st.valid), var(*a), &mut sel).unwrap()
        }
        Reference::Excess(_, keep) => {
            let r = &aux.as_ref().unwrap().1;
            let s: Vec<f32> = st.loss.iter().zip(&r.loss).map(|(l, q)| l - q).collect();
            select(&s, Some(&st.valid), var(1.0 - keep), &mut sel).unwrap();
        }
        Reference::Random(seed, keep) => {
            let mut p = RandomKeep::new(*keep, *seed).unwrap();
            let ctx = StepContext {
                targets,
                stats: &st,
                b: B,
                t: T,
                step: 0,
            };
            let mut s = Vec::new();
            p.score(&ctx, &mut s).unwrap();
            select(&s, Some(&st.valid), var(1.0 - keep), &mut sel).unwrap();
        }
        Reference::Teacher(_, kind, a, _) => {
            let ts = &aux.as_ref().unwrap().1;
            select(kind.of(ts), Some(&st.valid), var(*a), &mut sel).unwrap();
        }
    }
    let k = sel.indices.len();
    let vp = cfg.padded_vocab_size;
    let mut d = vec![0.0f32; k * vp];
    let view = model.logits().unwrap();
    let scale = 1.0 / k as f32;
    let loss = match reference {
        Reference::Teacher(_, _, _, kd) => {
            let (teacher, _) = aux.as_mut().unwrap();
            teacher.forward_inference(inputs, B, T).unwrap();
            let tv = teacher.logits().unwrap();
            kd_grad(&view, &tv, targets, &sel.indices, *kd, scale, &mut d, vp).unwrap()
        }
        _ => sparse_ce(&view, targets, &st.lse, &sel.indices, scale, &mut d, vp).unwrap(),
    };
    model.zero_grad();
    model.backward_sparse(&sel.indices, &d).unwrap();
    (sel.indices, loss, model.grads().as_slice().to_vec())
}

/// The new path: exactly the trainer's calls through `LanguageModel` and the policy.
fn engine_step(
    policy: &mut dyn SelectionPolicy,
    inputs: &[u32],
    targets: &[i32],
) -> (Vec<u32>, f32, Vec<f32>) {
    let mut model = Gpt2Model::new(config(), B, T, 1).unwrap();
    model.zero_grad();
    policy.prepare(inputs, targets, B, T).unwrap();
    let st = model.forward(inputs, targets, B, T).unwrap().clone();
    let ctx = StepContext {
        targets,
        stats: &st,
        b: B,
        t: T,
        step: 0,
    };
    let mut host = Vec::new();
    let score = match policy.score(&ctx, &mut host).unwrap() {
        Score::Loss => ScoreSource::Loss,
        Score::Entropy => ScoreSource::Entropy,
        Score::Host => ScoreSource::Host(&host),
    };
    let keep = policy
        .alpha()
        .map_or(Keep::AllValid, |a| Keep::Rule(SelectRule::Var { alpha: a }));
    let kept = model.select(score, keep).unwrap().indices.clone();
    let loss = model
        .loss_grad(policy.loss(), 1.0 / kept.len() as f32)
        .unwrap();
    model.backward().unwrap();
    model.reduce_grads(&SingleProcess).unwrap();
    (kept, loss, model.inner().grads().as_slice().to_vec())
}

fn gpt(seed: u64) -> Box<dyn LanguageModel> {
    Box::new(Gpt2Model::new(config(), B, T, seed).unwrap())
}

type Build = fn() -> Box<dyn SelectionPolicy>;

fn kd_config() -> KdConfig {
    KdConfig {
        score: ScoreKind::Loss,
        alpha: 0.5,
        kd_weight: 0.4,
        temperature: 2.0,
    }
}

#[test]
fn every_policy_matches_the_host_computation_bitwise() {
    let kd = KdParams {
        kd_weight: 0.4,
        temperature: 2.0,
    };
    let cases: [(&str, Build, Reference); 6] = [
        ("clm", || Box::new(Clm), Reference::All),
        (
            "eslm loss",
            || Box::new(Eslm::new(ScoreKind::Loss, 0.7).unwrap()),
            Reference::Own(ScoreKind::Loss, 0.7),
        ),
        (
            "eslm entropy",
            || Box::new(Eslm::new(ScoreKind::Entropy, 0.4).unwrap()),
            Reference::Own(ScoreKind::Entropy, 0.4),
        ),
        (
            "rho1",
            || Box::new(Rho1::new(gpt(5), 0.5, Rho1Norm::Kept).unwrap()),
            Reference::Excess(5, 0.5),
        ),
        (
            "random",
            || Box::new(RandomKeep::new(0.3, 9).unwrap()),
            Reference::Random(9, 0.3),
        ),
        (
            "eslm-kd",
            || Box::new(EslmKd::new(gpt(6), kd_config()).unwrap()),
            Reference::Teacher(6, ScoreKind::Loss, 0.5, kd),
        ),
    ];
    for seed in 0..3 {
        let (inputs, targets) = batch(seed);
        for (name, build, reference) in &cases {
            let (want_kept, want_loss, want_grads) = host_step(reference, &inputs, &targets);
            let (kept, loss, grads) = engine_step(build().as_mut(), &inputs, &targets);
            assert_eq!(kept, want_kept, "{name} seed {seed}: kept rows");
            assert_eq!(
                loss.to_bits(),
                want_loss.to_bits(),
                "{name} seed {seed}: loss"
            );
            assert!(
                grads.iter().any(|&g| g != 0.0),
                "{name}: gradients are not all zero"
            );
            let same = grads
                .iter()
                .zip(&want_grads)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name} seed {seed}: gradients differ");
        }
    }
}

#[test]
fn a_teacher_from_another_engine_is_refused() {
    let (inputs, targets) = batch(1);
    let mut student = Gpt2Model::new(config(), B, T, 1).unwrap();
    let mut teacher = eslm_train::bigram::BigramModel::new(67);
    teacher.forward(&inputs, &targets, B, T).unwrap();
    student.forward(&inputs, &targets, B, T).unwrap();
    student.select(ScoreSource::Loss, Keep::AllValid).unwrap();
    let kd = KdParams {
        kd_weight: 0.5,
        temperature: 1.0,
    };
    let err = student
        .loss_grad(
            LossSpec::Distill {
                teacher: &teacher,
                params: kd,
            },
            1.0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("same engine"), "{err}");
}
