//! One `eslm-train train` invocation: resolve the config (defaults ← TOML ← flags; on `--resume`, the
//! checkpoint's config ← flags), check the device, open the data, build the model and policy, restore a
//! checkpoint if asked, train, and return the summary.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::checkpoint::{latest_checkpoint, load_trainer_state};
use crate::config::{Device, RunConfig, TrainArgs};
use crate::data::open_run_data_for_rank;
use crate::error::{Result, TrainError};
use crate::metrics::MetricsWriter;
use crate::models::{build_model, build_policy};
use crate::trainer::{TrainSummary, Trainer};

/// The fields a resumed run must share with its checkpoint (anything else, e.g. `steps`, may change).
fn resume_fingerprint(c: &RunConfig) -> serde_json::Value {
    serde_json::json!({
        "train": c.train, "val": c.val, "synthetic_documents": c.synthetic_documents, "model": c.model,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
        "batch_size": c.batch_size, "seq_len": c.seq_len, "grad_accum": c.grad_accum, "seed": c.seed,
        "select": c.select, "quantile_scope": c.quantile_scope,
    })
}

/// Resolves the run config of `args`, taking a resumed run's config from its latest checkpoint.
pub fn resolve_config(args: &TrainArgs) -> Result<RunConfig> {
    let cfg = RunConfig::resolve(args)?;
    if !args.resume {
        return Ok(cfg);
    }
    let dir = latest_checkpoint(&cfg.out)?.ok_or_else(|| {
        TrainError::Checkpoint(format!(
            "--resume: no checkpoint under {}; HINT: check --out, or start without --resume",
            cfg.out.join("checkpoints").display()
        ))
    })?;
    let saved = load_trainer_state(&dir)?.config;
    let mut resumed = saved.with_overrides(&args.overrides()?)?;
    resumed.out = cfg.out.clone();
    if resume_fingerprint(&resumed) != resume_fingerprint(&saved) {
        return Err(TrainError::Config(format!(
            "--resume: the flags change the run's model, data or batch shape; the checkpoint has {}",
            resume_fingerprint(&saved)
        )));
    }
    resumed.validate()?;
    Ok(resumed)
}

/// Runs a training invocation. `stop` is the Ctrl-C flag (checked after every step).
pub fn run_training(args: &TrainArgs, stop: Arc<AtomicBool>) -> Result<TrainSummary> {
    run_training_on(args, stop, Arc::new(eslm_collective::SingleProcess))
}

/// Runs a training invocation as one rank of the data-parallel job of `collective` (see [`crate::distributed`]):
/// this rank's data shard and policy seed; rank 0 writes `config.toml` and `metrics.jsonl`.
pub fn run_training_on(
    args: &TrainArgs,
    stop: Arc<AtomicBool>,
    collective: Arc<dyn eslm_collective::Collective>,
) -> Result<TrainSummary> {
    let cfg = resolve_config(args)?;
    let (rank, world) = (collective.rank(), collective.world_size());
    if cfg.device == Device::Cuda {
        return Err(TrainError::CudaUnavailable);
    }
    std::fs::create_dir_all(&cfg.out).map_err(|e| TrainError::io(&cfg.out, e))?;
    let data = open_run_data_for_rank(&cfg, rank, world)?;
    let model = build_model(&cfg, data.vocab_size)?;
    let policy = build_policy(&crate::distributed::policy_config(&cfg, rank))?;
    let mut trainer =
        Trainer::new(cfg.clone(), model, policy, data, stop)?.with_collective(collective.clone());
    let resumed_at = if args.resume {
        Some(trainer.resume()?)
    } else {
        None
    };
    if !collective.is_root() {
        return trainer.run(&mut MetricsWriter::discard());
    }
    let text = toml::to_string(&cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    crate::checkpoint::write_atomic(&cfg.out.join("config.toml"), text.as_bytes())?;
    let mut metrics = MetricsWriter::open(&cfg.out, resumed_at)?;
    trainer.run(&mut metrics)
}
