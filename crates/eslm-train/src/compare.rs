//! `eslm-train compare SPEC.toml`: several policies on the same data, seeds and budget, evaluated the same way,
//! summarised in one markdown table and one SVG.
//!
//! A spec names a `[base]` trainer config (the keys of `--config` files), the `seeds`, the `[[run]]`s (a name
//! plus the keys that differ from the base), the `baseline` run (default `clm`) and an optional `[eval]`
//! section (out-of-domain shards, HellaSwag / LAMBADA / ARC files, an item limit). The budget is whatever the base
//! sets: equal steps (`steps`), equal tokens (`token_budget`) or equal wall-clock (`time_budget`, where the build
//! has it); every run records tokens, both FLOP counts and seconds, so the report compares them on all axes.
//!
//! For every seed and run the runner trains into `OUT/RUN/seedS` (skipped when `done.json` says it finished;
//! resumed from its checkpoint when it was interrupted), evaluates the final checkpoint, and writes `done.json`.
//! Then `OUT/report.md` gets, per run, the mean and the spread (half the range) over seeds of: the final
//! validation loss, the mean step time relative to the baseline's, the validation loss at the baseline's final
//! wall-clock, the time-to-quality (the seconds a run needs to reach the baseline's final validation loss,
//! linearly interpolated between evaluations, "never" when it does not), out-of-domain perplexity and downstream
//! accuracies; `OUT/compare.svg` plots validation loss against tokens, FLOPs and seconds (first seed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Deserialize;

use crate::checkpoint::latest_checkpoint;
use crate::config::TrainArgs;
use crate::error::{Result, TrainError};
use crate::eval_cmd::{run_eval, EvalArgs};
use crate::metrics::{read_metrics, EvalRecord, StepRecord};

/// `eslm-train compare` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// The experiment spec (TOML; see docs/results.md and experiments/).
    pub spec: PathBuf,
    /// Output directory (default: runs/compare/NAME with NAME from the spec).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only these runs (by name; repeatable). The report still covers every finished run.
    #[arg(long)]
    pub only: Vec<String>,
    /// Write the report from finished runs without training anything.
    #[arg(long)]
    pub report_only: bool,
}

/// An experiment spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Experiment name.
    pub name: String,
    /// Seeds; every run trains once per seed.
    pub seeds: Vec<u64>,
    /// The run every other run is compared with.
    #[serde(default = "default_baseline")]
    pub baseline: String,
    /// Trainer config keys shared by every run.
    #[serde(default)]
    pub base: toml::Table,
    /// Evaluation of the final checkpoints.
    #[serde(default)]
    pub eval: EvalSpec,
    /// The baseline's steps in an equal wall-clock budget (runs with a `time_ratio` get `clm_steps / ratio`).
    pub clm_steps: Option<u64>,
    /// The runs.
    #[serde(rename = "run")]
    pub runs: Vec<RunSpec>,
}

fn default_baseline() -> String {
    "clm".into()
}

/// One run: a name and the trainer keys that differ from the base.
#[derive(Debug, Clone, Deserialize)]
pub struct RunSpec {
    /// Run name (a directory name).
    pub name: String,
    /// This run's step time relative to the baseline's, measured beforehand in one interleaved benchmark
    /// (`scripts/step-ratios.sh`). With `clm_steps` in the spec, the run gets `clm_steps / time_ratio` steps
    /// (an equal wall-clock budget that does not depend on the machine's load during the runs), and when every
    /// run has a ratio the report's time axis is `step × time_ratio × baseline step time`.
    #[serde(default)]
    pub time_ratio: Option<f64>,
    /// Trainer config keys.
    #[serde(flatten)]
    pub keys: toml::Table,
}

/// What the final checkpoints are evaluated on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Out-of-domain validation shards (glob), reported as perplexity.
    pub ood: Option<String>,
    /// Tokenizer for the text tasks.
    pub tokenizer: Option<PathBuf>,
    /// HellaSwag file.
    pub hellaswag: Option<PathBuf>,
    /// LAMBADA file.
    pub lambada: Option<PathBuf>,
    /// ARC file.
    pub arc: Option<PathBuf>,
    /// First N items of each task (0 = all).
    #[serde(default)]
    pub limit: usize,
}

/// Reads and checks a spec.
pub fn read_spec(path: &Path) -> Result<Spec> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let spec: Spec = toml::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    let names: Vec<&str> = spec.runs.iter().map(|r| r.name.as_str()).collect();
    let bad = |m: String| TrainError::Config(format!("{}: {m}", path.display()));
    if spec.seeds.is_empty() || spec.runs.is_empty() {
        return Err(bad("needs at least one seed and one [[run]]".into()));
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) || n.is_empty() || n.contains(['/', '\\']) {
            return Err(bad(format!(
                "run name `{n}` is empty, repeated or not a directory name"
            )));
        }
    }
    if !names.contains(&spec.baseline.as_str()) {
        return Err(bad(format!("baseline `{}` is not a run", spec.baseline)));
    }
    let bad_ratio = |r: &&RunSpec| r.time_ratio.is_some_and(|x| !(x > 0.0 && x.is_finite()));
    if let Some(r) = spec.runs.iter().find(bad_ratio) {
        return Err(bad(format!("run `{}`: time_ratio must be > 0", r.name)));
    }
    for key in ["out", "seed"] {
        let in_run = spec.runs.iter().any(|r| r.keys.contains_key(key));
        if spec.base.contains_key(key) || in_run {
            return Err(bad(format!(
                "`{key}` is set by the runner; remove it from the spec"
            )));
        }
    }
    Ok(spec)
}

/// Runs `eslm-train compare`: trains and evaluates what is missing, then writes the report.
pub fn run_compare(args: &CompareArgs, stop: Arc<AtomicBool>) -> Result<PathBuf> {
    let spec = read_spec(&args.spec)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/compare").join(&spec.name));
    std::fs::create_dir_all(&out).map_err(|e| TrainError::io(&out, e))?;
    if !args.report_only {
        for &seed in &spec.seeds {
            for run in &spec.runs {
                if !args.only.is_empty() && !args.only.contains(&run.name) {
                    continue;
                }
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(TrainError::Config("compare: interrupted".into()));
                }
                // One failed run (a diverged policy, say) does not end the experiment: it is recorded in
                // RUN/seedS/failed.txt, reported, and tried again by the next `compare`.
                if let Err(e) = train_and_eval(&spec, run, seed, &out, stop.clone()) {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return Err(e);
                    }
                    eprintln!("compare: {} seed {seed} failed: {e}", run.name);
                    let failed = run_dir(&out, &run.name, seed).join("failed.txt");
                    std::fs::write(&failed, format!("{e}\n"))
                        .map_err(|io| TrainError::io(&failed, io))?;
                }
            }
        }
    }
    let report = write_report(&spec, &out)?;
    println!("wrote {}", report.display());
    Ok(report)
}

fn run_dir(out: &Path, run: &str, seed: u64) -> PathBuf {
    out.join(run).join(format!("seed{seed}"))
}

/// ` (seed S failed: reason)` for each seed of `run` whose last attempt failed (`failed.txt`, no `done.json`).
fn failures(out: &Path, run: &str, seeds: &[u64]) -> String {
    seeds
        .iter()
        .filter_map(|&s| {
            let dir = run_dir(out, run, s);
            let text = std::fs::read_to_string(dir.join("failed.txt")).ok()?;
            let first: String = text
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            (!dir.join("done.json").is_file()).then(|| format!(" (seed {s} failed: {first})"))
        })
        .collect()
}

/// Trains one run for one seed (resuming an interrupted one) and evaluates its final checkpoint.
fn train_and_eval(
    spec: &Spec,
    run: &RunSpec,
    seed: u64,
    out: &Path,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let dir = run_dir(out, &run.name, seed);
    let done = dir.join("done.json");
    if done.is_file() {
        println!("compare: {} seed {seed} already done", run.name);
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let mut table = spec.base.clone();
    table.extend(run.keys.clone());
    table.insert("seed".into(), toml::Value::Integer(seed as i64));
    if let (Some(clm_steps), Some(ratio)) = (spec.clm_steps, run.time_ratio) {
        if !run.keys.contains_key("steps") {
            let steps = (clm_steps as f64 / ratio).round().max(1.0) as i64;
            table.insert("steps".into(), toml::Value::Integer(steps));
        }
    }
    table.insert("out".into(), toml::Value::String(dir.display().to_string()));
    table
        .entry("progress")
        .or_insert(toml::Value::Boolean(false));
    let cfg_path = out.join(run.name.clone() + &format!(".seed{seed}.toml"));
    let text = toml::to_string(&table).map_err(|e| TrainError::Config(e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(|e| TrainError::io(&cfg_path, e))?;
    println!(
        "compare: training {} seed {seed} into {}",
        run.name,
        dir.display()
    );
    // Resume an interrupted run from its checkpoint; replace a failed one that left no checkpoint.
    let resume = latest_checkpoint(&dir)?.is_some();
    let args = TrainArgs {
        config: Some(cfg_path),
        resume,
        overwrite: !resume,
        ..Default::default()
    };
    let summary = crate::run::run_training(&args, stop)?;
    if summary.interrupted {
        return Err(TrainError::Config(format!(
            "compare: {} seed {seed} was interrupted; run compare again to resume it",
            run.name
        )));
    }
    let checkpoint = summary
        .checkpoint
        .ok_or_else(|| TrainError::Checkpoint("compare: the run wrote no checkpoint".into()))?;
    let eval = evaluate_checkpoint(&spec.eval, &checkpoint)?;
    let record =
        serde_json::json!({ "checkpoint": checkpoint, "steps": summary.steps, "eval": eval });
    crate::checkpoint::write_atomic(&done, record.to_string().as_bytes())
}

fn evaluate_checkpoint(e: &EvalSpec, checkpoint: &Path) -> Result<serde_json::Value> {
    let any_task = e.hellaswag.is_some() || e.lambada.is_some() || e.arc.is_some();
    if e.ood.is_none() && !any_task {
        return Ok(serde_json::Value::Null);
    }
    run_eval(&EvalArgs {
        checkpoint: checkpoint.to_path_buf(),
        val: e.ood.clone(),
        seq_len: None,
        batch_size: 4,
        tokenizer: e.tokenizer.clone(),
        hellaswag: e.hellaswag.iter().cloned().collect(),
        lambada: e.lambada.iter().cloned().collect(),
        arc: e.arc.iter().cloned().collect(),
        winogrande: Vec::new(),
        per_item: None,
        limit: e.limit,
        json: true,
        device: Default::default(),
    })
}

/// What the report needs of one finished run (one seed).
#[derive(Debug, Clone, Default)]
struct Finished {
    evals: Vec<EvalRecord>,
    step_time_s: f64,
    kept_fraction: f64,
    eval: serde_json::Value,
}

fn load_finished(dir: &Path) -> Result<Option<Finished>> {
    let done = dir.join("done.json");
    if !done.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&done).map_err(|e| TrainError::io(&done, e))?;
    let record: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: {e}", done.display())))?;
    let (steps, evals) = read_metrics(&dir.join("metrics.jsonl"))?;
    Ok(Some(Finished {
        evals,
        step_time_s: mean_step_time(&steps),
        kept_fraction: mean(steps.iter().filter(|s| !s.skipped).map(|s| s.kept_fraction)),
        eval: record["eval"].clone(),
    }))
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Mean step time, leaving out the first 10 % of steps (warm-up of caches and allocators).
fn mean_step_time(steps: &[StepRecord]) -> f64 {
    let skip = steps.len() / 10;
    mean(steps.iter().skip(skip).map(|s| s.step_time_s))
}

/// The first wall-clock second at which the validation loss reaches `target`, linearly interpolated between
/// consecutive evaluations (`None`: never).
pub fn time_to_loss(evals: &[(f64, f64)], target: f64) -> Option<f64> {
    let first = evals.first()?;
    if first.1 <= target {
        return Some(first.0);
    }
    evals.windows(2).find_map(|w| {
        let ((t0, l0), (t1, l1)) = (w[0], w[1]);
        (l1 <= target).then(|| t0 + (t1 - t0) * (l0 - target) / (l0 - l1).max(f64::MIN_POSITIVE))
    })
}

/// The validation loss at wall-clock second `t`, linearly interpolated; a run that ended less than 2 % before
/// `t` (rounding of an equal budget into steps) gives its last value; `None` when it ended sooner.
pub fn loss_at_time(evals: &[(f64, f64)], t: f64) -> Option<f64> {
    let last = *evals.last()?;
    if last.0 < t {
        return (last.0 >= 0.98 * t).then_some(last.1);
    }
    if evals[0].0 >= t {
        return Some(evals[0].1);
    }
    evals.windows(2).find_map(|w| {
        let ((t0, l0), (t1, l1)) = (w[0], w[1]);
        (t1 >= t).then(|| l0 + (l1 - l0) * (t - t0) / (t1 - t0).max(f64::MIN_POSITIVE))
    })
}

/// `mean ± spread` (spread = half the range) of the values that exist; `–` when none does; the count of
/// missing values is appended (`never ×2` style) when some are missing.
fn summarise(values: &[Option<f64>], digits: usize, missing: &str) -> String {
    let got: Vec<f64> = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let lost = values.len() - got.len();
    if got.is_empty() {
        return if values.is_empty() {
            "–".into()
        } else {
            missing.into()
        };
    }
    let m = got.iter().sum::<f64>() / got.len() as f64;
    let (lo, hi) = got
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let mut s = if got.len() > 1 {
        format!("{m:.digits$} ± {:.digits$}", (hi - lo) / 2.0)
    } else {
        format!("{m:.digits$}")
    };
    if lost > 0 {
        s += &format!(" ({lost}× {missing})");
    }
    s
}

/// Validation loss against time: measured training seconds, or `step × ratio × seconds_per_step` on the
/// calibrated axis (`Some((ratio, baseline seconds per step))`).
fn curve(evals: &[EvalRecord], calibrated: Option<(f64, f64)>) -> Vec<(f64, f64)> {
    evals
        .iter()
        .map(|e| {
            let t = calibrated.map_or(e.wall_s, |(r, s)| e.step as f64 * r * s);
            (t, e.val_loss)
        })
        .collect()
}

/// A number of an eval result: `key` of the entry named `task` (`val`) or whose `task` field is `task` (the
/// text tasks are reported under their file names).
fn eval_number(eval: &serde_json::Value, task: &str, key: &str) -> Option<f64> {
    let entries = eval.as_object()?;
    let entry = entries.get(task).or_else(|| {
        entries
            .values()
            .find(|v| v.get("task").and_then(|t| t.as_str()) == Some(task))
    })?;
    entry.get(key)?.as_f64()
}

/// Writes `report.md` and `compare.svg` from the finished runs.
pub fn write_report(spec: &Spec, out: &Path) -> Result<PathBuf> {
    let mut finished: BTreeMap<&str, Vec<(u64, Finished)>> = BTreeMap::new();
    for run in &spec.runs {
        for &seed in &spec.seeds {
            if let Some(f) = load_finished(&run_dir(out, &run.name, seed))? {
                finished
                    .entry(run.name.as_str())
                    .or_default()
                    .push((seed, f));
            }
        }
    }
    let base = finished
        .get(spec.baseline.as_str())
        .cloned()
        .unwrap_or_default();
    let base_of = |seed: u64| base.iter().find(|(s, _)| *s == seed).map(|(_, f)| f);
    let calibrated = spec.runs.iter().all(|r| r.time_ratio.is_some());
    let ratio_of = |name: &str| {
        spec.runs
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.time_ratio)
    };
    let axis = |name: &str, seed: u64| {
        let per_step = base_of(seed)?.step_time_s;
        calibrated.then(|| (ratio_of(name).unwrap_or(1.0), per_step))
    };
    let time_note = if calibrated {
        "times are `step × time_ratio × the baseline's measured seconds per step` (ratios measured beforehand \
         in one interleaved benchmark), so they do not depend on the load while the runs trained"
    } else {
        "times are measured training wall-clock"
    };
    let mut md = format!(
        "# {}\n\nSeeds: {:?}. Baseline: `{}`. Values are the mean ± half the range over the seeds that finished; \
         {time_note}.\n\n\
         | run | seeds | kept | final val loss | step time vs {b} | val loss at {b}'s end | time to {b}'s final loss (s) | time to {b}'s half-time loss ÷ {b}'s | ood ppl | HellaSwag acc_norm | LAMBADA acc | ARC-Easy acc |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        spec.name,
        spec.seeds,
        spec.baseline,
        b = spec.baseline
    );
    for run in &spec.runs {
        let Some(rows) = finished.get(run.name.as_str()) else {
            let failed = failures(out, &run.name, &spec.seeds);
            md += &format!(
                "| {} | 0{failed} | – | – | – | – | – | – | – | – | – | – |\n",
                run.name
            );
            continue;
        };
        let col = |f: &dyn Fn(u64, &Finished) -> Option<f64>| {
            rows.iter().map(|(s, r)| f(*s, r)).collect::<Vec<_>>()
        };
        let final_loss = col(&|_, r| r.evals.last().map(|e| e.val_loss));
        // The ratio the budget used (measured beforehand) on the calibrated axis, else this run's measurement.
        let ratio = col(&|s, r| match (calibrated, ratio_of(&run.name)) {
            (true, Some(x)) => Some(x),
            _ => base_of(s).map(|b| r.step_time_s / b.step_time_s),
        });
        let base_curve = |s: u64| Some(curve(&base_of(s)?.evals, axis(&spec.baseline, s)));
        let at_end = col(&|s, r| {
            let end = base_curve(s)?.last()?.0;
            loss_at_time(&curve(&r.evals, axis(&run.name, s)), end)
        });
        let ttq = col(&|s, r| {
            let target = base_of(s)?.evals.last()?.val_loss;
            time_to_loss(&curve(&r.evals, axis(&run.name, s)), target)
        });
        // The loss the baseline had at half its time, and how long this run takes to reach it, relative.
        let half = col(&|s, r| {
            let bc = base_curve(s)?;
            let t_half = bc.last()?.0 / 2.0;
            let target = loss_at_time(&bc, t_half)?;
            Some(time_to_loss(&curve(&r.evals, axis(&run.name, s)), target)? / t_half)
        });
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            run.name,
            rows.len(),
            summarise(&col(&|_, r| Some(r.kept_fraction)), 2, "–"),
            summarise(&final_loss, 3, "–"),
            summarise(&ratio, 2, "–"),
            summarise(&at_end, 3, "ended sooner"),
            summarise(&ttq, 0, "never"),
            summarise(&half, 2, "never"),
            summarise(&col(&|_, r| eval_number(&r.eval, "val", "ppl")), 1, "–"),
            summarise(
                &col(&|_, r| eval_number(&r.eval, "hellaswag", "acc_norm")),
                3,
                "–"
            ),
            summarise(&col(&|_, r| eval_number(&r.eval, "lambada", "acc")), 3, "–"),
            summarise(&col(&|_, r| eval_number(&r.eval, "arc", "acc")), 3, "–"),
        );
    }
    let first_seed: Vec<PathBuf> = spec
        .runs
        .iter()
        .map(|r| run_dir(out, &r.name, spec.seeds[0]))
        .filter(|d| d.join("metrics.jsonl").is_file())
        .collect();
    if !first_seed.is_empty() {
        let svg = out.join("compare.svg");
        crate::plot::plot_runs(&first_seed, &svg)?;
        md += &format!(
            "\n![validation loss vs tokens, FLOPs and seconds](compare.svg) (seed {})\n",
            spec.seeds[0]
        );
    }
    let path = out.join("report.md");
    std::fs::write(&path, md).map_err(|e| TrainError::io(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_loss_interpolates_and_says_never() {
        let c = [(0.0, 10.0), (10.0, 6.0), (20.0, 4.0)];
        assert_eq!(time_to_loss(&c, 6.0), Some(10.0));
        assert_eq!(time_to_loss(&c, 5.0), Some(15.0));
        assert_eq!(time_to_loss(&c, 11.0), Some(0.0));
        assert_eq!(time_to_loss(&c, 3.9), None);
        assert_eq!(loss_at_time(&c, 5.0), Some(8.0));
        assert_eq!(loss_at_time(&c, 25.0), None);
        assert_eq!(loss_at_time(&c, 20.3), Some(4.0), "within 2 % of the end");
    }

    #[test]
    fn summaries_report_spread_and_missing_values() {
        assert_eq!(summarise(&[Some(1.0), Some(3.0)], 1, "never"), "2.0 ± 1.0");
        assert_eq!(summarise(&[Some(2.0), None], 1, "never"), "2.0 (1× never)");
        assert_eq!(summarise(&[None, None], 1, "never"), "never");
    }
}
