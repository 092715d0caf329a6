//! Checkpoints of a run: `OUT/checkpoints/step_NNNNNNNN/` holding the model (the engine's format; for GPT-2,
//! HF-named safetensors + config.json), the optimizer state, `trainer.json` ([`TrainerState`]: step, data
//! loader position, policy state (RNG, adapted α), counters, the run config) and `COMPLETE` ([`Manifest`]).
//!
//! Atomicity: a checkpoint is written into a hidden temporary directory `.step_NNNNNNNN.tmp`, every file is
//! fsynced, then `COMPLETE` is written last: it lists every file with its size and CRC-32 (the weights included;
//! zlib's CRC-32, so Python's `zlib.crc32` of a file's bytes, in 8 hex digits, recomputes one). The directory is
//! then renamed to its final name and the parent directory is fsynced. Only a directory holding `COMPLETE` counts
//! as a checkpoint, and its files are verified against the manifest before a resume (or any other load through
//! [`verify_checkpoint`]).
//!
//! Re-saving an existing step never deletes the complete copy first: the old directory is renamed aside to
//! `.step_NNNNNNNN.old`, the new one renamed into place, and only then the old one is deleted.
//! [`recover_checkpoints`] (run when a trainer takes the run directory) finishes any of these moves that a crash
//! interrupted: it puts a complete `.old` copy back when the final name is missing, promotes a complete `.tmp`
//! copy (also an eslm 0.1 one whose rename a crash interrupted), and deletes incomplete temporaries. A failed
//! write (e.g. a full disk) deletes its temporary directory.
//! Only the newest `keep_last` checkpoints are kept; [`save_checkpoint_protecting`] never prunes a protected one.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
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
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` streams into the temporary file (buffered). On failure the temporary file is
/// removed and `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = File::create(&tmp).and_then(|f| {
        let mut w = BufWriter::with_capacity(IO_CHUNK, f);
        write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(TrainError::io(&tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))?;
    sync_dir(dir);
    Ok(())
}

/// Bytes per read or write of the streamed checkpoint I/O.
pub(crate) const IO_CHUNK: usize = 1 << 22;

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

/// The name of the marker written last into a checkpoint directory.
pub const COMPLETE: &str = "COMPLETE";

/// One file of a checkpoint as recorded in its [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// File size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE, as zlib's `crc32` and the `crc32` tool compute it) of the file's bytes, as 8 hex digits.
    pub crc32: String,
}

/// The content of `COMPLETE`: the step and every file of the checkpoint with its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Optimizer steps completed at this checkpoint.
    pub step: u64,
    /// File name → size and checksum.
    pub files: std::collections::BTreeMap<String, ManifestEntry>,
}

/// Size and CRC-32 of the file at `path`, read in chunks (never the whole file in memory).
fn file_entry(path: &Path) -> Result<ManifestEntry> {
    let io = |e| TrainError::io(path, e);
    let mut f = File::open(path).map_err(io)?;
    let mut buf = vec![0u8; IO_CHUNK];
    let (mut crc, mut bytes) = (crc32fast::Hasher::new(), 0u64);
    loop {
        let k = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        crc.update(&buf[..k]);
        bytes += k as u64;
    }
    Ok(ManifestEntry {
        bytes,
        crc32: format!("{:08x}", crc.finalize()),
    })
}

/// Whether `dir` holds a `COMPLETE` marker (the last file a checkpoint write creates).
pub fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE).is_file()
}

/// Reads the manifest of a checkpoint directory.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(COMPLETE);
    let text = fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        TrainError::Checkpoint(format!(
            "{}: corrupt checkpoint manifest ({e}); HINT: resume from an older checkpoint",
            path.display()
        ))
    })
}

/// Verifies every file of checkpoint `dir` against its `COMPLETE` manifest (size and CRC-32). An
/// error names the file that differs. Directories without a manifest (HF model directories, checkpoints of
/// older eslm versions) pass unchecked.
pub fn verify_checkpoint(dir: &Path) -> Result<()> {
    if !is_complete(dir) {
        return Ok(());
    }
    let manifest = read_manifest(dir)?;
    for (name, want) in &manifest.files {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(TrainError::Checkpoint(format!(
                "{}: missing (listed in {}); the checkpoint is damaged. HINT: resume from an older checkpoint",
                path.display(),
                COMPLETE
            )));
        }
        let got = file_entry(&path)?;
        if &got != want {
            return Err(TrainError::Checkpoint(format!(
                "{}: checksum mismatch ({} bytes, crc32 {} but the manifest says {} bytes, crc32 {}); the file was \
                 altered or damaged after it was written. HINT: restore it, or resume from an older checkpoint",
                path.display(),
                got.bytes,
                got.crc32,
                want.bytes,
                want.crc32
            )));
        }
    }
    Ok(())
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step_")
        .and_then(|s| s.parse::<u64>().ok())
}

/// Complete checkpoints (directories `step_N` holding `COMPLETE`) under `out/checkpoints`, oldest first, as
/// `(step, dir)`.
pub fn list_checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = step_dirs(&checkpoints_dir(out))?
        .into_iter()
        .filter(|(_, p)| is_complete(p))
        .collect();
    found.sort();
    Ok(found)
}

/// The entries of `dir` as `(file name, path)`; none when `dir` does not exist.
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))? {
        let entry = entry.map_err(|e| TrainError::io(dir, e))?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    Ok(out)
}

/// The `step_N` entries of `dir` as `(N, path)`, complete or not.
fn step_dirs(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    Ok(entries(dir)?
        .into_iter()
        .filter_map(|(name, path)| Some((parse_step(&name)?, path)))
        .collect())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(out)?.pop().map(|(_, p)| p))
}

/// Finishes checkpoint moves a crash interrupted under `out/checkpoints` (call with the run directory locked):
/// a complete `.step_N.old` is put back when `step_N` is missing or incomplete (else deleted); a complete
/// `.step_N.tmp` is promoted when `step_N` is missing or incomplete (else deleted); incomplete temporaries are
/// deleted. Returns one line per action taken.
pub fn recover_checkpoints(out: &Path) -> Result<Vec<String>> {
    let root = checkpoints_dir(out);
    let mut actions = Vec::new();
    if !root.is_dir() {
        return Ok(actions);
    }
    let mut hidden: Vec<(String, PathBuf)> = entries(&root)?
        .into_iter()
        .filter(|(n, _)| n.starts_with(".step_"))
        .collect();
    // `.old` first: a complete previous copy is preferred to a temporary one.
    hidden.sort_by_key(|(n, _)| !n.ends_with(".old"));
    for (name, path) in hidden {
        let Some(base) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".old").or_else(|| n.strip_suffix(".tmp")))
        else {
            continue;
        };
        let Some(step) = parse_step(base) else {
            continue;
        };
        let final_dir = root.join(base);
        if !final_dir.exists() && name.ends_with(".tmp") && is_eslm_0_1_checkpoint(&path, step) {
            // eslm 0.1 finished this checkpoint but did not rename it (or, re-saving, deleted the old copy first):
            // the only copy of the step; `--resume` adopts it.
            fs::rename(&path, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
            actions.push(format!(
                "recovered {} from {} (an eslm 0.1 checkpoint whose rename was interrupted)",
                final_dir.display(),
                name
            ));
        } else if is_complete(&path) && !is_complete(&final_dir) {
            if final_dir.exists() {
                fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
            }
            fs::rename(&path, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
            actions.push(format!(
                "recovered {} from {} (a checkpoint write was interrupted)",
                final_dir.display(),
                name
            ));
        } else {
            fs::remove_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
            actions.push(format!("removed leftover {}", path.display()));
        }
    }
    sync_dir(&root);
    Ok(actions)
}

/// Writes the files of a checkpoint into `tmp` and `COMPLETE` last.
fn write_checkpoint_files(
    tmp: &Path,
    model: &dyn LanguageModel,
    state: &TrainerState,
) -> Result<()> {
    fs::create_dir_all(tmp).map_err(|e| TrainError::io(tmp, e))?;
    model.save_model(tmp)?;
    model.save_optimizer(tmp)?;
    write_atomic(
        &tmp.join("trainer.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    write_manifest(tmp, state.step)
}

/// fsyncs every file of checkpoint `dir` and records its size and checksum in `COMPLETE`, written last.
fn write_manifest(dir: &Path, step: u64) -> Result<()> {
    let mut files = std::collections::BTreeMap::new();
    for entry in fs::read_dir(dir)
        .map_err(|e| TrainError::io(dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || name == COMPLETE || !path.is_file() {
            continue;
        }
        let f = File::open(&path).map_err(|e| TrainError::io(&path, e))?;
        f.sync_all().map_err(|e| TrainError::io(&path, e))?;
        files.insert(name, file_entry(&path)?);
    }
    sync_dir(dir);
    let manifest = Manifest { step, files };
    write_atomic(
        &dir.join(COMPLETE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )
}

/// Whether `dir` holds a checkpoint of step `step` as eslm 0.1 wrote it: its optimizer file in 0.1's format
/// ([`crate::tensor_file::is_eslm_0_1_file`]; this build never writes one) and a `trainer.json` of that step (0.1
/// wrote it last, atomically, so the other files were finished).
fn is_eslm_0_1_checkpoint(dir: &Path, step: u64) -> bool {
    let format = ["optimizer_m.bin", "optimizer.bin"]
        .iter()
        .any(|f| crate::tensor_file::is_eslm_0_1_file(&dir.join(f)));
    format && load_trainer_state(dir).is_ok_and(|s| s.step == step)
}

/// Adopts the checkpoints of eslm 0.1 (before `COMPLETE` manifests): a `step_N` directory without `COMPLETE` whose
/// `trainer.json` reads as this build's trainer state of step `N` and whose optimizer file is in 0.1's format
/// ([`crate::tensor_file::is_eslm_0_1_file`]: this build never writes one, so a directory of its own that lost its
/// manifest is not mistaken for one) gets a manifest of its files as they are, so that `--resume`, pruning and
/// verification see it like a new one. 0.1 renamed finished directories into place, so such a directory was
/// complete when written; its `.bin` and JSON files carry their own checks, the safetensors data does not.
/// Directories that do not qualify, or that cannot be read, are left alone with a warning (a newer checkpoint
/// still resumes). Call with the run directory locked; returns one line per directory seen.
pub fn adopt_legacy_checkpoints(out: &Path) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    let mut legacy: Vec<(u64, PathBuf)> = step_dirs(&checkpoints_dir(out))?
        .into_iter()
        .filter(|(_, p)| p.is_dir() && !is_complete(p))
        .collect();
    legacy.sort();
    for (step, dir) in legacy {
        let adopted = if is_eslm_0_1_checkpoint(&dir, step) {
            write_manifest(&dir, step)
        } else {
            Err(TrainError::Checkpoint(
                "no COMPLETE manifest, and not an eslm 0.1 checkpoint of this step".into(),
            ))
        };
        actions.push(match adopted {
            Ok(()) => format!(
                "adopted {} (an eslm 0.1 checkpoint; its files are checksummed as they are now)",
                dir.display()
            ),
            Err(e) => format!(
                "warning: {}: {e}; not a checkpoint to resume from (left as it is)",
                dir.display()
            ),
        });
    }
    Ok(actions)
}

/// Writes a checkpoint of `model` and `state` under `out/checkpoints/` atomically and deletes all but the newest
/// `keep_last`. Returns the checkpoint directory.
pub fn save_checkpoint(
    out: &Path,
    model: &dyn LanguageModel,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    save_checkpoint_protecting(out, model, state, keep_last, None)
}

/// [`save_checkpoint`] that never prunes the checkpoint at step `protect` (the last one before a suspected
/// divergence). On failure (e.g. a full disk) the temporary directory is deleted and every complete checkpoint
/// is left as it was.
pub fn save_checkpoint_protecting(
    out: &Path,
    model: &dyn LanguageModel,
    state: &TrainerState,
    keep_last: usize,
    protect: Option<u64>,
) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let name = checkpoint_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    if let Err(e) = write_checkpoint_files(&tmp, model, state) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let final_dir = root.join(&name);
    if final_dir.exists() {
        // Never delete the complete copy before its replacement is in place.
        let old = root.join(format!(".{name}.old"));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        fs::rename(&final_dir, &old).map_err(|e| TrainError::io(&final_dir, e))?;
        fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        sync_dir(&root);
        fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    } else {
        fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    }
    sync_dir(&root);
    let all = list_checkpoints(out)?;
    if all.len() > keep_last {
        for (step, old) in &all[..all.len() - keep_last] {
            if Some(*step) == protect {
                continue;
            }
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
