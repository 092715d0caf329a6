//! `eslm-train eval CKPT`: perplexity on token shards and downstream tasks (HellaSwag, LAMBADA, ARC-style JSONL),
//! printed as a table and written as one JSON object to stdout with `--json`.

use std::path::{Path, PathBuf};

use eslm_data::{LoaderConfig, Tokenizer, ValLoader};

use crate::data::ValData;
use crate::error::{Result, TrainError};
use crate::eval_tasks::{
    eval_choices, eval_lambada, parse_choice_jsonl, parse_hellaswag, parse_lambada,
};
use crate::models::open_model;
use crate::trainer::evaluate;

/// Flags of `eslm-train eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint directory (e.g. runs/default/checkpoints/step_00000300, or an HF GPT-2 directory).
    pub checkpoint: PathBuf,
    /// Token shards for perplexity (file, directory or glob).
    #[arg(long)]
    pub val: Option<String>,
    /// Sequence length for perplexity (default: the model's maximum).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Batch size for perplexity.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokenizer (tokenizer.json, or a directory with vocab.json + merges.txt) for the text tasks.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// HellaSwag file in the six-line format.
    #[arg(long)]
    pub hellaswag: Option<PathBuf>,
    /// LAMBADA JSONL file.
    #[arg(long)]
    pub lambada: Option<PathBuf>,
    /// ARC-style JSONL file (query, choices, gold).
    #[arg(long)]
    pub arc: Option<PathBuf>,
    /// Evaluate at most N items per task (0: all) and N batches of perplexity.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))
}

fn limited<T>(mut v: Vec<T>, limit: usize) -> Vec<T> {
    if limit > 0 {
        v.truncate(limit);
    }
    v
}

/// Runs `eslm-train eval`; returns the results as JSON (also printed).
pub fn run_eval(args: &EvalArgs) -> Result<serde_json::Value> {
    let mut model = open_model(&args.checkpoint, args.batch_size.max(1), usize::MAX)?;
    let mut out = serde_json::Map::new();
    if let Some(pattern) = &args.val {
        let t = args
            .seq_len
            .unwrap_or(model.max_seq_len())
            .min(model.max_seq_len());
        let loader = ValLoader::open(
            pattern,
            LoaderConfig::new(args.batch_size.max(1), t).with_shuffle(false),
        )?;
        for s in loader.shards() {
            s.check_vocab(model.vocab_size() as u64)?;
        }
        let r = evaluate(
            model.as_mut(),
            &ValData {
                loader,
                kinds: None,
            },
            args.limit,
        )?;
        out.insert(
            "val".into(),
            serde_json::json!({"loss": r.loss, "ppl": r.loss.exp(), "tokens": r.tokens}),
        );
    }
    let tasks = [&args.hellaswag, &args.lambada, &args.arc];
    if tasks.iter().any(|t| t.is_some()) {
        let tok_path = args.tokenizer.as_ref().ok_or_else(|| {
            TrainError::Config(
                "the text tasks need --tokenizer PATH (tokenizer.json or a directory with vocab.json + merges.txt)".into(),
            )
        })?;
        let tok = Tokenizer::from_path(tok_path)?;
        if tok.vocab_size() > model.vocab_size() {
            return Err(TrainError::Config(format!(
                "tokenizer has {} ids but the model only {}; HINT: use the model's own tokenizer",
                tok.vocab_size(),
                model.vocab_size()
            )));
        }
        let encode = |s: &str| tok.encode(s).map_err(TrainError::from);
        if let Some(p) = &args.hellaswag {
            let items = limited(parse_hellaswag(&read(p)?, p)?, args.limit);
            out.insert(
                "hellaswag".into(),
                serde_json::to_value(eval_choices(model.as_mut(), &items, &encode)?)?,
            );
        }
        if let Some(p) = &args.lambada {
            let items = limited(parse_lambada(&read(p)?, p)?, args.limit);
            out.insert(
                "lambada".into(),
                serde_json::to_value(eval_lambada(model.as_mut(), &items, &encode)?)?,
            );
        }
        if let Some(p) = &args.arc {
            let items = limited(parse_choice_jsonl(&read(p)?, p)?, args.limit);
            out.insert(
                "arc".into(),
                serde_json::to_value(eval_choices(model.as_mut(), &items, &encode)?)?,
            );
        }
    }
    if out.is_empty() {
        return Err(TrainError::Config(
            "nothing to evaluate: pass --val SHARDS and/or --hellaswag/--lambada/--arc FILE (with --tokenizer)".into(),
        ));
    }
    let value = serde_json::Value::Object(out);
    if args.json {
        println!("{value}");
    } else {
        for (task, r) in value.as_object().into_iter().flatten() {
            println!("{task:<10} {r}");
        }
    }
    Ok(value)
}
