//! End-to-end trainer throughput on config T (L4 H4 C256, V 50257, B8, T128) on CPU, in one run: tokens/s of
//! `clm`, `eslm` (α = 0.7) and `hierarchical` (exit layer 1, instance α 0.5, token α 0.7), each as a ratio to
//! `clm` measured in the same process. Data: the built-in synthetic corpus with the GPT-2 vocabulary size.
//! Median step time over the timed steps (the first step is warm-up). Plain `main` (harness = false).
//!
//! `cargo bench --bench trainer` (env `ESLM_BENCH_STEPS`, default 6 timed steps).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use eslm_train::config::{PolicyKind, TrainArgs};
use eslm_train::metrics::read_metrics;
use eslm_train::run::run_training;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let steps: u64 = std::env::var("ESLM_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let root = std::env::temp_dir().join(format!("eslm-bench-trainer-{}", std::process::id()));
    let runs: [(&str, PolicyKind, Option<f64>); 3] = [
        ("clm", PolicyKind::Clm, None),
        ("eslm a=0.7", PolicyKind::Eslm, Some(0.7)),
        (
            "hierarchical E1 ai=0.5 a=0.7",
            PolicyKind::Hierarchical,
            Some(0.7),
        ),
    ];
    let threads = rayon::current_num_threads();
    println!("trainer end-to-end, config T (L4 H4 C256 V50257), B8 T128, {steps} timed steps, {threads} threads");
    let mut base = None;
    for (name, select, alpha) in runs {
        let out = root.join(name.split(' ').next().unwrap_or("run"));
        let args = TrainArgs {
            model: Some("t".into()),
            vocab_size: Some(50257),
            synthetic_documents: Some(512),
            batch_size: Some(8),
            seq_len: Some(128),
            steps: Some(steps + 1),
            select: Some(select),
            alpha,
            exit_layer: Some(1),
            instance_alpha: Some(0.5),
            eval_batches: Some(1),
            eval_every: Some(0),
            out: Some(out.clone()),
            no_progress: true,
            ..Default::default()
        };
        let summary = match run_training(&args, Arc::new(AtomicBool::new(false))) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        };
        let (records, _) = match read_metrics(&out.join("metrics.jsonl")) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        };
        let step_s = median(records.iter().skip(1).map(|r| r.step_time_s).collect());
        let tokens_per_s = 1024.0 / step_s;
        let ratio = tokens_per_s / *base.get_or_insert(tokens_per_s);
        let realized: f64 = records
            .iter()
            .skip(1)
            .map(|r| r.flops_realized)
            .sum::<f64>()
            / steps as f64;
        println!(
            "{name:<30} kept {:.3}  median step {:.3} s  {:.0} tokens/s  ×{ratio:.2} vs clm  realized {:.2} GFLOP/step",
            summary.kept_fraction,
            step_s,
            tokens_per_s,
            realized / 1e9
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
