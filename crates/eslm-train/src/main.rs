//! `eslm-train`: train GPT-2 with selective language modeling, evaluate, sample and plot runs.
//! See docs/trainer.md for every command with an example.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
}

fn print_summary(s: &TrainSummary) {
    println!("── eslm-train summary ({}) ──", s.policy);
    if s.interrupted {
        println!("interrupted at step {} (checkpoint saved)", s.steps);
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

fn train(args: TrainArgs) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "Ctrl-C: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    // One rank of `mpirun`/`srun` with --features mpi (rank 0 prints the summary); otherwise one process.
    if let Some(summary) = eslm_train::distributed::train_from_env(&args, stop)? {
        print_summary(&summary);
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => train(cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Eval(args)) => eslm_train::eval_cmd::run_eval(&args)
            .map(|_| ())
            .map_err(Into::into),
        Some(Command::Sample(args)) => eslm_train::sample::run_sample(&args)
            .map(|_| ())
            .map_err(Into::into),
        Some(Command::Plot(args)) => eslm_train::plot::run_plot(&args).map_err(Into::into),
    }
}
