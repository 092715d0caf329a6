//! `eslm-train eval CKPT`: perplexity on token shards and downstream tasks (HellaSwag, LAMBADA, ARC-style and
//! Winogrande-style JSONL), printed as a table and written as one JSON object to stdout with `--json`. Each task
//! flag may repeat; every file is reported under its file name (its path when two names collide), with its
//! task. `--per-item FILE` writes one JSON line per scored item (file, task, line, per-option log-likelihoods,
//! prediction, gold).

use std::path::{Path, PathBuf};

use eslm_data::{LoaderConfig, Tokenizer, ValLoader};

use crate::data::ValData;
use crate::error::{Result, TrainError};
use crate::eval_tasks::{
    eval_choices, eval_lambada, parse_choice_jsonl, parse_hellaswag, parse_lambada,
    parse_winogrande, ChoiceItem,
};
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
    /// HellaSwag file in the six-line format (repeatable).
    #[arg(long)]
    pub hellaswag: Vec<PathBuf>,
    /// LAMBADA JSONL file (repeatable).
    #[arg(long)]
    pub lambada: Vec<PathBuf>,
    /// ARC-style JSONL file: query, choices, gold as an index or a letter (repeatable).
    #[arg(long)]
    pub arc: Vec<PathBuf>,
    /// Winogrande-style JSONL file: context_options, continuation, gold (partial scoring; repeatable).
    #[arg(long)]
    pub winogrande: Vec<PathBuf>,
    /// Write one JSON line per scored item to this file (JSONL).
    #[arg(long)]
    pub per_item: Option<PathBuf>,
    /// Evaluate at most N items per task (0: all) and N batches of perplexity.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu", value_parser = crate::config::parse_device)]
    pub device: crate::config::Device,
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
    crate::models::check_device(args.device)?;
    let mut model = crate::models::open_model_on(
        &args.checkpoint,
        args.batch_size.max(1),
        usize::MAX,
        args.device,
    )?;
    let mut out = serde_json::Map::new();
    if let Some(pattern) = &args.val {
        let max_t = model.max_seq_len();
        let t = match args.seq_len {
            Some(t) if t > max_t => {
                return Err(TrainError::Config(format!(
                    "--seq-len {t} exceeds the model's context of {max_t} positions ({}); HINT: pass --seq-len \
                     {max_t} or less (or omit it)",
                    args.checkpoint.display()
                )))
            }
            Some(0) => return Err(TrainError::Config("--seq-len must be at least 1".into())),
            Some(t) => t,
            None => max_t,
        };
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
    let files: Vec<(&str, &PathBuf)> = [
        ("hellaswag", &args.hellaswag),
        ("lambada", &args.lambada),
        ("arc", &args.arc),
        ("winogrande", &args.winogrande),
    ]
    .into_iter()
    .flat_map(|(task, paths)| paths.iter().map(move |p| (task, p)))
    .collect();
    if !files.is_empty() {
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
        let mut per_item = match &args.per_item {
            Some(p) => Some((
                std::io::BufWriter::new(
                    std::fs::File::create(p).map_err(|e| TrainError::io(p, e))?,
                ),
                p,
            )),
            None => None,
        };
        let names: Vec<String> = files
            .iter()
            .map(|(_, p)| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| p.display().to_string())
            })
            .collect();
        for (i, (task, p)) in files.iter().enumerate() {
            let name = if names.iter().filter(|n| **n == names[i]).count() > 1 {
                p.display().to_string()
            } else {
                names[i].clone()
            };
            let text = read(p)?;
            let (mut result, lines) = if *task == "lambada" {
                let items = limited(parse_lambada(&text, p)?, args.limit);
                let r = eval_lambada(model.as_mut(), &items, &encode, p)?;
                let lines: Vec<serde_json::Value> = r
                    .per_item
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<std::result::Result<_, _>>()?;
                (serde_json::to_value(&r)?, lines)
            } else {
                let items: Vec<ChoiceItem> = match *task {
                    "hellaswag" => parse_hellaswag(&text, p)?,
                    "arc" => parse_choice_jsonl(&text, p)?,
                    _ => parse_winogrande(&text, p)?,
                };
                let items = limited(items, args.limit);
                let r = eval_choices(model.as_mut(), &items, &encode, p)?;
                let lines: Vec<serde_json::Value> = r
                    .per_item
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<std::result::Result<_, _>>()?;
                (serde_json::to_value(&r)?, lines)
            };
            if let Some((w, path)) = per_item.as_mut() {
                use std::io::Write;
                for mut line in lines {
                    if let serde_json::Value::Object(m) = &mut line {
                        m.insert("task".into(), (*task).into());
                        m.insert("file".into(), p.display().to_string().into());
                    }
                    writeln!(w, "{line}").map_err(|e| TrainError::io(path.as_path(), e))?;
                }
            }
            if let serde_json::Value::Object(m) = &mut result {
                m.insert("task".into(), (*task).into());
            }
            out.insert(name, result);
        }
        if let Some((mut w, path)) = per_item {
            use std::io::Write;
            w.flush().map_err(|e| TrainError::io(path.as_path(), e))?;
        }
    }
    if out.is_empty() {
        return Err(TrainError::Config(
            "nothing to evaluate: pass --val SHARDS and/or --hellaswag/--lambada/--arc/--winogrande FILE (with --tokenizer)".into(),
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
