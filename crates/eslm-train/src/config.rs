//! Run configuration: one [`RunConfig`] resolved from three layers, later layers winning:
//! built-in defaults ← the TOML file given by `--config FILE` ← command-line flags.
//!
//! The flags ([`TrainArgs`]) are all optional; only the flags a user actually passed are serialised (to JSON)
//! and merged over the TOML-derived config, so a flag always beats the file and an absent flag never resets a
//! value from the file. TOML keys are the [`RunConfig`] field names (snake_case); unknown keys are an error.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::policy::{Rho1Norm, ScoreKind};

/// The selection policy of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Every token (baseline).
    Clm,
    /// ESLM: keep tokens with score ≥ VaR_α.
    Eslm,
    /// ESLM with an adaptive α.
    AdaEslm,
    /// Sequence-level then token-level ESLM.
    Hierarchical,
    /// Rho-1 excess loss over a reference model.
    Rho1,
    /// Uniformly random tokens (control).
    Random,
    /// Teacher-score selection with distillation.
    EslmKd,
    /// Importance-sampled tokens, keep probability rising with the score, inverse-probability weights
    /// (an unbiased estimate of the CLM gradient).
    Importance,
}

/// Where the ESLM quantile is taken when a step has several gradient-accumulation micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QuantileScope {
    /// Each micro-batch selects its own α-quantile (one pass; the kept count is exact per micro-batch).
    Micro,
    /// One α-quantile over every token of the optimizer step: a scoring pass over all micro-batches first
    /// (one extra forward per micro-batch), then the training pass with that threshold.
    Global,
}

/// Storage of the trained model's activations on a GPU (`--storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// f32 activations (the default; what the CPU stores).
    #[default]
    F32,
    /// bf16 activations, their gradients and the logits, bf16 products with f32 accumulation; f32 master
    /// weights, gradients and AdamW state (llm.c's mixed-precision recipe). Implies `--matmul bf16`.
    Bf16,
}

impl Storage {
    /// Whether activations are bf16.
    pub fn is_bf16(self) -> bool {
        self == Storage::Bf16
    }
}

/// Precision of the trained model's matrix products on a GPU (`--matmul`; storage is `--storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Matmul {
    /// IEEE f32 products (the default; what the CPU computes).
    #[default]
    F32,
    /// TF32 tensor cores (10-bit mantissa inputs, f32 accumulation).
    Tf32,
    /// bf16 tensor cores (operands rounded to bf16, f32 accumulation and storage).
    Bf16,
}

impl RunConfig {
    /// The precision of the trained model's products: bf16 under `--storage bf16`, else `--matmul`.
    pub fn effective_matmul(&self) -> Matmul {
        if self.storage.is_bf16() {
            Matmul::Bf16
        } else {
            self.matmul
        }
    }
}

impl Matmul {
    /// The engine's precision.
    pub fn precision(self) -> eslm_gpt2::MatmulPrecision {
        match self {
            Matmul::F32 => eslm_gpt2::MatmulPrecision::F32,
            Matmul::Tf32 => eslm_gpt2::MatmulPrecision::Tf32,
            Matmul::Bf16 => eslm_gpt2::MatmulPrecision::Bf16,
        }
    }
}

/// Learning-rate schedule after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay from `lr` to `lr·min_lr_ratio` at the last step.
    Cosine,
    /// Linear decay from `lr` to `lr·min_lr_ratio` at the last step.
    Linear,
    /// Constant `lr`.
    Constant,
}

/// The compute device: `cpu`, or `cuda` / `cuda:N` (GPU ordinal N; `cuda` is `cuda:0`). In TOML / JSON it is
/// the same string (`"cpu"`, `"cuda"`, `"cuda:1"`); it is written back as `"cpu"` or `"cuda:N"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// CPU (always available).
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal (needs a build with `--features cuda`, a driver and the GPU).
    Cuda(usize),
}

impl Device {
    /// Whether this is a CUDA device.
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let err = || {
            format!("`{s}` is not a device (expected cpu, cuda, or cuda:N with N a GPU ordinal, e.g. cuda:1)")
        };
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            t => {
                let n = t.strip_prefix("cuda:").ok_or_else(err)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err());
                }
                n.parse().map(Device::Cuda).map_err(|_| err())
            }
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// clap value parser of `--device` (see [`Device`]).
pub fn parse_device(s: &str) -> std::result::Result<Device, String> {
    s.parse()
}

/// Everything that defines a training run. `Default` is the no-argument run: a tiny GPT-2 trained with ESLM
/// on the built-in synthetic corpus on CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Training shards (a file, a directory of `*.bin`, or a glob); `None`: the built-in synthetic corpus.
    pub train: Option<String>,
    /// Validation shards; `None` with `train` set: no validation.
    pub val: Option<String>,
    /// Documents of the synthetic training split (when `train` is unset).
    pub synthetic_documents: usize,
    /// Model preset: `synth-tiny`, `tiny`, `t` (config T), `124m`, `350m`, `774m`, `1558m`, or `bigram` (the test double).
    pub model: String,
    /// Override of the preset's number of layers L.
    pub n_layer: Option<usize>,
    /// Override of the preset's number of heads H.
    pub n_head: Option<usize>,
    /// Override of the preset's width C.
    pub n_embd: Option<usize>,
    /// Override of the vocabulary size (default: the synthetic corpus's, or GPT-2's 50257 for shards).
    pub vocab_size: Option<usize>,
    /// Start from the weights of this checkpoint directory instead of a random initialisation.
    pub init_from: Option<PathBuf>,
    /// Sequences per micro-batch (B).
    pub batch_size: usize,
    /// Tokens per sequence (T).
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Stop after this many training tokens (overrides `steps` when set).
    pub token_budget: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Decay after warm-up.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (≤ 0: off).
    pub grad_clip: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Seed of the initialisation, the data order and the random policy.
    pub seed: u64,
    /// Compute device.
    pub device: Device,
    /// Output directory (metrics.jsonl, checkpoints/).
    pub out: PathBuf,
    /// Evaluate every this many steps (0: only before and after training).
    pub eval_every: u64,
    /// Validation batches per evaluation (0: the whole validation set).
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Also checkpoint whenever this much wall-clock has passed since the last checkpoint (or the start), e.g.
    /// `30m` ([`parse_duration`]): bounds the work a preempted or killed job loses, whatever the step speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval: Option<String>,
    /// Checkpoints kept on disk (older ones are deleted).
    pub keep_last: usize,
    /// Selection policy.
    pub select: PolicyKind,
    /// Token score of eslm, ada-eslm, hierarchical and eslm-kd.
    pub score: ScoreKind,
    /// Fraction of tokens dropped (eslm, hierarchical token level, eslm-kd; ada-eslm: initial α).
    pub alpha: f64,
    /// Quantile scope under gradient accumulation.
    pub quantile_scope: QuantileScope,
    /// Hierarchical: blocks of the shallow scoring pass.
    pub exit_layer: usize,
    /// Hierarchical: fraction of sequences dropped.
    pub instance_alpha: f64,
    /// Rho-1 / random: fraction of tokens kept.
    pub keep: f64,
    /// Rho-1: reference model checkpoint directory.
    pub reference: Option<PathBuf>,
    /// Rho-1: normalisation of the kept loss.
    pub rho1_norm: Rho1Norm,
    /// ESLM-KD: teacher checkpoint directory.
    pub teacher: Option<PathBuf>,
    /// ESLM-KD: weight W of the distillation term.
    pub kd_weight: f64,
    /// ESLM-KD: temperature τ.
    pub temperature: f64,
    /// Ada-ESLM: lower bound on α.
    pub alpha_min: f64,
    /// Ada-ESLM: upper bound on α.
    pub alpha_max: f64,
    /// Ada-ESLM: target share of the score mass on kept tokens.
    pub target_mass: f64,
    /// Ada-ESLM: controller gain η.
    pub ada_gain: f64,
    /// Ada-ESLM: EMA coefficient β.
    pub ada_ema: f64,
    /// Importance: the uniform share λ of the sampling weights (1 = uniform random, 0 = proportional to score).
    pub importance_floor: f64,
    /// Random: draw the kept rows before the forward and run the LM head on them only.
    pub lazy_head: bool,
    /// Selection schedule: train every token (CLM) for this many steps first (`policy::schedule`).
    pub select_warmup: u64,
    /// Selection schedule: after the warm-up, grow α linearly from 0 over this many steps.
    pub alpha_ramp: u64,
    /// Skip a step whose loss or gradient is not finite instead of stopping the run.
    pub skip_nonfinite: bool,
    /// Data parallel: shard the AdamW state over the ranks (ZeRO-1; docs/distributed.md).
    pub shard_optimizer: bool,
    /// CUDA: the precision of the trained model's matrix products (bf16 whenever `storage` is bf16).
    pub matmul: Matmul,
    /// CUDA: the storage of the trained model's activations.
    pub storage: Storage,
    /// Divergence rule F: stop when the loss exceeds F·ln V or F × its running median (0: off; see `guard`).
    pub divergence_factor: f64,
    /// Divergence rule G: stop when the gradient norm exceeds G × its running median (0: off).
    pub grad_spike_factor: f64,
    /// Wall-clock limit of the training loop, e.g. `90s`, `30m`, `2h`, `1h30m` (see [`parse_duration`]).
    pub time_budget: Option<String>,
    /// Show the progress bar.
    pub progress: bool,
    /// The step at which the LR schedule ends, when a `--time-budget` binds: set by the trainer from the measured
    /// step time (see docs/trainer.md), saved with checkpoints; `None`: the run's total steps.
    pub lr_horizon: Option<u64>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            train: None,
            val: None,
            synthetic_documents: 4096,
            model: "synth-tiny".into(),
            n_layer: None,
            n_head: None,
            n_embd: None,
            vocab_size: None,
            init_from: None,
            batch_size: 8,
            seq_len: 128,
            grad_accum: 1,
            steps: 300,
            token_budget: None,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            weight_decay: 0.0,
            grad_clip: 1.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            seed: 1337,
            device: Device::Cpu,
            out: PathBuf::from("runs/default"),
            eval_every: 100,
            eval_batches: 16,
            checkpoint_every: 0,
            checkpoint_interval: None,
            keep_last: 2,
            select: PolicyKind::Eslm,
            score: ScoreKind::Loss,
            alpha: 0.5,
            quantile_scope: QuantileScope::Micro,
            exit_layer: 1,
            instance_alpha: 0.5,
            keep: 0.5,
            reference: None,
            rho1_norm: Rho1Norm::Kept,
            teacher: None,
            kd_weight: 0.5,
            temperature: 1.0,
            alpha_min: 0.1,
            alpha_max: 0.9,
            target_mass: 0.6,
            ada_gain: 0.05,
            ada_ema: 0.9,
            importance_floor: 0.2,
            lazy_head: false,
            select_warmup: 0,
            alpha_ramp: 0,
            skip_nonfinite: false,
            shard_optimizer: false,
            matmul: Matmul::F32,
            storage: Storage::F32,
            divergence_factor: 3.0,
            grad_spike_factor: 100.0,
            time_budget: None,
            progress: true,
            lr_horizon: None,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// clap value parser of every float flag: a finite number (NaN and ±inf are refused, naming the value).
pub fn finite_f64(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// Parses a wall-clock duration: a sequence of `<number><unit>` with units `s`, `m`, `h`, `d` (`90s`, `30m`,
/// `2h`, `1h30m`, `1.5h`); a bare number is seconds. Returns seconds (> 0).
pub fn parse_duration(text: &str) -> std::result::Result<f64, String> {
    let t = text.trim();
    let err = || format!("`{text}` is not a duration (expected e.g. 90s, 30m, 2h, 1h30m)");
    if t.is_empty() {
        return Err(err());
    }
    if let Ok(v) = t.parse::<f64>() {
        return if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(err())
        };
    }
    let (mut total, mut num) = (0.0f64, String::new());
    for c in t.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86400.0,
            _ => return Err(err()),
        };
        let v: f64 = num.parse().map_err(|_| err())?;
        total += v * unit;
        num.clear();
    }
    if !(num.is_empty() && total.is_finite() && total > 0.0) {
        return Err(err());
    }
    Ok(total)
}

/// Refuses NaN / ±inf anywhere in a parsed TOML config, naming the key and the value.
fn check_toml_floats(value: &toml::Value, key: &str) -> Result<()> {
    match value {
        toml::Value::Float(f) if !f.is_finite() => Err(TrainError::Config(format!(
            "key `{key}` = {f} is not a finite number"
        ))),
        toml::Value::Table(t) => t.iter().try_for_each(|(k, v)| check_toml_floats(v, k)),
        toml::Value::Array(a) => a.iter().try_for_each(|v| check_toml_floats(v, key)),
        _ => Ok(()),
    }
}

/// Training flags. Every flag is optional and overrides the same key of `--config FILE` (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize)]
pub struct TrainArgs {
    /// TOML config file (keys = the long flag names with `_` for `-`); flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Continue from the latest checkpoint in --out (exact resume).
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// Replace the run already in --out (its metrics.jsonl, config.toml and checkpoints/) by a fresh run.
    #[arg(long, conflicts_with = "resume")]
    #[serde(skip)]
    pub overwrite: bool,
    /// Training shards: file, directory or glob (default: the built-in synthetic corpus).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<String>,
    /// Validation shards: file, directory or glob.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
    /// Documents in the synthetic training split.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic_documents: Option<usize>,
    /// Model preset: synth-tiny, tiny (context = --seq-len), t, 124m, 350m, 774m, 1558m (context 1024), bigram.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Number of layers L (overrides the preset).
    #[arg(long = "n-layer", visible_alias = "layers")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_layer: Option<usize>,
    /// Number of heads H (overrides the preset).
    #[arg(long = "n-head", visible_alias = "heads")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_head: Option<usize>,
    /// Width C (overrides the preset).
    #[arg(long = "n-embd", visible_alias = "width")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_embd: Option<usize>,
    /// Vocabulary size (default: the data's).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// Initialise from this checkpoint directory.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Sequences per micro-batch B.
    #[arg(long, short = 'b')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Tokens per sequence T.
    #[arg(long, short = 't')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Stop after this many training tokens (overrides --steps).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u64>,
    /// Peak learning rate.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Final LR as a fraction of --lr.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_ratio: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// LR decay after warm-up.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// AdamW weight decay.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0: off).
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Seed (init, data order, random policy).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Device: cpu, cuda or cuda:N (GPU ordinal N; cuda = cuda:0). CUDA needs a build with --features cuda.
    #[arg(long, value_parser = parse_device)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// Output directory.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// Evaluate every N steps (0: before and after only).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<u64>,
    /// Validation batches per evaluation (0: all).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_batches: Option<usize>,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// Also checkpoint whenever this much wall-clock has passed since the last one: 90s, 30m, 2h.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval: Option<String>,
    /// Checkpoints kept on disk.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<usize>,
    /// Selection policy.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub select: Option<PolicyKind>,
    /// Token score: loss or entropy.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<ScoreKind>,
    /// Fraction of tokens dropped (ada-eslm: initial α).
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Quantile scope under gradient accumulation: micro or global.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantile_scope: Option<QuantileScope>,
    /// Random: choose the kept rows before the forward and compute the LM head (logits, statistics) for them
    /// only: the same rows and gradient as `random`, without the LM-head forward of dropped tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub lazy_head: bool,
    /// Importance: uniform share λ of the sampling weights, in [0, 1] [default: 0.2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub importance_floor: Option<f64>,
    /// Train every token (CLM) for this many steps before the policy selects [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub select_warmup: Option<u64>,
    /// After the warm-up, grow the policy's α linearly from 0 over this many steps [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha_ramp: Option<u64>,
    /// Hierarchical: blocks of the shallow pass.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_layer: Option<usize>,
    /// Hierarchical: fraction of sequences dropped.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_alpha: Option<f64>,
    /// Rho-1 / random: fraction of tokens kept.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<f64>,
    /// Rho-1: reference checkpoint directory.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<PathBuf>,
    /// Rho-1: normalise by kept tokens or by the keep budget.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rho1_norm: Option<Rho1Norm>,
    /// ESLM-KD: teacher checkpoint directory.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<PathBuf>,
    /// ESLM-KD: distillation weight W.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kd_weight: Option<f64>,
    /// ESLM-KD: temperature τ.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Ada-ESLM: lower bound on α.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha_min: Option<f64>,
    /// Ada-ESLM: upper bound on α.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha_max: Option<f64>,
    /// Ada-ESLM: target kept share of the score mass.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_mass: Option<f64>,
    /// Ada-ESLM: controller gain.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ada_gain: Option<f64>,
    /// Ada-ESLM: EMA coefficient of the statistic.
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ada_ema: Option<f64>,
    /// Skip steps with a non-finite loss or gradient instead of stopping.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub skip_nonfinite: bool,
    /// Data parallel: shard the AdamW moments over the ranks (ZeRO-1: reduce-scatter of gradients, all-gather
    /// of parameters; 1/R of the optimizer memory per rank). Checkpoints keep the unsharded format.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub shard_optimizer: bool,
    /// CUDA: precision of the trained model's matrix products: f32 (exact, the default), tf32 or bf16 tensor
    /// cores (operands rounded, f32 accumulation; storage stays f32 either way).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matmul: Option<Matmul>,
    /// CUDA: storage of the activations, their gradients and the logits: f32 (the default) or bf16 (llm.c's
    /// mixed-precision recipe: f32 master weights, gradients and AdamW state, bf16 products; implies --matmul
    /// bf16; not with --select eslm-kd).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
    /// Stop when the loss exceeds F·ln(vocab) or F × its running median (0: off).
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence_factor: Option<f64>,
    /// Stop when the gradient norm exceeds G × its running median (0: off).
    #[arg(long, value_parser = finite_f64)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_spike_factor: Option<f64>,
    /// Wall-clock limit of training: 90s, 30m, 2h, 1h30m; stops with a checkpoint (see docs/trainer.md).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_budget: Option<String>,
    /// Hide the progress bar.
    #[arg(long)]
    #[serde(skip)]
    pub no_progress: bool,
}

impl TrainArgs {
    /// The flags the user set, as a JSON object keyed like [`RunConfig`].
    pub fn overrides(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut map = match serde_json::to_value(self)? {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        if self.no_progress {
            map.insert("progress".into(), serde_json::Value::Bool(false));
        }
        Ok(map)
    }
}

impl RunConfig {
    /// Parses a TOML config (missing keys take their defaults; unknown keys are an error).
    pub fn from_toml_str(text: &str) -> Result<RunConfig> {
        let value: toml::Value =
            toml::from_str(text).map_err(|e| TrainError::Config(format!("config file: {e}")))?;
        check_toml_floats(&value, "")?;
        value
            .try_into()
            .map_err(|e| TrainError::Config(format!("config file: {e}")))
    }

    /// Reads a TOML config file.
    pub fn from_toml_file(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_toml_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }

    /// Returns `self` with `overrides` (a JSON object of field → value) applied.
    pub fn with_overrides(
        &self,
        overrides: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<RunConfig> {
        let mut value = serde_json::to_value(self)?;
        if let serde_json::Value::Object(map) = &mut value {
            for (k, v) in overrides {
                map.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(value).map_err(|e| TrainError::Config(e.to_string()))
    }

    /// Resolves defaults ← `--config` file ← flags, then validates.
    pub fn resolve(args: &TrainArgs) -> Result<RunConfig> {
        let base = match &args.config {
            Some(path) => RunConfig::from_toml_file(path)?,
            None => RunConfig::default(),
        };
        let cfg = base.with_overrides(&args.overrides()?)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges that do not depend on the model or data.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.batch_size == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad("--batch-size, --seq-len and --grad-accum must be at least 1".into());
        }
        if self.steps == 0 && self.token_budget.is_none() {
            return bad("--steps must be at least 1 (or set --token-budget)".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be > 0, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "--min-lr-ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        if self.keep_last == 0 {
            return bad("--keep-last must be at least 1".into());
        }
        if self.model == "bigram" && self.device.is_cuda() {
            return bad(format!(
                "--model bigram is a CPU-only test double and cannot run on --device {}; use --device cpu, or a \
                 GPT-2 preset (synth-tiny, tiny, t, 124m, ...) on the GPU",
                self.device
            ));
        }
        if self.matmul != Matmul::F32 && !self.device.is_cuda() {
            return bad(format!(
                "--matmul {:?} selects the GPU's tensor-core products; it needs --device cuda (got --device {})",
                self.matmul, self.device
            )
            .to_lowercase());
        }
        if self.storage.is_bf16() {
            if !self.device.is_cuda() {
                return bad(format!(
                    "--storage bf16 stores the GPU's activations in bf16; it needs --device cuda (got --device {})",
                    self.device
                ));
            }
            if !matches!(self.matmul, Matmul::F32 | Matmul::Bf16) {
                return bad(format!(
                    "--storage bf16 multiplies bf16 operands; drop --matmul {:?} (bf16 storage implies --matmul \
                     bf16)",
                    self.matmul
                )
                .to_lowercase());
            }
            if self.select == PolicyKind::EslmKd {
                return bad("--storage bf16 with --select eslm-kd: the distillation kernel reads f32 logits; \
                            use --storage f32"
                    .into());
            }
        }
        if self.token_budget == Some(0) {
            return bad(
                "--token-budget must be at least 1 token (omit it to train for --steps)".into(),
            );
        }
        let floats = [
            ("--lr", self.lr),
            ("--min-lr-ratio", self.min_lr_ratio),
            ("--weight-decay", self.weight_decay),
            ("--grad-clip", self.grad_clip),
            ("config key `beta1`", self.beta1),
            ("config key `beta2`", self.beta2),
            ("config key `eps`", self.eps),
            ("--alpha", self.alpha),
            ("--instance-alpha", self.instance_alpha),
            ("--keep", self.keep),
            ("--kd-weight", self.kd_weight),
            ("--temperature", self.temperature),
            ("--alpha-min", self.alpha_min),
            ("--alpha-max", self.alpha_max),
            ("--target-mass", self.target_mass),
            ("--ada-gain", self.ada_gain),
            ("--ada-ema", self.ada_ema),
            ("--divergence-factor", self.divergence_factor),
            ("--grad-spike-factor", self.grad_spike_factor),
        ];
        for (flag, v) in floats {
            if !v.is_finite() {
                return bad(format!("{flag} must be a finite number, got {v}"));
            }
        }
        for (flag, v) in [
            ("--weight-decay", self.weight_decay),
            ("--grad-clip", self.grad_clip),
            ("--divergence-factor", self.divergence_factor),
            ("--grad-spike-factor", self.grad_spike_factor),
        ] {
            if v < 0.0 {
                return bad(format!("{flag} must be ≥ 0 (0 turns it off), got {v}"));
            }
        }
        if self.divergence_factor > 0.0 && self.divergence_factor <= 1.0 {
            return bad(format!(
                "--divergence-factor must be > 1 (or 0 to turn the rule off), got {}",
                self.divergence_factor
            ));
        }
        if self.grad_spike_factor > 0.0 && self.grad_spike_factor <= 1.0 {
            return bad(format!(
                "--grad-spike-factor must be > 1 (or 0 to turn the rule off), got {}",
                self.grad_spike_factor
            ));
        }
        if self.temperature <= 0.0 {
            return bad(format!(
                "--temperature must be > 0, got {}",
                self.temperature
            ));
        }
        if let Some(t) = &self.time_budget {
            parse_duration(t).map_err(|e| TrainError::Config(format!("--time-budget: {e}")))?;
        }
        if let Some(t) = &self.checkpoint_interval {
            parse_duration(t)
                .map_err(|e| TrainError::Config(format!("--checkpoint-interval: {e}")))?;
        }
        if self.select == PolicyKind::Rho1 && self.reference.is_none() {
            return bad("--select rho1 needs --reference CKPT (a checkpoint directory of the reference model)".into());
        }
        if self.select == PolicyKind::EslmKd && self.teacher.is_none() {
            return bad("--select eslm-kd needs --teacher CKPT (a checkpoint directory of the teacher model)".into());
        }
        Ok(())
    }

    /// Tokens per optimizer step (B·T·grad_accum).
    pub fn tokens_per_step(&self) -> u64 {
        (self.batch_size * self.seq_len * self.grad_accum) as u64
    }

    /// The `--time-budget` in seconds, if set (validated by [`RunConfig::validate`]).
    pub fn time_budget_s(&self) -> Option<f64> {
        self.time_budget
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
    }

    /// The `--checkpoint-interval` in seconds, if set (validated by [`RunConfig::validate`]).
    pub fn checkpoint_interval_s(&self) -> Option<f64> {
        self.checkpoint_interval
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
    }

    /// The number of optimizer steps of the run (from `token_budget` when set).
    pub fn total_steps(&self) -> u64 {
        match self.token_budget {
            Some(budget) => budget.div_ceil(self.tokens_per_step()).max(1),
            None => self.steps,
        }
    }

    /// The learning rate of step `step` (0-based): linear warm-up to `lr`, then the decay schedule down to
    /// `lr·min_lr_ratio` at the last step.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr_schedule().lr(step)
    }

    /// The run's learning-rate schedule (the engine's one `LrSchedule`): warm-up over `warmup_steps`, then the
    /// decay to `lr·min_lr_ratio` at the last step.
    pub fn lr_schedule(&self) -> eslm_gpt2::LrSchedule {
        eslm_gpt2::LrSchedule {
            max_lr: self.lr,
            min_lr: self.lr * self.min_lr_ratio,
            warmup_steps: self.warmup_steps,
            total_steps: self
                .lr_horizon
                .unwrap_or(self.total_steps())
                .min(self.total_steps())
                .max(self.warmup_steps),
            decay: match self.schedule {
                Schedule::Cosine => eslm_gpt2::Decay::Cosine,
                Schedule::Linear => eslm_gpt2::Decay::Linear,
                Schedule::Constant => eslm_gpt2::Decay::Constant,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:0".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:1".parse::<Device>(), Ok(Device::Cuda(1)));
        assert_eq!(parse_device("cuda:12"), Ok(Device::Cuda(12)));
        for bad in [
            "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda1", "cuda:1:2", "",
        ] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("cpu, cuda, or cuda:N"), "{err}");
        }
        assert_eq!(Device::Cpu.to_string(), "cpu");
        assert_eq!(Device::Cuda(0).to_string(), "cuda:0");
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
    }

    #[test]
    fn device_config_format_is_backward_compatible() {
        // The strings of the old `Device { Cpu, Cuda }` enum still parse, in TOML and JSON.
        for (text, want) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:2", Device::Cuda(2)),
        ] {
            let toml_cfg: RunConfig = toml::from_str(&format!("device = \"{text}\"")).unwrap();
            assert_eq!(toml_cfg.device, want);
            let json: Device = serde_json::from_str(&format!("\"{text}\"")).unwrap();
            assert_eq!(json, want);
        }
        // Round trip through the written config.
        let cfg = RunConfig {
            device: Device::Cuda(1),
            ..RunConfig::default()
        };
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("device = \"cuda:1\""), "{text}");
        assert_eq!(toml::from_str::<RunConfig>(&text).unwrap(), cfg);
        assert!(toml::to_string(&RunConfig::default())
            .unwrap()
            .contains("device = \"cpu\""));
        let err = toml::from_str::<RunConfig>("device = \"tpu\"").unwrap_err();
        assert!(err.to_string().contains("`tpu` is not a device"), "{err}");
    }

    #[test]
    fn device_flag_overrides_the_file() {
        let args = TrainArgs {
            device: Some(Device::Cuda(1)),
            ..TrainArgs::default()
        };
        let cfg = RunConfig::default()
            .with_overrides(&args.overrides().unwrap())
            .unwrap();
        assert_eq!(cfg.device, Device::Cuda(1));
    }

    #[test]
    fn bigram_on_cuda_is_refused() {
        let cfg = RunConfig {
            model: "bigram".into(),
            device: Device::Cuda(0),
            ..RunConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("--model bigram") && err.contains("--device cpu"),
            "{err}"
        );
    }
}
