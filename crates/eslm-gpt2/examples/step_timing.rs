//! Quick timing harness for one training step (forward + loss/backward + AdamW) on the benchmark configs.
//! The official benchmark is `benches/train_step.rs`; this one prints a per-phase breakdown.
//!
//! `cargo run --release -p eslm-gpt2 --example step_timing -- [T|S|tiny] [steps] [keep]`

use eslm_gpt2::{AdamW, AdamWConfig, Gpt2, GptConfig, Selector, StepWorkspace, TokenScore};
use eslm_kernels::select::SelectRule;
use std::time::Instant;

/// Process CPU time (user + system) in seconds, from /proc/self/stat (0 where unavailable).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Like the official benchmark: run inside an installed 2-thread pool.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    pool.install(run)
        .map_err(|e| e as Box<dyn std::error::Error>)
}

fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("T");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let keep: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0.3);
    let (cfg, b, t) = match which {
        "S" => (GptConfig::config_s(), 4, 64),
        "tiny" => (GptConfig::tiny(), 4, 16),
        _ => (GptConfig::config_t(), 8, 128),
    };
    let n = b * t;
    let mut model = Gpt2::new(cfg, b, t, 1)?;
    let mut opt = AdamW::new(AdamWConfig::default(), model.params())?;
    let mut ws = StepWorkspace::new();
    let inputs: Vec<u32> = (0..n)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i32> = (0..n)
        .map(|i| ((i * 104729 + 5) % cfg.vocab_size) as i32)
        .collect();
    println!(
        "config {which}: {cfg:?}, B={b} T={t}, threads {}",
        rayon::current_num_threads()
    );
    for (name, sel) in [
        ("CLM", Selector::All),
        (
            "ESLM",
            Selector::Select {
                score: TokenScore::Loss,
                rule: SelectRule::Var { alpha: 1.0 - keep },
            },
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..steps {
            let t0 = Instant::now();
            model.zero_grad();
            let t1 = Instant::now();
            model.forward(&inputs, b, t)?;
            let t2 = Instant::now();
            let c2 = cpu_seconds();
            let rep = model.loss_and_backward(&mut ws, &inputs, &targets, b, t, sel)?;
            let t3 = Instant::now();
            let (p, g) = model.params_and_grads_mut();
            opt.update(p, g, 1e-4)?;
            let t4 = Instant::now();
            let cpu = cpu_seconds() - c2;
            let total = (t4 - t0).as_secs_f64() - (t2 - t1).as_secs_f64();
            times.push(total);
            let fl = model.realized_flops();
            println!(
                "{name}: step {:.3}s (zero {:.3} fwd {:.3} fwd+loss+bwd {:.3} adam {:.3}) loss {:.4} K={} GFLOP {:.1} -> {:.1} GFLOP/s, {:.1} per CPU-s",
                total,
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
                (t4 - t3).as_secs_f64(),
                rep.loss_kept,
                rep.kept,
                fl.total() / 1e9,
                fl.total() / 1e9 / total,
                fl.total() / 1e9 / cpu.max(1e-9)
            );
        }
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        println!("{name}: median {med:.3}s = {:.1} tokens/s", n as f64 / med);
    }
    Ok(())
}
