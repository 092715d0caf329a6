//! One `eslm-train train` invocation: resolve the config (defaults ← TOML ← flags; on `--resume`, the
//! checkpoint's config ← flags), lock the run directory and check that it holds no other run, check the device,
//! open the data, build the model and policy, restore a checkpoint if asked, train, and return the summary.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::checkpoint::{
    adopt_legacy_checkpoints, latest_checkpoint, load_trainer_state, recover_checkpoints,
};
use crate::config::{PolicyKind, RunConfig, TrainArgs};
use crate::data::open_run_data_for_rank;
use crate::error::{Result, TrainError};
use crate::metrics::MetricsWriter;
use crate::models::{build_model, build_policy, check_device};
use crate::outdir::{claim_fresh, RunDirLock};
use crate::trainer::{TrainSummary, Trainer};

/// The fields a resumed run must share with its checkpoint (anything else, e.g. `steps`, may change).
pub const RESUME_FIXED: [&str; 14] = [
    "train",
    "val",
    "synthetic_documents",
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "vocab_size",
    "batch_size",
    "seq_len",
    "grad_accum",
    "seed",
    "select",
    "quantile_scope",
];

/// The fixed fields (see [`RESUME_FIXED`]) that differ between a checkpoint's config and the resumed one, as
/// `--flag: checkpoint X, now Y` lines.
pub fn resume_changes(saved: &RunConfig, resumed: &RunConfig) -> Result<Vec<String>> {
    let (a, b) = (serde_json::to_value(saved)?, serde_json::to_value(resumed)?);
    Ok(RESUME_FIXED
        .iter()
        .filter(|k| a.get(**k) != b.get(**k))
        .map(|k| {
            format!(
                "--{}: the checkpoint has {}, the flags ask for {}",
                k.replace('_', "-"),
                a.get(*k).cloned().unwrap_or_default(),
                b.get(*k).cloned().unwrap_or_default()
            )
        })
        .collect())
}

/// Resolves the run config of `args`, taking a resumed run's config from its latest checkpoint. Returns the
/// config and, on `--resume`, the checkpoint it comes from.
pub fn resolve_config_from(args: &TrainArgs) -> Result<(RunConfig, Option<PathBuf>)> {
    let cfg = RunConfig::resolve(args)?;
    if !args.resume {
        return Ok((cfg, None));
    }
    let dir = latest_checkpoint(&cfg.out)?.ok_or_else(|| {
        TrainError::Checkpoint(format!(
            "--resume: no complete checkpoint under {}; HINT: check --out, or start without --resume",
            cfg.out.join("checkpoints").display()
        ))
    })?;
    let saved = load_trainer_state(&dir)?.config;
    let mut resumed = saved.with_overrides(&args.overrides()?)?;
    resumed.out = cfg.out.clone();
    let changes = resume_changes(&saved, &resumed)?;
    if !changes.is_empty() {
        return Err(TrainError::Config(format!(
            "--resume from {}: a resumed run must keep its model, data, batch shape, seed and policy, but {}. \
             HINT: drop those flags, or start a new run in another --out",
            dir.display(),
            changes.join("; ")
        )));
    }
    resumed.validate()?;
    Ok((resumed, Some(dir)))
}

/// Resolves the run config of `args`, taking a resumed run's config from its latest checkpoint.
pub fn resolve_config(args: &TrainArgs) -> Result<RunConfig> {
    resolve_config_from(args).map(|(c, _)| c)
}

/// The policies each policy-specific key applies to.
const POLICY_KEYS: [(&str, &[PolicyKind]); 20] = {
    use PolicyKind::*;
    [
        ("score", &[Eslm, AdaEslm, Hierarchical, EslmKd, Importance]),
        ("alpha", &[Eslm, AdaEslm, Hierarchical, EslmKd]),
        ("lazy_head", &[Random]),
        ("importance_floor", &[Importance]),
        (
            "select_warmup",
            &[
                Eslm,
                AdaEslm,
                Hierarchical,
                EslmKd,
                Rho1,
                Random,
                Importance,
            ],
        ),
        (
            "alpha_ramp",
            &[Eslm, AdaEslm, Hierarchical, EslmKd, Rho1, Random],
        ),
        ("exit_layer", &[Hierarchical]),
        ("instance_alpha", &[Hierarchical]),
        ("keep", &[Rho1, Random, Importance]),
        ("reference", &[Rho1]),
        ("rho1_norm", &[Rho1]),
        ("teacher", &[EslmKd]),
        ("kd_weight", &[EslmKd]),
        ("temperature", &[EslmKd]),
        ("alpha_min", &[AdaEslm]),
        ("alpha_max", &[AdaEslm]),
        ("target_mass", &[AdaEslm]),
        ("ada_gain", &[AdaEslm]),
        ("ada_ema", &[AdaEslm]),
        (
            "quantile_scope",
            &[Eslm, AdaEslm, Hierarchical, EslmKd, Rho1, Random],
        ),
    ]
};

fn policy_name(p: PolicyKind) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Warnings for settings the chosen `--select` policy ignores: flags the user passed, and keys of the `--config`
/// file set to other than their default (a `config.toml` a run wrote lists every key at its value, so keys left
/// at the default say nothing about what the user meant).
pub fn inapplicable_flags(cfg: &RunConfig, args: &TrainArgs) -> Result<Vec<String>> {
    let given = args.overrides()?;
    let users = |ps: &[PolicyKind]| -> String {
        let names: Vec<String> = ps.iter().map(|p| policy_name(*p)).collect();
        names.join(", ")
    };
    let mut out: Vec<String> = POLICY_KEYS
        .iter()
        .filter(|(k, ps)| given.contains_key(*k) && !ps.contains(&cfg.select))
        .map(|(k, ps)| {
            format!(
                "warning: --{} does not apply to --select {} (it is used by {}); it is ignored",
                k.replace('_', "-"),
                policy_name(cfg.select),
                users(ps)
            )
        })
        .collect();
    if let Some(path) = &args.config {
        let file = config_file_keys(path)?;
        let defaults = serde_json::to_value(RunConfig::default())?;
        for (k, ps) in POLICY_KEYS.iter() {
            let set = file.get(*k).filter(|v| !same_value(defaults.get(*k), v));
            if set.is_some() && !given.contains_key(*k) && !ps.contains(&cfg.select) {
                out.push(format!(
                    "warning: `{k}` in {} does not apply to select = {} (it is used by {}); it is ignored",
                    path.display(),
                    policy_name(cfg.select),
                    users(ps)
                ));
            }
        }
    }
    Ok(out)
}

/// Whether a config file's `value` equals the default `default` (numbers by value: `1` equals `1.0`).
fn same_value(default: Option<&serde_json::Value>, value: &serde_json::Value) -> bool {
    match (default.and_then(|d| d.as_f64()), value.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => default == Some(value),
    }
}

/// The keys and values of a `--config` TOML file, as JSON values (comparable with a serialized [`RunConfig`]).
fn config_file_keys(path: &std::path::Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    match serde_json::to_value(table)? {
        serde_json::Value::Object(m) => Ok(m),
        _ => Ok(serde_json::Map::new()),
    }
}

/// Runs a training invocation. `stop` is the Ctrl-C / SIGTERM flag (checked after every step).
pub fn run_training(args: &TrainArgs, stop: Arc<AtomicBool>) -> Result<TrainSummary> {
    run_training_on(args, stop, Arc::new(eslm_collective::SingleProcess))
}

/// Runs a training invocation as one rank of the data-parallel job of `collective` (see [`crate::distributed`]):
/// this rank's data shard and policy seed. Rank 0 owns the run directory (lock, recovery, the fresh-run check,
/// `config.toml`, `metrics.jsonl`, checkpoints); the other ranks wait for it at a barrier.
pub fn run_training_on(
    args: &TrainArgs,
    stop: Arc<AtomicBool>,
    collective: Arc<dyn eslm_collective::Collective>,
) -> Result<TrainSummary> {
    let pre = RunConfig::resolve(args)?;
    // Before the run directory is touched: a CUDA device needs the `cuda` build, a driver and the GPU.
    check_device(pre.device)?;
    if args.overwrite && args.resume {
        return Err(TrainError::Config(
            "--overwrite and --resume contradict each other (replace the run, or continue it?)"
                .into(),
        ));
    }
    let (rank, world) = (collective.rank(), collective.world_size());
    // One trainer per run directory; held until this function returns (or the process dies).
    let _lock = if collective.is_root() {
        let lock = RunDirLock::acquire(&pre.out)?;
        for action in recover_checkpoints(&pre.out)? {
            eprintln!("{action}");
        }
        if args.resume {
            for action in adopt_legacy_checkpoints(&pre.out)? {
                eprintln!("{action}");
            }
        } else {
            for p in claim_fresh(&pre.out, args.overwrite)? {
                eprintln!("--overwrite: removed {}", p.display());
            }
        }
        Some(lock)
    } else {
        None
    };
    collective.barrier()?;
    let (cfg, resumed_from) = resolve_config_from(args)?;
    if cfg.device != pre.device {
        // A resumed run keeps its checkpoint's device unless --device is given.
        check_device(cfg.device)?;
    }
    if collective.is_root() {
        for w in inapplicable_flags(&cfg, args)? {
            eprintln!("{w}");
        }
    }
    let data = open_run_data_for_rank(&cfg, rank, world)?;
    let mut model = build_model(&cfg, data.vocab_size)?;
    if world > 1 {
        model.connect_ranks(collective.as_ref())?;
    }
    model.set_matmul(cfg.effective_matmul().precision())?;
    if cfg.shard_optimizer {
        model.shard_optimizer(collective.clone())?;
    }
    let policy_cfg = crate::distributed::policy_config(&cfg, rank);
    let policy = build_policy(&policy_cfg, model.vocab_size())?;
    let mut trainer =
        Trainer::new(cfg.clone(), model, policy, data, stop)?.with_collective(collective.clone());
    let resumed_at = if args.resume {
        let step = trainer.resume()?;
        if let Some(dir) = &resumed_from {
            eprintln!("resuming from {} (step {step})", dir.display());
        }
        Some(step)
    } else {
        None
    };
    if !collective.is_root() {
        return trainer.run(&mut MetricsWriter::discard());
    }
    let text = toml::to_string(&cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    crate::checkpoint::write_atomic(&cfg.out.join("config.toml"), text.as_bytes())?;
    let mut metrics = MetricsWriter::open(&cfg.out, resumed_at)?;
    let mut summary = trainer.run(&mut metrics)?;
    summary.resumed_from = resumed_from;
    Ok(summary)
}
