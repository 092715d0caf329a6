//! Why loss-ranked selection stalls from scratch, measured: trains the same GPT-2 (synth-tiny shape, GPT-2
//! vocabulary) on real shards with CLM and with ESLM (loss score, α = 0.7, and the same after a CLM warm-up),
//! through the trainer's own seam (`LanguageModel`), and every `--every` steps prints, for that step's batch:
//! the mean loss of all / kept / dropped tokens, and the share of *frequent* tokens (the 100 most common ids of
//! the first million training tokens, ≈ half of all text) among all tokens and among the kept ones.
//!
//! ```sh
//! cargo run --release -p eslm-train --example selection_anatomy -- 'data/gutenberg/train_*.bin' 400 50
//! ```

use std::collections::HashSet;

use eslm_data::{DataLoader, LoaderConfig, ShardReader};
use eslm_gpt2::GptConfig;
use eslm_kernels::select::SelectRule;
use eslm_train::engine::Gpt2Model;
use eslm_train::model::{Keep, LanguageModel, LossSpec, OptimStep, ScoreSource};

const B: usize = 8;
const T: usize = 128;

fn frequent_ids(pattern: &str) -> HashSet<u32> {
    let shards = eslm_data::loader::open_shards(pattern).expect("shards");
    let shard: &ShardReader = &shards[0];
    let tokens = shard.tokens();
    let mut counts = vec![0u64; 1 << 17];
    for i in 0..tokens.len().min(1_000_000) {
        if let Some(id) = tokens.get(i) {
            counts[id as usize] += 1;
        }
    }
    let mut ids: Vec<u32> = (0..counts.len() as u32).collect();
    ids.sort_by_key(|&i| std::cmp::Reverse(counts[i as usize]));
    ids.into_iter().take(100).collect()
}

fn mean(xs: impl Iterator<Item = f32>) -> f64 {
    let (s, n) = xs.fold((0.0f64, 0usize), |(s, n), x| (s + x as f64, n + 1));
    s / n.max(1) as f64
}

fn run(
    name: &str,
    pattern: &str,
    steps: u64,
    every: u64,
    alpha: Option<f64>,
    warmup: u64,
    frequent: &HashSet<u32>,
) {
    let config = GptConfig::new(2, 4, 128, 50257, T).expect("config");
    let mut model = Gpt2Model::new(config, B, T, 7).expect("model");
    let mut loader =
        DataLoader::open(pattern, LoaderConfig::new(B, T).with_seed(7)).expect("loader");
    println!(
        "\n{name}: step | loss all | loss kept | loss dropped | frequent share: all → kept | kept"
    );
    for step in 0..steps {
        let batch = loader.next_batch().expect("batch");
        let targets: Vec<i32> = batch.targets.iter().map(|&y| y as i32).collect();
        let stats = model
            .forward(&batch.inputs, &targets, B, T)
            .expect("forward")
            .clone();
        let keep = match alpha {
            Some(a) if step >= warmup => Keep::Rule(SelectRule::Var { alpha: a }),
            _ => Keep::AllValid,
        };
        let kept = model
            .select(ScoreSource::Loss, keep)
            .expect("select")
            .keep
            .clone();
        let k = kept.iter().filter(|&&x| x).count();
        if step % every == 0 || step + 1 == steps {
            let is_freq = |i: usize| frequent.contains(&batch.targets[i]);
            let n = kept.len();
            let share_all = (0..n).filter(|&i| is_freq(i)).count() as f64 / n as f64;
            let share_kept =
                (0..n).filter(|&i| kept[i] && is_freq(i)).count() as f64 / k.max(1) as f64;
            let kept_loss = mean((0..n).filter(|&i| kept[i]).map(|i| stats.loss[i]));
            let dropped_loss = mean((0..n).filter(|&i| !kept[i]).map(|i| stats.loss[i]));
            println!(
                "{name}: {step:>5} | {:>8.3} | {kept_loss:>9.3} | {:>12} | {share_all:>5.2} → {share_kept:.2} | {:.2}",
                mean(stats.loss.iter().copied()),
                if k == n { "–".to_string() } else { format!("{dropped_loss:.3}") },
                k as f64 / n as f64
            );
        }
        let lr = 2e-3 * ((step + 1) as f32 / 50.0).min(1.0);
        model.zero_grad();
        model
            .loss_grad(LossSpec::CrossEntropy, 1.0 / k.max(1) as f32)
            .expect("grad");
        model.backward().expect("backward");
        let opt = OptimStep {
            lr,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        };
        model.optimizer_step(&opt).expect("update");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pattern = args
        .get(1)
        .map_or("data/gutenberg/train_*.bin", String::as_str);
    let steps: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(400);
    let every: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50);
    let frequent = frequent_ids(pattern);
    run("clm", pattern, steps, every, None, 0, &frequent);
    run(
        "eslm-loss-0.7",
        pattern,
        steps,
        every,
        Some(0.7),
        0,
        &frequent,
    );
    run(
        "eslm-loss-0.7-after-200-clm",
        pattern,
        steps,
        every,
        Some(0.7),
        200,
        &frequent,
    );
}
