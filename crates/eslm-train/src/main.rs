//! `eslm-train`: train GPT-2 with selective language modeling, evaluate, sample and plot runs.
//! See docs/trainer.md for every command with an example.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use eslm_train::config::TrainArgs;
use eslm_train::trainer::TrainSummary;

/// Train GPT-2 with selective language modeling (ESLM and friends) on CPU.
#[derive(Debug, Parser)]
#[command(
    name = "eslm-train",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

// `Train` holds every training flag; the enum is built once per process, so its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (the default when no subcommand is given).
    Train(TrainArgs),
    /// Evaluate a checkpoint: perplexity on shards, HellaSwag, LAMBADA, ARC-style multiple choice.
    Eval(eslm_train::eval_cmd::EvalArgs),
    /// Generate text from a checkpoint.
    Sample(eslm_train::sample::SampleArgs),
    /// Plot validation loss of several runs against tokens, FLOPs and wall-clock.
    Plot(eslm_train::plot::PlotArgs),
    Compare(eslm_train::compare::CompareArgs),
}

fn print_summary(s: &TrainSummary) {
    println!("── eslm-train summary ({}) ──", s.policy);
    if let Some(dir) = &s.resumed_from {
        println!("resumed from: {}", dir.display());
    }
    if s.interrupted {
        println!("interrupted at step {} (checkpoint saved)", s.steps);
    } else if s.time_budget_reached {
        println!("steps: {} (stopped by --time-budget)", s.steps);
    } else {
        println!("steps: {}", s.steps);
    }
    if let Some(b) = &s.val_before {
        println!("val loss before: {:.4} (ppl {:.2})", b.loss, b.loss.exp());
    }
    if let Some(a) = &s.val_after {
        println!("val loss after:  {:.4} (ppl {:.2})", a.loss, a.loss.exp());
        if let Some(k) = a.loss_by_kind {
            println!(
                "val loss by kind: template {:.3}, learnable {:.3}, noise {:.3}",
                k[0], k[1], k[2]
            );
        }
    }
    println!("kept fraction: {:.3}", s.kept_fraction);
    if let Some(alpha) = s.final_alpha {
        println!("final alpha: {alpha:.3}");
    }
    println!("tokens/s: {:.0}", s.tokens_per_s);
    if let Some(share) = s.reduce_share {
        println!(
            "gradient reduction: {:.1}% of training time on rank 0 (transfer and waiting for other ranks)",
            100.0 * share
        );
    }
    if let (Some(kept), Some(total)) = (s.kind_kept, s.kind_total) {
        let all: u64 = kept.iter().sum();
        let names = ["template", "learnable", "noise"];
        let parts: Vec<String> = (0..3)
            .map(|i| {
                let rate = if total[i] > 0 {
                    kept[i] as f64 / total[i] as f64
                } else {
                    0.0
                };
                let share = if all > 0 {
                    kept[i] as f64 / all as f64
                } else {
                    0.0
                };
                format!(
                    "{} {:.0}% kept ({:.0}% of kept)",
                    names[i],
                    100.0 * rate,
                    100.0 * share
                )
            })
            .collect();
        println!("token kinds: {}", parts.join(", "));
    }
    if s.skipped_steps > 0 {
        println!("skipped steps (non-finite): {}", s.skipped_steps);
    }
    if let Some(c) = &s.checkpoint {
        println!("checkpoint: {}", c.display());
    }
}

/// The interrupt flag: the first Ctrl-C / SIGTERM asks for a clean stop (checkpoint), the second exits at once.
fn install_stop() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // The `termination` feature makes this handler catch SIGINT, SIGTERM (Slurm, Kubernetes) and SIGHUP.
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "interrupt (Ctrl-C / SIGTERM): finishing the current step, then saving a checkpoint (again to abort)"
        );
    })
    .context("installing the Ctrl-C / SIGTERM handler")?;
    Ok(stop)
}

/// What a successful command asks the process to exit with: 0, or 130 after an interrupted (but checkpointed)
/// training run, so `train && eval` does not evaluate a half-trained model.
fn train(args: TrainArgs) -> Result<ExitCode> {
    let stop = install_stop()?;
    // One rank of `mpirun`/`srun` with --features mpi (rank 0 prints the summary); otherwise one process.
    let outcome = eslm_train::distributed::train_from_env(&args, stop)?;
    if outcome.root {
        print_summary(&outcome.summary);
    }
    if outcome.summary.interrupted && outcome.root {
        eprintln!("interrupted: exit code 130 (resume with --resume)");
    }
    // No rank exits before rank 0 has reported (see `RankOutcome::finish`).
    outcome.finish()?;
    if outcome.summary.interrupted {
        // Every rank exits 130 after an interrupt, as one process does.
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

/// The bare command: the default policy and a CLM baseline side by side in a fresh `runs/default[-N]/`.
fn default_run() -> Result<ExitCode> {
    let stop = install_stop()?;
    let root = eslm_train::baseline::fresh_dir(std::path::Path::new("runs/default"));
    let c = eslm_train::baseline::run_with_baseline(&TrainArgs::default(), &root, stop)?;
    print_summary(&c.policy);
    if let Some(clm) = &c.clm {
        print_summary(clm);
    }
    print!("{}", eslm_train::baseline::format_comparison(&c));
    if c.policy.interrupted || c.clm.as_ref().is_some_and(|s| s.interrupted) {
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

/// Appends ` [default: X]` to the help of every training flag whose [`eslm_train::RunConfig`] field has a
/// default (the flags themselves are optional so that they can override a `--config` file).
fn with_defaults(cmd: clap::Command) -> clap::Command {
    let defaults = serde_json::to_value(eslm_train::RunConfig::default()).unwrap_or_default();
    let ids: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .collect();
    let mut cmd = cmd;
    for id in ids {
        let Some(v) = defaults.get(&id).filter(|v| !v.is_null()) else {
            continue;
        };
        let shown = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        cmd = cmd.mut_arg(id.as_str(), |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            a.help(format!("{help} [default: {shown}]"))
        });
    }
    cmd
}

/// Prints an error chain once: the message, then each cause that adds something (a cause whose text is already
/// part of the message before it is skipped). Never a backtrace, whatever RUST_BACKTRACE says.
fn print_error(e: &anyhow::Error) {
    let mut shown: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if shown.iter().any(|s| s.contains(&text)) {
            continue;
        }
        shown.push(text);
    }
    eprintln!("error: {}", shown.first().map(String::as_str).unwrap_or(""));
    for c in shown.iter().skip(1) {
        eprintln!("  caused by: {c}");
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        None if cli.train == TrainArgs::default() => default_run(),
        None => train(cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Eval(args)) => eslm_train::eval_cmd::run_eval(&args)
            .map(|_| ExitCode::SUCCESS)
            .map_err(Into::into),
        Some(Command::Sample(args)) => eslm_train::sample::run_sample(&args)
            .map(|_| ExitCode::SUCCESS)
            .map_err(Into::into),
        Some(Command::Plot(args)) => eslm_train::plot::run_plot(&args)
            .map(|_| ExitCode::SUCCESS)
            .map_err(Into::into),
        Some(Command::Compare(args)) => eslm_train::compare::run_compare(&args, install_stop()?)
            .map(|_| ExitCode::SUCCESS)
            .map_err(Into::into),
    }
}

fn main() -> ExitCode {
    let cmd = with_defaults(Cli::command()).mut_subcommand("train", with_defaults);
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            print_error(&e);
            ExitCode::from(1)
        }
    }
}
