//! Checkpoints of a run: `OUT/checkpoints/step_NNNNNNNN/` holding the model (the engine's format; for GPT-2,
//! HF-named safetensors + config.json), the optimizer state, and `trainer.json` ([`TrainerState`]: step, data
//! loader position, policy state (RNG, adapted α), counters, the run config).
//!
//! Atomicity: a checkpoint is written into a hidden temporary directory `.step_NNNNNNNN.tmp`, every file is
//! fsynced, the directory is renamed to its final name and the parent directory is fsynced. A crash leaves either
//! the previous complete checkpoints or an ignored temporary directory, never a half-written checkpoint with a
//! final name. Only the newest `keep_last` checkpoints are kept.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

/// Version of the `trainer.json` layout.
pub const TRAINER_STATE_VERSION: u32 = 1;

/// Everything besides the model and optimizer that an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version ([`TRAINER_STATE_VERSION`]).
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens processed (B·T·grad_accum per step).
    pub tokens: u64,
    /// Cumulative FLOPs by the paper's convention.
    pub flops_paper: f64,
    /// Cumulative FLOPs the engine executed.
    pub flops_realized: f64,
    /// Cumulative training wall-clock seconds (evaluation excluded).
    pub wall_s: f64,
    /// Position of the training data loader.
    pub loader: eslm_data::LoaderState,
    /// Policy state ([`crate::policy::SelectionPolicy::state`]).
    pub policy: serde_json::Value,
    /// Vocabulary size of the model.
    pub vocab_size: usize,
    /// The run configuration.
    pub config: RunConfig,
    /// Data-parallel ranks of the run that wrote it (a resume needs the same number; 1 before this field).
    #[serde(default = "one")]
    pub world_size: usize,
    /// With several ranks: the policy state of every rank, by rank (the random policy's stream differs per
    /// rank); `policy` is rank 0's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_policies: Vec<serde_json::Value>,
}

fn one() -> usize {
    1
}

/// Writes `bytes` to `path` atomically: a temporary sibling file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| TrainError::io(&tmp, e))?;
        f.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))?;
    sync_dir(dir);
    Ok(())
}

/// fsyncs a directory (best effort: not every platform allows opening directories).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The checkpoints directory of a run.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The directory name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Complete checkpoints under `out/checkpoints`, oldest first, as `(step, dir)`.
pub fn list_checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(out);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| TrainError::io(&dir, e))? {
        let entry = entry.map_err(|e| TrainError::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step_")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().join("trainer.json").is_file() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(out)?.pop().map(|(_, p)| p))
}

/// Writes a checkpoint of `model` and `state` under `out/checkpoints/` atomically and deletes all but the newest
/// `keep_last`. Returns the checkpoint directory.
pub fn save_checkpoint(
    out: &Path,
    model: &dyn LanguageModel,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let name = checkpoint_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    model.save_model(&tmp)?;
    model.save_optimizer(&tmp)?;
    write_atomic(
        &tmp.join("trainer.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    // fsync every file the engine wrote, then the directory.
    for entry in fs::read_dir(&tmp)
        .map_err(|e| TrainError::io(&tmp, e))?
        .flatten()
    {
        if let Ok(f) = File::open(entry.path()) {
            f.sync_all().map_err(|e| TrainError::io(entry.path(), e))?;
        }
    }
    sync_dir(&tmp);
    let final_dir = root.join(&name);
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    }
    fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    sync_dir(&root);
    let all = list_checkpoints(out)?;
    if all.len() > keep_last {
        for (_, old) in &all[..all.len() - keep_last] {
            fs::remove_dir_all(old).map_err(|e| TrainError::io(old, e))?;
        }
    }
    Ok(final_dir)
}

/// Reads `trainer.json` of a checkpoint directory.
pub fn load_trainer_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer.json");
    let text = fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    if state.version != TRAINER_STATE_VERSION {
        return Err(TrainError::Checkpoint(format!(
            "{}: trainer state version {} (this build reads {TRAINER_STATE_VERSION})",
            path.display(),
            state.version
        )));
    }
    Ok(state)
}
