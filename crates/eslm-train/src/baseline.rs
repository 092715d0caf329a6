//! The bare `eslm-train` command (README's main command): the default policy and a CLM baseline on the same
//! data, steps and seed, one after the other, then one table that says how the policy compares — so the first
//! thing a user sees is the honest answer, not a loss in isolation.
//!
//! Both runs go under a fresh `runs/default[-N]/` (`POLICY/` and `clm/`), so running the command again never
//! touches an earlier run.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::{PolicyKind, TrainArgs};
use crate::error::Result;
use crate::run::run_training;
use crate::trainer::TrainSummary;

/// The policy run and its CLM baseline.
#[derive(Debug, Clone)]
pub struct BaselineComparison {
    /// The directory holding both runs.
    pub root: PathBuf,
    /// The policy's run.
    pub policy: TrainSummary,
    /// The CLM run (`None` when the policy run was interrupted).
    pub clm: Option<TrainSummary>,
}

/// The first of `base`, `base-2`, `base-3`, ... that does not exist yet.
pub fn fresh_dir(base: &Path) -> PathBuf {
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (1..)
        .map(|i| {
            if i == 1 {
                base.to_path_buf()
            } else {
                base.with_file_name(format!("{name}-{i}"))
            }
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| base.to_path_buf())
}

/// Trains `args` (its `--out` replaced by `root/POLICY`), then, unless interrupted or already CLM, the same
/// run with `--select clm` in `root/clm`.
pub fn run_with_baseline(
    args: &TrainArgs,
    root: &Path,
    stop: Arc<AtomicBool>,
) -> Result<BaselineComparison> {
    let cfg = crate::config::RunConfig::resolve(args)?;
    let policy_name = serde_json::to_value(cfg.select)?
        .as_str()
        .unwrap_or("policy")
        .to_string();
    let main_args = TrainArgs {
        out: Some(root.join(&policy_name)),
        ..args.clone()
    };
    let policy = run_training(&main_args, stop.clone())?;
    let clm = if policy.interrupted || cfg.select == PolicyKind::Clm {
        None
    } else {
        let clm_args = TrainArgs {
            out: Some(root.join("clm")),
            select: Some(PolicyKind::Clm),
            ..args.clone()
        };
        Some(run_training(&clm_args, stop)?)
    };
    Ok(BaselineComparison {
        root: root.to_path_buf(),
        policy,
        clm,
    })
}

/// The comparison table and a one-line verdict.
pub fn format_comparison(c: &BaselineComparison) -> String {
    let Some(clm) = &c.clm else {
        return String::new();
    };
    let loss = |s: &TrainSummary| s.val_after.as_ref().map_or(f64::NAN, |e| e.loss);
    let time_ratio = clm.tokens_per_s / c.policy.tokens_per_s.max(1e-12);
    let mut out = format!(
        "── {p} vs clm: same data, steps and seed ({dir}) ──\n{:<14}{:>10}{:>8}{:>18}{:>11}\n",
        "policy",
        "val loss",
        "kept",
        "step time vs clm",
        "tokens/s",
        p = c.policy.policy,
        dir = c.root.display()
    );
    for (s, ratio) in [(&c.policy, time_ratio), (clm, 1.0)] {
        out += &format!(
            "{:<14}{:>10.4}{:>8.2}{:>17.2}×{:>11.0}\n",
            s.policy,
            loss(s),
            s.kept_fraction,
            ratio,
            s.tokens_per_s
        );
    }
    let gap = loss(&c.policy) - loss(clm);
    let verdict = if gap <= 0.0 {
        format!("{} ends {:.3} nats below clm", c.policy.policy, -gap)
    } else {
        format!("{} ends {:.3} nats above clm", c.policy.policy, gap)
    };
    out += &format!(
        "{verdict} after the same number of steps, each step taking {time_ratio:.2}× clm's time. Equal steps \
         are not equal time: docs/results.md compares policies at equal wall-clock.\n"
    );
    out
}
