//! Building models from a run config and opening them from checkpoint directories, and building the run's
//! selection policy (which may itself open a reference or teacher model).

use std::path::Path;

use crate::bigram::BigramModel;
use crate::config::{Device, PolicyKind, RunConfig, Storage};
use crate::error::{Result, TrainError};
use eslm_gpt2::GptConfig;

use crate::engine::Gpt2Model;
use crate::model::LanguageModel;
use crate::policy::{
    AdaConfig, AdaEslm, Clm, Eslm, EslmKd, Hierarchical, Importance, KdConfig, RandomKeep, Rho1,
    Scheduled, SelectionPolicy,
};

/// The GPT-2 shape `(L, H, C, maxT)` of a preset name (before `--n-layer/--n-head/--n-embd` overrides), or
/// `None` for `bigram`. The context `maxT` of `synth-tiny` and `tiny` is `seq_len` (the run's `--seq-len`); the
/// GPT-2 sizes have 1024 positions, and a longer `--seq-len` is refused.
pub fn preset_shape(name: &str, seq_len: usize) -> Result<Option<(usize, usize, usize, usize)>> {
    Ok(Some(match name {
        "synth-tiny" => (2, 4, 128, seq_len),
        "tiny" => (2, 2, 16, seq_len),
        "t" => (4, 4, 256, 1024),
        "124m" => (12, 12, 768, 1024),
        "350m" => (24, 16, 1024, 1024),
        "774m" => (36, 20, 1280, 1024),
        "1558m" => (48, 25, 1600, 1024),
        "bigram" => return Ok(None),
        other => {
            return Err(TrainError::Config(format!(
                "unknown --model preset `{other}` (expected synth-tiny, tiny, t, 124m, 350m, 774m, 1558m or bigram)"
            )))
        }
    }))
}

/// The GPT-2 config of a run for a vocabulary of `vocab` ids (`None` for the bigram test double).
pub fn gpt_config(cfg: &RunConfig, vocab: usize) -> Result<Option<GptConfig>> {
    let Some((l, h, c, max_t)) = preset_shape(&cfg.model, cfg.seq_len)? else {
        return Ok(None);
    };
    let (l, h, c) = (
        cfg.n_layer.unwrap_or(l),
        cfg.n_head.unwrap_or(h),
        cfg.n_embd.unwrap_or(c),
    );
    if cfg.seq_len > max_t {
        return Err(TrainError::Config(format!(
            "--seq-len {} exceeds the context of the `{}` preset ({max_t} positions); HINT: lower --seq-len \
             (synth-tiny and tiny take their context from --seq-len)",
            cfg.seq_len, cfg.model
        )));
    }
    GptConfig::new(l, h, c, vocab, max_t)
        .map(Some)
        .map_err(|e| TrainError::Config(e.to_string()))
}

/// The CUDA side of model building: with the `cuda` feature, `Gpt2Model<Cuda>` on GPU `ordinal`; without it,
/// [`TrainError::CudaUnavailable`] ("rebuild with --features cuda").
#[cfg(feature = "cuda")]
mod on_cuda {
    use std::path::Path;

    use eslm_gpt2::backend::cuda::Dtype;
    use eslm_gpt2::{Cuda, GptConfig};

    use crate::config::Storage;
    use crate::engine::Gpt2Model;
    use crate::error::{Result, TrainError};
    use crate::model::LanguageModel;

    /// Checks that a CUDA driver loads and that GPU `ordinal` exists, without opening it (so that a run fails
    /// before it touches its output directory).
    pub fn probe(ordinal: usize) -> Result<()> {
        let count = eslm_kernels::cuda::cuda_probe()
            .map_err(|e| TrainError::Device(format!("--device cuda:{ordinal}: {e}")))?;
        if ordinal >= count {
            return Err(TrainError::Device(format!(
                "--device cuda:{ordinal}: this machine has {count} GPU(s) (ordinals 0..{count}); pass one of \
                 them, or use --device cpu"
            )));
        }
        Ok(())
    }

    /// GPU `ordinal` with activations stored as `storage` says (before any model allocates on it).
    fn backend(ordinal: usize, storage: Storage) -> Result<Cuda> {
        let device = |e| TrainError::Device(format!("--device cuda:{ordinal}: {e}"));
        let mut gpu = Cuda::new(ordinal).map_err(device)?;
        if storage.is_bf16() {
            gpu.set_activation_dtype(Dtype::Bf16).map_err(|e| {
                TrainError::Device(format!("--storage bf16 on cuda:{ordinal}: {e}"))
            })?;
        }
        Ok(gpu)
    }

    pub fn new_model(
        ordinal: usize,
        config: GptConfig,
        (b_max, t_max): (usize, usize),
        seed: u64,
        storage: Storage,
    ) -> Result<Box<dyn LanguageModel>> {
        Ok(Box::new(Gpt2Model::new_on(
            backend(ordinal, storage)?,
            config,
            b_max,
            t_max,
            seed,
        )?))
    }

    pub fn open_model(
        ordinal: usize,
        dir: &Path,
        (b_max, t_max): (usize, usize),
        storage: Storage,
    ) -> Result<Box<dyn LanguageModel>> {
        Ok(Box::new(Gpt2Model::open_on(
            backend(ordinal, storage)?,
            dir,
            b_max,
            t_max,
        )?))
    }
}

#[cfg(not(feature = "cuda"))]
mod on_cuda {
    use std::path::Path;

    use eslm_gpt2::GptConfig;

    use crate::config::Storage;
    use crate::error::{Result, TrainError};
    use crate::model::LanguageModel;

    pub fn probe(_ordinal: usize) -> Result<()> {
        Err(TrainError::CudaUnavailable)
    }

    pub fn new_model(
        _ordinal: usize,
        _config: GptConfig,
        _batch: (usize, usize),
        _seed: u64,
        _storage: Storage,
    ) -> Result<Box<dyn LanguageModel>> {
        Err(TrainError::CudaUnavailable)
    }

    pub fn open_model(
        _ordinal: usize,
        _dir: &Path,
        _batch: (usize, usize),
        _storage: Storage,
    ) -> Result<Box<dyn LanguageModel>> {
        Err(TrainError::CudaUnavailable)
    }
}

/// Checks that `device` can be used by this build on this machine: always for the CPU; for `cuda:N`, a build
/// with the `cuda` feature ([`TrainError::CudaUnavailable`] otherwise), a loadable driver ("no CUDA driver
/// found; use --device cpu") and GPU N. Opens nothing.
pub fn check_device(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(n) => on_cuda::probe(n),
    }
}

/// Builds the model of `cfg` for a vocabulary of `vocab` ids on `cfg.device`: randomly initialised from
/// `cfg.seed` (the same parameters on every device), or loaded from `cfg.init_from`.
pub fn build_model(cfg: &RunConfig, vocab: usize) -> Result<Box<dyn LanguageModel>> {
    if let Some(dir) = &cfg.init_from {
        let batch = (cfg.batch_size, cfg.seq_len);
        let model = open_model_stored(dir, batch, cfg.device, cfg.storage)?;
        if model.vocab_size() != vocab {
            return Err(TrainError::Config(format!(
                "--init-from {}: model vocabulary {} differs from the data's {vocab}",
                dir.display(),
                model.vocab_size()
            )));
        }
        return Ok(model);
    }
    match (gpt_config(cfg, vocab)?, cfg.device) {
        (None, Device::Cpu) => Ok(Box::new(BigramModel::new(vocab))),
        (None, device) => Err(bigram_on_cuda(device)),
        (Some(gc), Device::Cpu) => Ok(Box::new(Gpt2Model::new(
            gc,
            cfg.batch_size,
            cfg.seq_len,
            cfg.seed,
        )?)),
        (Some(gc), Device::Cuda(n)) => {
            let batch = (cfg.batch_size, cfg.seq_len);
            on_cuda::new_model(n, gc, batch, cfg.seed, cfg.storage)
        }
    }
}

fn bigram_on_cuda(device: Device) -> TrainError {
    TrainError::Config(format!(
        "the bigram model is a CPU-only test double and cannot run on --device {device}; use --device cpu"
    ))
}

/// Opens the model stored in checkpoint directory `dir` (a trainer checkpoint or an HF GPT-2 directory) on the
/// CPU with buffers for batches up to `b_max × t_max`.
pub fn open_model(dir: &Path, b_max: usize, t_max: usize) -> Result<Box<dyn LanguageModel>> {
    open_model_on(dir, b_max, t_max, Device::Cpu)
}

/// [`open_model`] on `device` (checkpoints have one format on every device), f32 activations.
pub fn open_model_on(
    dir: &Path,
    b_max: usize,
    t_max: usize,
    device: Device,
) -> Result<Box<dyn LanguageModel>> {
    open_model_stored(dir, (b_max, t_max), device, Storage::F32)
}

/// [`open_model_on`] with the activations of a GPU model stored as `storage` says (`--storage`).
pub fn open_model_stored(
    dir: &Path,
    (b_max, t_max): (usize, usize),
    device: Device,
    storage: Storage,
) -> Result<Box<dyn LanguageModel>> {
    crate::checkpoint::verify_checkpoint(dir)?;
    let bigram = dir.join("bigram.bin");
    if bigram.is_file() {
        if device.is_cuda() {
            return Err(bigram_on_cuda(device));
        }
        let w = crate::tensor_file::read_f32(&bigram)?;
        let vocab = (1..=65536usize)
            .find(|&v| v * v.div_ceil(8) * 8 == w.len())
            .ok_or_else(|| {
                TrainError::Checkpoint(format!("{}: not a bigram weight matrix", bigram.display()))
            })?;
        let mut m = BigramModel::new(vocab);
        m.load_model(dir)?;
        return Ok(Box::new(m));
    }
    if !dir.join("config.json").is_file() {
        return Err(TrainError::Checkpoint(format!(
            "{}: no model found (expected config.json + model.safetensors); HINT: pass a checkpoint directory such as OUT/checkpoints/step_00000300",
            dir.display()
        )));
    }
    match device {
        Device::Cpu => Ok(Box::new(Gpt2Model::open(dir, b_max, t_max)?)),
        Device::Cuda(n) => on_cuda::open_model(n, dir, (b_max, t_max), storage),
    }
}

/// Opens the reference (rho1) or teacher (eslm-kd) model at `path` and checks that it can score the run's
/// batches: the same vocabulary as the trained model (`vocab`) and a context of at least `--seq-len`. It runs on
/// the run's device (`cfg.device`), like the trained model.
fn open_scorer(
    cfg: &RunConfig,
    path: &Path,
    flag: &str,
    vocab: usize,
) -> Result<Box<dyn LanguageModel>> {
    let m = open_model_stored(path, (cfg.batch_size, cfg.seq_len), cfg.device, cfg.storage)?;
    if m.vocab_size() != vocab {
        return Err(TrainError::Config(format!(
            "{flag} {}: its vocabulary has {} ids but the trained model's has {vocab}; its token scores would \
             be meaningless. HINT: use a {} trained on the same tokenizer",
            path.display(),
            m.vocab_size(),
            &flag[2..]
        )));
    }
    if m.max_seq_len() < cfg.seq_len {
        return Err(TrainError::Config(format!(
            "{flag} {}: its context is {} positions but --seq-len is {}. HINT: pass --seq-len {} or less, or \
             a {} with a longer context",
            path.display(),
            m.max_seq_len(),
            cfg.seq_len,
            m.max_seq_len(),
            &flag[2..]
        )));
    }
    Ok(m)
}

/// Builds the selection policy of `cfg` for a trained model with `vocab` ids (opening and checking the
/// reference / teacher model for rho1 / eslm-kd), wrapped in the selection schedule when `--select-warmup` or
/// `--alpha-ramp` is set.
pub fn build_policy(cfg: &RunConfig, vocab: usize) -> Result<Box<dyn SelectionPolicy>> {
    let policy = build_base_policy(cfg, vocab)?;
    Ok(if cfg.select_warmup > 0 || cfg.alpha_ramp > 0 {
        Box::new(Scheduled::new(policy, cfg.select_warmup, cfg.alpha_ramp))
    } else {
        policy
    })
}

/// The policy named by `--select`, without a selection schedule.
fn build_base_policy(cfg: &RunConfig, vocab: usize) -> Result<Box<dyn SelectionPolicy>> {
    Ok(match cfg.select {
        PolicyKind::Clm => Box::new(Clm),
        PolicyKind::Eslm => Box::new(Eslm::new(cfg.score, cfg.alpha)?),
        PolicyKind::AdaEslm => Box::new(AdaEslm::new(
            cfg.score,
            AdaConfig {
                alpha0: cfg.alpha,
                alpha_min: cfg.alpha_min,
                alpha_max: cfg.alpha_max,
                target_mass: cfg.target_mass,
                gain: cfg.ada_gain,
                ema: cfg.ada_ema,
            },
        )?),
        PolicyKind::Hierarchical => Box::new(Hierarchical::new(
            cfg.score,
            cfg.exit_layer,
            cfg.instance_alpha,
            cfg.alpha,
        )?),
        PolicyKind::Rho1 => {
            let path = cfg
                .reference
                .as_ref()
                .ok_or_else(|| TrainError::Config("rho1 needs --reference".into()))?;
            Box::new(Rho1::new(
                open_scorer(cfg, path, "--reference", vocab)?,
                cfg.keep,
                cfg.rho1_norm,
            )?)
        }
        PolicyKind::Random => {
            Box::new(RandomKeep::new(cfg.keep, cfg.seed)?.with_lazy_head(cfg.lazy_head))
        }
        PolicyKind::Importance => Box::new(Importance::new(
            cfg.score,
            cfg.keep,
            cfg.importance_floor,
            cfg.seed,
        )?),
        PolicyKind::EslmKd => {
            let path = cfg
                .teacher
                .as_ref()
                .ok_or_else(|| TrainError::Config("eslm-kd needs --teacher".into()))?;
            Box::new(EslmKd::new(
                open_scorer(cfg, path, "--teacher", vocab)?,
                KdConfig {
                    score: cfg.score,
                    alpha: cfg.alpha,
                    kd_weight: cfg.kd_weight,
                    temperature: cfg.temperature,
                },
            )?)
        }
    })
}
