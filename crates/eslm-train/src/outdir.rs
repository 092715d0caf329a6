//! The run directory (`--out`): one trainer at a time, and never two runs mixed in one directory.
//!
//! - [`RunDirLock`] takes an exclusive OS file lock (`flock` on Unix, `LockFileEx` on Windows, through `fs4`) on
//!   `OUT/.lock` for the whole invocation. A second trainer on the same directory is refused at once. The lock is
//!   released when the process exits, however it exits, so a crash never leaves a stale lock behind (the file
//!   itself stays and is harmless).
//! - [`claim_fresh`] refuses a fresh run (no `--resume`) into a directory that already holds anything, unless
//!   `--overwrite` is given, in which case the previous run's files (`metrics.jsonl`, `config.toml`,
//!   `checkpoints/`) are deleted first.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use fs4::{FileExt, TryLockError};

use crate::error::{Result, TrainError};

/// Name of the lock file inside the run directory.
pub const LOCK_FILE: &str = ".lock";

/// The files and folders a run writes into its directory (what `--overwrite` deletes).
pub const RUN_FILES: [&str; 3] = ["metrics.jsonl", "config.toml", "checkpoints"];

/// An exclusive lock on a run directory, held until dropped (or the process exits).
#[derive(Debug)]
pub struct RunDirLock {
    file: File,
    path: PathBuf,
}

impl RunDirLock {
    /// Creates `dir` if needed and locks it, or fails at once when another process holds the lock.
    pub fn acquire(dir: &Path) -> Result<RunDirLock> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        match FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(TrainError::Config(format!(
                "--out {}: another eslm-train process is using this run directory (it holds {}); \
                     HINT: wait for it to finish, or choose another --out",
                dir.display(),
                path.display()
            )))
            }
            Err(TryLockError::Error(e)) => return Err(TrainError::io(&path, e)),
        }
        Ok(RunDirLock { file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDirLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

/// Entries of `dir` other than the lock file, sorted.
fn entries(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::io(dir, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE)
        .collect();
    names.sort();
    Ok(names)
}

/// Prepares `dir` for a fresh run: refuses it when it holds anything besides the lock file, unless `overwrite`,
/// which deletes the previous run's files ([`RUN_FILES`]) and keeps any other file. Returns what was deleted.
pub fn claim_fresh(dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    let names = entries(dir)?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    if !overwrite {
        let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
        return Err(TrainError::Config(format!(
            "--out {} is not empty (it holds {}{}); a fresh run would mix its files with another run's. \
             HINT: pass --resume to continue that run, --overwrite to replace it, or choose another --out",
            dir.display(),
            shown.join(", "),
            if names.len() > shown.len() { ", ..." } else { "" }
        )));
    }
    let mut removed = Vec::new();
    for name in RUN_FILES {
        let p = dir.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
            removed.push(p);
        } else if p.exists() {
            std::fs::remove_file(&p).map_err(|e| TrainError::io(&p, e))?;
            removed.push(p);
        }
    }
    Ok(removed)
}
