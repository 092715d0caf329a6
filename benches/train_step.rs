//! Train-step benchmark: one GPT-2 step (forward + loss + backward + AdamW) on CPU, f32, in a rayon pool of 2
//! threads (the machine the targets are set for), for CLM (every token gets gradient) and ESLM keeping 30 % of
//! the tokens by loss (VaR selection, row-sparse backward). Same model and batch as `benches/pytorch/gpt2_step.py`:
//!
//! - config T: L=4, H=4, C=256, V=50257 (Vp 50304), B=8, T=128
//! - config S: GPT-2 124M (L=12, H=12, C=768), B=4, T=64
//!
//! inputs `(i·7919 + 13) mod V`, targets `(i·104729 + 5) mod V` over the flat batch; AdamW (β = 0.9/0.95,
//! decay 0.1 on matrices and embeddings, clip 1.0). The step is the trainer's own sequence of engine calls
//! (`eslm_train::engine::Gpt2Model` through `LanguageModel`: forward + statistics → selection → CE gradient of
//! the kept rows → row-sparse backward → gradient reduction → norm, clip and AdamW), so it measures what
//! `eslm-train` runs. CLM and ESLM steps alternate so that load changes on a shared machine hit
//! both alike; the median step time of each is reported, with tokens/s and the ESLM/CLM step-time ratio.
//!
//! `cargo bench --bench train_step -- [--configs T,S] [--steps 5] [--warmup 2] [--threads 2] [--keep 0.3]`
//! prints a table, then one JSON line (prefix `JSON `) that `scripts/bench-vs-pytorch.sh` reads.

use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

use eslm_collective::SingleProcess;
use eslm_gpt2::GptConfig;
use eslm_kernels::select::SelectRule;
use eslm_train::engine::Gpt2Model;
use eslm_train::model::{Keep, LanguageModel, LossSpec, OptimStep, ScoreSource};

struct Args {
    configs: Vec<String>,
    steps: usize,
    warmup: usize,
    threads: usize,
    keep: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        configs: vec!["T".into(), "S".into()],
        steps: 5,
        warmup: 2,
        threads: 2,
        keep: 0.3,
    };
    for (flag, val) in common::flags(&["--configs", "--steps", "--warmup", "--threads", "--keep"]) {
        match flag.as_str() {
            "--configs" => a.configs = val.split(',').map(|s| s.trim().to_string()).collect(),
            "--steps" => a.steps = common::number::<usize>(&flag, &val)?.max(1),
            "--warmup" => a.warmup = common::number(&flag, &val)?,
            "--threads" => a.threads = common::number::<usize>(&flag, &val)?.max(1),
            _ => a.keep = common::number(&flag, &val)?,
        }
    }
    if !(a.keep > 0.0 && a.keep < 1.0) {
        return Err(format!("--keep must be in (0, 1), got {}", a.keep));
    }
    Ok(a)
}

struct ModeResult {
    median_s: f64,
    times_s: Vec<f64>,
    kept: usize,
    gflop: f64,
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn bench_config(name: &str, a: &Args) -> BenchResult<(usize, ModeResult, ModeResult)> {
    let (cfg, b, t) = match name {
        "T" => (GptConfig::config_t(), 8, 128),
        "S" => (GptConfig::config_s(), 4, 64),
        other => return Err(format!("unknown config `{other}` (T or S)").into()),
    };
    let n = b * t;
    let mut model = Gpt2Model::new(cfg, b, t, 0)?;
    let inputs: Vec<u32> = (0..n)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i32> = (0..n)
        .map(|i| ((i * 104729 + 5) % cfg.vocab_size) as i32)
        .collect();
    let eslm = Keep::Rule(SelectRule::Var {
        alpha: 1.0 - a.keep,
    });
    let opt = OptimStep {
        lr: 1e-4,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
    };
    let mut results: Vec<ModeResult> = (0..2)
        .map(|_| ModeResult {
            median_s: 0.0,
            times_s: Vec::new(),
            kept: 0,
            gflop: 0.0,
        })
        .collect();
    for i in 0..a.warmup + a.steps {
        for (r, keep) in results.iter_mut().zip([Keep::AllValid, eslm]) {
            let flops_before = model.realized_flops();
            let t0 = Instant::now();
            model.zero_grad();
            model.forward(&inputs, &targets, b, t)?;
            let k = model.select(ScoreSource::Loss, keep)?.indices.len();
            model.loss_grad(LossSpec::CrossEntropy, 1.0 / k as f32)?;
            model.backward()?;
            model.reduce_grads(&SingleProcess)?;
            model.optimizer_step(&opt)?;
            let dt = t0.elapsed().as_secs_f64();
            if i >= a.warmup {
                r.times_s.push(dt);
            }
            r.kept = k;
            r.gflop = (model.realized_flops() - flops_before) as f64 / 1e9;
        }
    }
    for r in &mut results {
        r.median_s = common::median(&r.times_s);
    }
    let eslm_r = results.pop().ok_or("no result")?;
    let clm_r = results.pop().ok_or("no result")?;
    Ok((n, clm_r, eslm_r))
}

fn json_mode(n: usize, r: &ModeResult) -> String {
    let times: Vec<String> = r.times_s.iter().map(|x| format!("{x:.6}")).collect();
    format!(
        "{{\"median_s\": {:.6}, \"tokens_per_s\": {:.3}, \"kept\": {}, \"realized_gflop\": {:.3}, \"times_s\": [{}]}}",
        r.median_s,
        n as f64 / r.median_s,
        r.kept,
        r.gflop,
        times.join(", ")
    )
}

fn main() -> BenchResult<()> {
    let a = parse_args()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()?;
    println!(
        "eslm train step, {} threads, keep {:.2}, {} warm-up + {} timed steps per mode (CLM/ESLM alternating)",
        a.threads, a.keep, a.warmup, a.steps
    );
    println!(
        "{:<6} {:>6} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "config", "tokens", "CLM s", "CLM tok/s", "ESLM s", "ESLM tok/s", "ESLM/CLM"
    );
    let mut json = Vec::new();
    for name in &a.configs {
        let (n, clm, eslm) = pool.install(|| bench_config(name, &a))?;
        let ratio = eslm.median_s / clm.median_s;
        println!(
            "{:<6} {:>6} {:>12.3} {:>12.1} {:>12.3} {:>12.1} {:>10.3}",
            name,
            n,
            clm.median_s,
            n as f64 / clm.median_s,
            eslm.median_s,
            n as f64 / eslm.median_s,
            ratio
        );
        json.push(format!(
            "\"{name}\": {{\"tokens\": {n}, \"clm\": {}, \"eslm\": {}, \"eslm_over_clm\": {ratio:.6}}}",
            json_mode(n, &clm),
            json_mode(n, &eslm)
        ));
    }
    println!(
        "JSON {{\"engine\": \"eslm\", \"threads\": {}, \"keep\": {}, \"configs\": {{{}}}}}",
        a.threads,
        a.keep,
        json.join(", ")
    );
    Ok(())
}
