//! Train-step benchmark on the CUDA backend (feature `cuda`; run by `scripts/gpu-check.sh`): GPT-2 124M at
//! T = 1024 (B = 8 by default, `--batch`), the trainer's own sequence of engine calls through
//! `eslm_train::engine::Gpt2Model<Cuda>` (forward + statistics → selection → CE gradient of the kept rows →
//! row-sparse backward → gradient reduction → norm, clip and AdamW; the optimizer step waits for the stream, so a
//! step's time is its device time). Modes, interleaved step by step so that clock changes hit all alike:
//!
//! - `clm`: every token;
//! - `eslm keep 0.5`, `eslm keep 0.3`: VaR selection on the loss score;
//! - `hierarchical`: a shallow pass through the first `--exit-layer` blocks (default 4) over the whole batch, the
//!   sequences whose mean shallow loss is in the top half kept, then `eslm keep 0.3` on them — the trainer's
//!   hierarchical policy, which continues the shallow pass's first blocks for the kept sequences
//!   (`LanguageModel::forward_prefix` / `forward_sequences`) instead of recomputing them.
//!
//! Then the NCCL check of the data-parallel path on one GPU: a one-rank NCCL communicator all-reduces a buffer of
//! the model's parameter count in place (what `reduce_grads` does on each step of a multi-rank job), timed
//! against the CLM step (target < 3 % of a step).
//!
//! Every mode runs with f32 storage and f32 products, then TF32 and bf16 tensor-core products (`--matmul
//! tf32|bf16`), then with bf16 storage (`--storage bf16`, llm.c's mixed-precision recipe: a second model); CLM and
//! ESLM keep 0.3 also run without the fused cuBLASLt epilogues (bias and GELU as separate kernels,
//! `Cuda::set_fused_epilogues(false)`), for the epilogues' share of a step. Prints one
//! markdown table (also written to `ESLM_BENCH_OUT`): median step time, tokens/s, the ratio to CLM of the same storage
//! and precision, kept tokens, and the device memory in use after each storage's runs. **Never run yet** (no GPU in any session so far).
//!
//! `cargo bench --features cuda --bench train_step_cuda -- [--batch 8] [--steps 5] [--warmup 2] [--exit-layer 4]`

use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

use eslm_collective::SingleProcess;
use eslm_gpt2::backend::cuda::Dtype;
use eslm_gpt2::backend::CollectiveOp;
use eslm_gpt2::{Backend, Cuda, GptConfig, MatmulPrecision};
use eslm_kernels::select::SelectRule;
use eslm_train::engine::Gpt2Model;
use eslm_train::model::{Keep, LanguageModel, LossSpec, OptimStep, ScoreSource};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    batch: usize,
    steps: usize,
    warmup: usize,
    exit_layer: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        batch: 8,
        steps: 5,
        warmup: 2,
        exit_layer: 4,
    };
    for (flag, val) in common::flags(&["--batch", "--steps", "--warmup", "--exit-layer"]) {
        let n = common::number::<usize>(&flag, &val)?;
        match flag.as_str() {
            "--batch" => a.batch = n.max(2),
            "--steps" => a.steps = n.max(1),
            "--warmup" => a.warmup = n,
            _ => a.exit_layer = n.max(1),
        }
    }
    Ok(a)
}

/// One benchmarked mode.
#[derive(Clone, Copy)]
enum Mode {
    Clm,
    Eslm { keep: f64 },
    Hierarchical { keep: f64 },
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Clm => "clm".into(),
            Mode::Eslm { keep } => format!("eslm loss keep {keep}"),
            Mode::Hierarchical { keep } => {
                format!("hierarchical (E, half the sequences) + keep {keep}")
            }
        }
    }
}

/// The batch's inputs and targets (`(i·7919 + 13) mod V`, `(i·104729 + 5) mod V`, as in `benches/train_step.rs`).
fn batch(n: usize, vocab: usize) -> (Vec<u32>, Vec<i32>) {
    (
        (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect(),
        (0..n).map(|i| ((i * 104729 + 5) % vocab) as i32).collect(),
    )
}

/// The `b` sequences of length `t` whose mean shallow loss is in the top half (ties kept in order).
fn top_half_sequences(loss: &[f32], b: usize, t: usize) -> Vec<usize> {
    let means: Vec<f32> = (0..b)
        .map(|s| loss[s * t..(s + 1) * t].iter().sum::<f32>() / t as f32)
        .collect();
    let mut order: Vec<usize> = (0..b).collect();
    order.sort_by(|&x, &y| means[y].total_cmp(&means[x]));
    let mut kept = order[..b.div_ceil(2)].to_vec();
    kept.sort_unstable();
    kept
}

/// One optimizer step of `mode`; returns the kept token count.
fn step(
    model: &mut Gpt2Model<Cuda>,
    mode: Mode,
    inputs: &[u32],
    targets: &[i32],
    (b, t): (usize, usize),
    exit_layer: usize,
) -> BenchResult<usize> {
    let opt = OptimStep {
        lr: 1e-4,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        grad_clip: 1.0,
    };
    model.zero_grad();
    let keep = match mode {
        Mode::Clm => {
            model.forward(inputs, targets, b, t)?;
            Keep::AllValid
        }
        Mode::Eslm { keep } => {
            model.forward(inputs, targets, b, t)?;
            Keep::Rule(SelectRule::Var { alpha: 1.0 - keep })
        }
        Mode::Hierarchical { keep } => {
            let shallow = model.forward_prefix(inputs, targets, b, t, exit_layer)?;
            let seqs = top_half_sequences(&shallow.loss, b, t);
            let pick = |v: &[u32]| -> Vec<u32> {
                seqs.iter()
                    .flat_map(|&s| v[s * t..(s + 1) * t].iter().copied())
                    .collect()
            };
            let kept_targets: Vec<i32> = seqs
                .iter()
                .flat_map(|&s| targets[s * t..(s + 1) * t].iter().copied())
                .collect();
            model.forward_sequences(&seqs, &pick(inputs), &kept_targets, t)?;
            Keep::Rule(SelectRule::Var { alpha: 1.0 - keep })
        }
    };
    let k = model.select(ScoreSource::Loss, keep)?.indices.len();
    model.loss_grad(LossSpec::CrossEntropy, 1.0 / k.max(1) as f32)?;
    model.backward()?;
    model.reduce_grads(&SingleProcess)?;
    model.optimizer_step(&opt)?;
    Ok(k)
}

/// Seconds per in-place NCCL all-reduce of `len` f32 on a one-rank communicator (median of `reps`).
fn nccl_all_reduce_s(len: usize, reps: usize) -> BenchResult<f64> {
    let mut gpu = Cuda::new(0)?;
    gpu.connect_nccl(&SingleProcess)?;
    let mut buf = gpu.alloc(len);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps + 1 {
        let t0 = Instant::now();
        gpu.collective(
            CollectiveOp::AllReduceSum,
            Cuda::view_mut(&mut buf),
            &SingleProcess,
        )?;
        gpu.status()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(common::median(&times[1..]))
}

/// Median step times (s) and kept tokens of every mode, modes interleaved step by step.
fn time_modes(
    model: &mut Gpt2Model<Cuda>,
    modes: &[Mode],
    a: &Args,
    (inputs, targets): (&[u32], &[i32]),
    (b, t): (usize, usize),
) -> BenchResult<(Vec<f64>, Vec<usize>)> {
    let mut times = vec![Vec::new(); modes.len()];
    let mut kept = vec![0; modes.len()];
    for i in 0..a.warmup + a.steps {
        for (m, &mode) in modes.iter().enumerate() {
            let t0 = Instant::now();
            kept[m] = step(model, mode, inputs, targets, (b, t), a.exit_layer)?;
            if i >= a.warmup {
                times[m].push(t0.elapsed().as_secs_f64());
            }
        }
    }
    Ok((times.iter().map(|v| common::median(v)).collect(), kept))
}

/// Table rows of `modes` timed on `model` (label in the first column), each step's ratio to the first mode (CLM).
fn rows_of(
    label: &str,
    model: &mut Gpt2Model<Cuda>,
    modes: &[Mode],
    a: &Args,
    data: (&[u32], &[i32]),
    (b, t): (usize, usize),
) -> BenchResult<(String, f64)> {
    let (medians, kept) = time_modes(model, modes, a, data, (b, t))?;
    let clm = medians[0];
    let mut text = String::new();
    for (m, mode) in modes.iter().enumerate() {
        text += &format!(
            "| {label} | {} | {:.4} | {:.0} | {:.3} | {} |\n",
            mode.name(),
            medians[m],
            (b * t) as f64 / medians[m],
            medians[m] / clm,
            kept[m]
        );
    }
    Ok((text, clm))
}

/// `(used, total)` GiB of device memory.
fn memory_gib(model: &Gpt2Model<Cuda>) -> BenchResult<(f64, f64)> {
    let (free, total) = model.inner().backend().memory_info()?;
    let gib = |x: usize| x as f64 / (1u64 << 30) as f64;
    Ok((gib(total - free), gib(total)))
}

fn run(a: &Args) -> BenchResult<String> {
    let (b, t) = (a.batch, 1024);
    let config = GptConfig::gpt2_124m();
    let n = b * t;
    let (inputs, targets) = batch(n, config.vocab_size);
    let data = (&inputs[..], &targets[..]);
    let modes = [
        Mode::Clm,
        Mode::Eslm { keep: 0.5 },
        Mode::Eslm { keep: 0.3 },
        Mode::Hierarchical { keep: 0.3 },
    ];
    let unfused = [Mode::Clm, Mode::Eslm { keep: 0.3 }];
    let mut text = format!(
        "GPT-2 124M, B={b}, T={t}, {} timed steps per mode after {} warm-up, exit layer {}\n\n\
         | storage, products | mode | median step s | tokens/s | step / CLM | kept tokens |\n\
         |---|---|---|---|---|---|\n",
        a.steps, a.warmup, a.exit_layer
    );
    let mut model = Gpt2Model::new_on(Cuda::new(0)?, config, b, t, 0)?;
    let mut clm_f32 = f64::NAN;
    for (label, precision, fused) in [
        ("f32, f32", MatmulPrecision::F32, true),
        ("f32, tf32", MatmulPrecision::Tf32, true),
        ("f32, bf16", MatmulPrecision::Bf16, true),
        (
            "f32, bf16, epilogues not fused",
            MatmulPrecision::Bf16,
            false,
        ),
    ] {
        model.set_matmul(precision)?;
        model.inner_mut().backend_mut().set_fused_epilogues(fused);
        let modes: &[Mode] = if fused { &modes } else { &unfused };
        let (rows, clm) = rows_of(label, &mut model, modes, a, data, (b, t))?;
        text += &rows;
        if precision == MatmulPrecision::F32 {
            clm_f32 = clm;
        }
    }
    let (used_f32, total) = memory_gib(&model)?;
    let params = model.inner().device_params().len();
    drop(model);
    // llm.c's recipe: bf16 activations and products, f32 master weights and AdamW state (`--storage bf16`).
    let mut gpu = Cuda::new(0)?;
    gpu.set_activation_dtype(Dtype::Bf16)?;
    let mut model = Gpt2Model::new_on(gpu, config, b, t, 0)?;
    text += &rows_of("bf16, bf16", &mut model, &modes, a, data, (b, t))?.0;
    model.inner_mut().backend_mut().set_fused_epilogues(false);
    text += &rows_of(
        "bf16, bf16, epilogues not fused",
        &mut model,
        &unfused,
        a,
        data,
        (b, t),
    )?
    .0;
    let (used_bf16, _) = memory_gib(&model)?;
    drop(model);
    text += &format!(
        "\ndevice memory in use after the runs: {used_f32:.1} GiB (f32 storage), {used_bf16:.1} GiB (bf16 storage) \
         of {total:.1} GiB\n"
    );
    match nccl_all_reduce_s(params, 10) {
        Ok(s) => {
            text += &format!(
                "\nNCCL all-reduce of {params} f32 (one rank, in place): {:.3} ms = {:.2} % of an f32 CLM step\n",
                s * 1e3,
                100.0 * s / clm_f32
            )
        }
        Err(e) => text += &format!("\nNCCL all-reduce: not measured ({e})\n"),
    }
    Ok(text)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("train_step_cuda: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = Cuda::new(0) {
        println!("skipping: no CUDA device ({e})");
        return;
    }
    match run(&args) {
        Ok(text) => {
            println!("{text}");
            if let Some(path) = std::env::var_os("ESLM_BENCH_OUT") {
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("cannot write {}: {e}", path.to_string_lossy());
                }
            }
        }
        Err(e) => {
            eprintln!("train_step_cuda bench failed: {e}");
            std::process::exit(1);
        }
    }
}
