//! `metrics.jsonl`: one JSON object per line. Training steps write a [`StepRecord`] (`"kind": "step"`),
//! evaluations an [`EvalRecord`] (`"kind": "eval"`). Lines are flushed as written. On resume, lines after the
//! checkpoint's step are dropped so the file describes exactly one history.
//!
//! Non-finite numbers (a diverged run's `val_ppl`, a skipped step's `loss`) are written by serde_json as `null`
//! and read back as NaN. [`read_metrics`] is strict (the first bad line is an error naming the file and line);
//! [`read_metrics_lenient`] skips bad lines (e.g. a partial last line left by a crash) and reports them.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

fn nan_if_null_f32<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

fn nan_if_null_f64<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Always `"step"`.
    pub kind: String,
    /// Step number (1-based: the number of optimizer steps completed after this one).
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Mean cross-entropy over every valid token the full forward saw (hierarchical: the kept sequences).
    #[serde(deserialize_with = "nan_if_null_f32")]
    pub loss: f32,
    /// Mean training loss over the kept tokens (KD: the mixed CE + KL loss).
    #[serde(deserialize_with = "nan_if_null_f32")]
    pub loss_kept: f32,
    /// Kept tokens / valid tokens of the whole step (dropped sequences count as not kept).
    pub kept_fraction: f64,
    /// Kept tokens.
    pub kept_tokens: u64,
    /// Token VaR threshold (global scope: of the step; micro scope: of the last micro-batch); null for clm.
    pub threshold: Option<f32>,
    /// α of the step (null when every token is kept).
    pub alpha: Option<f64>,
    /// Sequences kept by the instance filter / sequences seen (hierarchical; 1 otherwise).
    pub sequence_fraction: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "nan_if_null_f32")]
    pub grad_norm: f32,
    /// Wall-clock seconds of the step.
    pub step_time_s: f64,
    /// Training tokens per second of the step (B·T·grad_accum / step time).
    pub tokens_per_s: f64,
    /// Cumulative training tokens.
    pub tokens: u64,
    /// FLOPs of the step, paper convention (2·P per forwarded token + 4·P per kept token).
    pub flops_paper: f64,
    /// FLOPs of the step the engine executed.
    pub flops_realized: f64,
    /// Cumulative paper-convention FLOPs.
    pub flops_paper_total: f64,
    /// Cumulative realized FLOPs.
    pub flops_realized_total: f64,
    /// Cumulative training wall-clock seconds.
    pub wall_s: f64,
    /// Synthetic corpus only: kept tokens per kind `[template, learnable, noise]`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind_kept: Option<[u64; 3]>,
    /// Synthetic corpus only: valid tokens per kind `[template, learnable, noise]`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind_total: Option<[u64; 3]>,
    /// True when the step was skipped (non-finite loss with --skip-nonfinite).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub skipped: bool,
}

/// One evaluation on the validation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Always `"eval"`.
    pub kind: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Cumulative training tokens.
    pub tokens: u64,
    /// Cumulative paper-convention FLOPs.
    pub flops_paper_total: f64,
    /// Cumulative realized FLOPs.
    pub flops_realized_total: f64,
    /// Cumulative training wall-clock seconds.
    pub wall_s: f64,
    /// Mean cross-entropy over every validation token evaluated.
    #[serde(deserialize_with = "nan_if_null_f64")]
    pub val_loss: f64,
    /// `exp(val_loss)`.
    #[serde(deserialize_with = "nan_if_null_f64")]
    pub val_ppl: f64,
    /// Validation tokens evaluated.
    pub val_tokens: u64,
    /// Synthetic corpus only: mean loss per kind `[template, learnable, noise]`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss_by_kind: Option<[f64; 3]>,
}

/// Appends records to `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    /// `None`: a writer that drops every record ([`MetricsWriter::discard`]).
    file: Option<File>,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl`. A fresh run truncates it; a resumed run (`keep_through = Some(step)`) keeps the
    /// lines whose `step` is ≤ `step` and drops the rest.
    pub fn open(dir: &Path, keep_through: Option<u64>) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let kept: Vec<String> = match keep_through {
            Some(step) if path.exists() => read_lines(&path)?
                .into_iter()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= step)
                })
                .collect(),
            _ => Vec::new(),
        };
        // Rewrite atomically (a crash here must not lose the history), then append.
        let mut text = String::new();
        for line in kept {
            text.push_str(&line);
            text.push('\n');
        }
        crate::checkpoint::write_atomic(&path, text.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(MetricsWriter {
            path,
            file: Some(file),
        })
    }

    /// A writer that drops every record: data-parallel ranks other than rank 0 (which writes `metrics.jsonl`)
    /// train with one.
    pub fn discard() -> Self {
        MetricsWriter {
            path: PathBuf::new(),
            file: None,
        }
    }

    /// Appends one record as a JSON line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let line = serde_json::to_string(record)?;
        writeln!(file, "{line}").map_err(|e| TrainError::io(&self.path, e))?;
        file.flush().map_err(|e| TrainError::io(&self.path, e))
    }

    /// The file's path (empty for [`MetricsWriter::discard`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let f = File::open(path).map_err(|e| TrainError::io(path, e))?;
    BufReader::new(f)
        .lines()
        .map(|l| l.map_err(|e| TrainError::io(path, e)))
        .filter(|l| l.as_ref().map_or(true, |s| !s.trim().is_empty()))
        .collect()
}

/// The records of a `metrics.jsonl` and the lines that could not be read.
#[derive(Debug, Clone, Default)]
pub struct MetricsRead {
    /// Step records.
    pub steps: Vec<StepRecord>,
    /// Evaluation records.
    pub evals: Vec<EvalRecord>,
    /// `(1-based line, reason)` of every line skipped.
    pub skipped: Vec<(usize, String)>,
}

fn parse_line(line: &str) -> std::result::Result<Option<Record>, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    match v.get("kind").and_then(|k| k.as_str()) {
        Some("step") => serde_json::from_value(v)
            .map(|r| Some(Record::Step(Box::new(r))))
            .map_err(|e| format!("step record: {e}")),
        Some("eval") => serde_json::from_value(v)
            .map(|r| Some(Record::Eval(Box::new(r))))
            .map_err(|e| format!("eval record: {e}")),
        _ => Ok(None),
    }
}

enum Record {
    Step(Box<StepRecord>),
    Eval(Box<EvalRecord>),
}

/// Reads a `metrics.jsonl`, skipping (and reporting) lines that do not parse; lines of unknown kinds are
/// ignored silently.
pub fn read_metrics_lenient(path: &Path) -> Result<MetricsRead> {
    let text = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let text = String::from_utf8_lossy(&text);
    let mut out = MetricsRead::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(Some(Record::Step(r))) => out.steps.push(*r),
            Ok(Some(Record::Eval(r))) => out.evals.push(*r),
            Ok(None) => {}
            Err(e) => out.skipped.push((i + 1, e)),
        }
    }
    Ok(out)
}

/// Reads the step and eval records of a `metrics.jsonl` (lines of unknown kinds are skipped); a line that does
/// not parse is an error naming the file and line.
pub fn read_metrics(path: &Path) -> Result<(Vec<StepRecord>, Vec<EvalRecord>)> {
    let r = read_metrics_lenient(path)?;
    if let Some((line, e)) = r.skipped.first() {
        return Err(TrainError::Config(format!(
            "{}: line {line}: {e}",
            path.display()
        )));
    }
    Ok((r.steps, r.evals))
}
