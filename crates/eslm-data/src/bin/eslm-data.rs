//! `eslm-data`: command-line tools for eslm's token data.
//!
//! `eslm-data prepare --input PATH... --tokenizer PATH --out DIR [--val-fraction F] [--shard-tokens N]
//! [--jsonl-field text] [--strict]` turns text, `.gz` text and JSONL (files or folders) into llm.c shards.
//! `eslm-data synthetic --out DIR` writes the built-in synthetic corpus. `eslm-data info SHARD...` prints headers.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use eslm_data::prepare::{prepare, PrepareConfig};
use eslm_data::synthetic::{write_synthetic_corpus, SyntheticConfig};
use eslm_data::{ShardReader, Tokenizer};

#[derive(Parser)]
#[command(
    name = "eslm-data",
    version,
    about = "Token data for eslm: prepare shards, synthetic corpus, shard info"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize text / .gz / JSONL inputs (files or folders) into train and val shards.
    Prepare {
        /// Input files or folders (repeatable).
        #[arg(long = "input", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// tokenizer.json, vocab.json (with merges.txt next to it), or a folder holding them.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output folder for train_NNNNNN.bin / val_NNNNNN.bin.
        #[arg(long)]
        out: PathBuf,
        /// Fraction of documents held out for validation, in [0, 1).
        #[arg(long, default_value_t = 0.0)]
        val_fraction: f64,
        /// Maximum tokens per shard.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// JSON field with the text of JSONL records.
        #[arg(long, default_value = "text")]
        jsonl_field: String,
        /// Fail on the first unreadable, empty or invalid input instead of skipping it.
        #[arg(long)]
        strict: bool,
        /// Seed of the train/val document split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Replace shards already in --out.
        #[arg(long)]
        overwrite: bool,
        /// Rayon threads for encoding (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Write the built-in synthetic corpus (template / learnable / noise tokens) with its .kinds side files.
    Synthetic {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the language and documents.
        #[arg(long, default_value_t = SyntheticConfig::default().seed)]
        seed: u64,
        /// Training documents.
        #[arg(long, default_value_t = SyntheticConfig::default().train_documents)]
        train_documents: usize,
        /// Validation documents.
        #[arg(long, default_value_t = SyntheticConfig::default().val_documents)]
        val_documents: usize,
        /// Replace shards (and prepare.json) already in --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// Print the header of shard files.
    Info {
        /// Shard files.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
    },
}

/// Prints an error chain once (a cause already contained in the text before it is skipped), never a backtrace.
fn print_error(e: &anyhow::Error) {
    let mut shown: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !shown.iter().any(|s| s.contains(&text)) {
            shown.push(text);
        }
    }
    eprintln!("error: {}", shown.first().map(String::as_str).unwrap_or(""));
    for c in shown.iter().skip(1) {
        eprintln!("  caused by: {c}");
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            std::process::ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare {
            inputs,
            tokenizer,
            out,
            val_fraction,
            shard_tokens,
            jsonl_field,
            strict,
            seed,
            overwrite,
            threads,
        } => {
            if let Some(t) = threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build_global()
                    .context("configuring rayon threads")?;
            }
            let tok = Tokenizer::from_path(&tokenizer)?;
            let cfg = PrepareConfig {
                val_fraction,
                shard_tokens,
                jsonl_field,
                strict,
                seed,
                overwrite,
                progress: true,
                ..PrepareConfig::new(inputs, out)
            };
            let summary = prepare(&cfg, &tok)?;
            println!("{summary}");
            for w in &summary.warnings {
                eprintln!("warning: {w}");
            }
            let meta = cfg.out_dir.join("prepare.json");
            std::fs::write(&meta, serde_json::to_string_pretty(&summary)?)
                .with_context(|| format!("writing {}", meta.display()))?;
        }
        Command::Synthetic {
            out,
            seed,
            train_documents,
            val_documents,
            overwrite,
        } => {
            eslm_data::prepare::claim_out_dir(&out, overwrite)?;
            let cfg = SyntheticConfig {
                seed,
                train_documents,
                val_documents,
                ..SyntheticConfig::default()
            };
            let s = write_synthetic_corpus(&out, &cfg)?;
            println!(
                "wrote {} train tokens in {} shard(s), {} val tokens in {} shard(s) to {}",
                s.train_tokens,
                s.train_shards.len(),
                s.val_tokens,
                s.val_shards.len(),
                out.display()
            );
            println!(
                "kinds (template, learnable, noise): {:?}; Bayes-optimal mean loss {:.4} nats",
                s.train_kind_counts, s.optimal_mean_loss
            );
        }
        Command::Info { shards } => {
            let mut failed = 0;
            for p in shards {
                if p.is_dir() {
                    eprintln!(
                        "{}: is a directory; HINT: pass shard files, e.g. {}/train_*.bin",
                        p.display(),
                        p.display()
                    );
                    failed += 1;
                    continue;
                }
                match ShardReader::open(&p) {
                    Ok(s) => println!("{}: {:?}, {} tokens", p.display(), s.width(), s.len()),
                    Err(e) => {
                        eprintln!("{e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} file(s) are not valid shards");
            }
        }
    }
    Ok(())
}
