//! Downstream evaluation by completion log-likelihood: HellaSwag (six-line text format), LAMBADA (JSONL
//! `context` / `continuation`), ARC-style multiple choice (JSONL `query` / `choices` / `gold`, gold an index or a
//! letter) and Winogrande-style partial scoring (JSONL `context_options` / `continuation` / `gold`: one context
//! per option, the shared continuation is scored).
//!
//! For a context `c` and a completion `x` (tokens `x_1..x_m`, the text prefixed with one space), the score is
//! `log p(x | c) = Σ_j log p(x_j | c, x_<j)` from one no-grad forward over `c ++ x` (left-truncated to the
//! model's maximum sequence length + 1). Multiple choice: `acc` picks the highest total log-likelihood,
//! `acc_norm` the highest mean log-likelihood per completion token (llm.c's HellaSwag convention; lm-eval
//! normalises by bytes instead, so its acc_norm differs slightly). Ties: the first option with the highest score
//! wins (a strict `>` scan), so an item whose options all tie (e.g. every option left-truncated to the same
//! window) predicts option 0. LAMBADA: `acc` = every continuation token is the model's greedy argmax; `ppl` =
//! exp of the mean NLL per continuation token. An empty file, an empty context and a non-finite score are
//! errors naming the file and line.

use std::path::Path;

use eslm_kernels::token_stats::{TokenStats, DEFAULT_IGNORE_INDEX};

use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

/// A multiple-choice item: for each option a context and a completion (with its leading space), and the gold
/// index. HellaSwag / ARC options share one context; Winogrande-style options share one completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceItem {
    /// `(context, completion)` of each option.
    pub options: Vec<(String, String)>,
    /// Index of the correct option.
    pub gold: usize,
    /// 1-based line of the item in its file (0 when built in code).
    pub line: usize,
}

impl ChoiceItem {
    /// An item whose options share `context` and differ by completion (HellaSwag, ARC).
    pub fn shared_context(context: &str, choices: &[String], gold: usize, line: usize) -> Self {
        ChoiceItem {
            options: choices
                .iter()
                .map(|c| (context.to_string(), c.clone()))
                .collect(),
            gold,
            line,
        }
    }
}

/// A LAMBADA item: predict `continuation` (the last word, with its leading space) after `context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LambadaItem {
    /// The passage without its last word.
    pub context: String,
    /// The last word, starting with a space.
    pub continuation: String,
    /// 1-based line of the item in its file (0 when built in code).
    pub line: usize,
}

fn fmt_err(path: &Path, message: String) -> TrainError {
    TrainError::EvalFormat {
        path: path.to_path_buf(),
        message,
    }
}

fn with_space(s: &str) -> String {
    if s.starts_with(' ') {
        s.to_string()
    } else {
        format!(" {s}")
    }
}

/// Parses the six-line HellaSwag format: `activity_label: context`, the gold index (0–3), then four endings.
/// `path` is only used in error messages.
pub fn parse_hellaswag(text: &str, path: &Path) -> Result<Vec<ChoiceItem>> {
    let lines: Vec<&str> = text.lines().collect();
    let n = if lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.len() - 1
    } else {
        lines.len()
    };
    if n % 6 != 0 {
        return Err(fmt_err(
            path,
            format!("{n} lines is not a multiple of 6 (context, gold, 4 endings)"),
        ));
    }
    (0..n / 6)
        .map(|i| {
            let l = &lines[6 * i..6 * i + 6];
            let gold: usize = l[1].trim().parse().map_err(|_| {
                fmt_err(
                    path,
                    format!("line {}: gold index `{}` is not a number", 6 * i + 2, l[1]),
                )
            })?;
            if gold > 3 {
                return Err(fmt_err(
                    path,
                    format!("line {}: gold index {gold} is not in 0..=3", 6 * i + 2),
                ));
            }
            let choices: Vec<String> = l[2..6].iter().map(|e| with_space(e.trim_end())).collect();
            Ok(ChoiceItem::shared_context(l[0], &choices, gold, 6 * i + 1))
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| non_empty(v, path))
}

fn non_empty<T>(items: Vec<T>, path: &Path) -> Result<Vec<T>> {
    if items.is_empty() {
        return Err(fmt_err(
            path,
            "the file holds no items (empty file?); nothing to score".into(),
        ));
    }
    Ok(items)
}

fn jsonl(text: &str, path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .map_err(|e| fmt_err(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

fn str_field(v: &serde_json::Value, key: &str, line: usize, path: &Path) -> Result<String> {
    v.get(key)
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .ok_or_else(|| fmt_err(path, format!("line {line}: missing string field `{key}`")))
}

/// Parses LAMBADA JSONL lines `{"context": ..., "continuation": ...}`.
pub fn parse_lambada(text: &str, path: &Path) -> Result<Vec<LambadaItem>> {
    jsonl(text, path)?
        .into_iter()
        .map(|(line, v)| {
            Ok(LambadaItem {
                context: str_field(&v, "context", line, path)?,
                continuation: with_space(&str_field(&v, "continuation", line, path)?),
                line,
            })
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| non_empty(v, path))
}

/// The gold index of a JSONL item: an integer, or a letter `A`, `B`, ... (ARC's `answerKey` style).
fn gold_field(v: &serde_json::Value, line: usize, path: &Path) -> Result<usize> {
    match v.get("gold") {
        Some(g) if g.as_u64().is_some() => Ok(g.as_u64().unwrap_or(0) as usize),
        Some(serde_json::Value::String(s))
            if s.trim().len() == 1 && s.trim().chars().all(|c| c.is_ascii_uppercase()) =>
        {
            Ok((s.trim().as_bytes()[0] - b'A') as usize)
        }
        Some(other) => Err(fmt_err(
            path,
            format!("line {line}: `gold` is {other}; expected an index (0, 1, ...) or a letter (\"A\", \"B\", ...)"),
        )),
        None => Err(fmt_err(
            path,
            format!("line {line}: missing field `gold` (an index or a letter)"),
        )),
    }
}

/// Parses Winogrande-style JSONL lines `{"context_options": [...], "continuation": ..., "gold": i}`: each option
/// is a context, and the shared continuation (with a leading space) is the scored completion.
pub fn parse_winogrande(text: &str, path: &Path) -> Result<Vec<ChoiceItem>> {
    jsonl(text, path)?
        .into_iter()
        .map(|(line, v)| {
            let contexts: Vec<String> = v
                .get("context_options")
                .and_then(|c| c.as_array())
                .ok_or_else(|| {
                    fmt_err(path, format!("line {line}: missing array field `context_options`"))
                })?
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    fmt_err(path, format!("line {line}: `context_options` must hold strings"))
                })?;
            let continuation = with_space(&str_field(&v, "continuation", line, path)?);
            let gold = gold_field(&v, line, path)?;
            if contexts.len() < 2 || gold >= contexts.len() {
                return Err(fmt_err(
                    path,
                    format!(
                        "line {line}: gold {gold} with {} context options (need ≥ 2, gold below that)",
                        contexts.len()
                    ),
                ));
            }
            Ok(ChoiceItem {
                options: contexts
                    .into_iter()
                    .map(|c| (c, continuation.clone()))
                    .collect(),
                gold,
                line,
            })
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| non_empty(v, path))
}

/// Parses ARC-style JSONL lines `{"query": ..., "choices": [...], "gold": i}`.
pub fn parse_choice_jsonl(text: &str, path: &Path) -> Result<Vec<ChoiceItem>> {
    jsonl(text, path)?
        .into_iter()
        .map(|(line, v)| {
            let choices: Vec<String> = v
                .get("choices")
                .and_then(|c| c.as_array())
                .ok_or_else(|| {
                    fmt_err(path, format!("line {line}: missing array field `choices`"))
                })?
                .iter()
                .map(|c| c.as_str().map(with_space))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    fmt_err(path, format!("line {line}: `choices` must hold strings"))
                })?;
            let gold = gold_field(&v, line, path)?;
            if gold >= choices.len() {
                return Err(fmt_err(
                    path,
                    format!("line {line}: gold {gold} but {} choices", choices.len()),
                ));
            }
            Ok(ChoiceItem::shared_context(
                &str_field(&v, "query", line, path)?,
                &choices,
                gold,
                line,
            ))
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| non_empty(v, path))
}

/// The log-likelihood of a completion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompletionScore {
    /// `Σ log p(x_j | ...)` over the completion tokens.
    pub logprob: f64,
    /// Number of completion tokens scored.
    pub tokens: usize,
    /// Whether every completion token is the model's argmax.
    pub greedy: bool,
}

/// Scores `completion` after `context` (token ids) with one no-grad forward.
pub fn score_completion(
    model: &mut dyn LanguageModel,
    context: &[u32],
    completion: &[u32],
    stats: &mut TokenStats,
) -> Result<CompletionScore> {
    if completion.is_empty() {
        return Err(TrainError::Config("empty completion".into()));
    }
    let mut all: Vec<u32> = context.iter().chain(completion).copied().collect();
    let window = model.max_seq_len().saturating_add(1);
    if all.len() > window {
        all.drain(..all.len() - window);
    }
    if all.len() < 2 {
        return Err(TrainError::Config(
            "a completion needs at least one context token".into(),
        ));
    }
    let t = all.len() - 1;
    let m = completion.len().min(t);
    let inputs = &all[..t];
    let targets: Vec<i32> = all[1..]
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            if i >= t - m {
                y as i32
            } else {
                DEFAULT_IGNORE_INDEX
            }
        })
        .collect();
    let vocab = model.vocab_size();
    crate::error::check_tokens(&all, vocab)?;
    stats.clone_from(model.forward_inference(inputs, &targets, 1, t, None)?);
    let mut logprob = 0.0;
    let mut greedy = true;
    for (r, &y) in targets.iter().enumerate().skip(t - m) {
        logprob -= stats.loss[r] as f64;
        if greedy {
            // One row of logits at a time (the engine boundary's one exception); skipped once any row fails.
            let row = model.row_logits(r)?;
            greedy = !row.iter().any(|&z| z > row[y as usize]);
        }
    }
    Ok(CompletionScore {
        logprob,
        tokens: m,
        greedy,
    })
}

/// One multiple-choice item's scores (the `--per-item` output).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChoiceItemResult {
    /// 1-based line of the item in its file.
    pub line: usize,
    /// Gold index.
    pub gold: usize,
    /// Prediction by total log-likelihood (first of the ties).
    pub pred: usize,
    /// Prediction by mean log-likelihood per completion token (first of the ties).
    pub pred_norm: usize,
    /// Total log-likelihood of each option's completion.
    pub logprobs: Vec<f64>,
    /// Completion tokens scored per option.
    pub tokens: Vec<usize>,
}

/// Accuracy of a multiple-choice evaluation.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct ChoiceResult {
    /// Items evaluated.
    pub items: usize,
    /// Fraction where the gold completion has the highest total log-likelihood.
    pub acc: f64,
    /// Fraction where the gold completion has the highest mean log-likelihood per token.
    pub acc_norm: f64,
    /// Every item's scores.
    #[serde(skip)]
    pub per_item: Vec<ChoiceItemResult>,
}

/// Index of the first maximum (ties: the first wins).
fn first_max(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (f64::NEG_INFINITY, 0usize);
    for (i, x) in v.enumerate() {
        if x > best.0 {
            best = (x, i);
        }
    }
    best.1
}

/// Wraps an error of the item at `line` of `path` so that it names both.
fn at_item(path: &Path, line: usize, e: TrainError) -> TrainError {
    match e {
        TrainError::EvalFormat { .. } => e,
        other => fmt_err(path, format!("line {line}: {other}")),
    }
}

/// Evaluates multiple-choice `items` of the file `path` with `encode` turning text into token ids.
pub fn eval_choices(
    model: &mut dyn LanguageModel,
    items: &[ChoiceItem],
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    path: &Path,
) -> Result<ChoiceResult> {
    let mut stats = TokenStats::default();
    let (mut hit, mut hit_norm) = (0usize, 0usize);
    let mut per_item = Vec::with_capacity(items.len());
    for item in items {
        let mut logprobs = Vec::with_capacity(item.options.len());
        let mut tokens = Vec::with_capacity(item.options.len());
        for (context, completion) in &item.options {
            let s = (|| {
                let ctx = encode(context)?;
                if ctx.is_empty() {
                    return Err(TrainError::Config(
                        "empty context: a completion needs at least one context token".into(),
                    ));
                }
                let s = score_completion(model, &ctx, &encode(completion)?, &mut stats)?;
                if !s.logprob.is_finite() {
                    return Err(TrainError::Model(format!(
                        "non-finite log-likelihood {} for `{}`; the model's weights are broken",
                        s.logprob,
                        completion.trim()
                    )));
                }
                Ok(s)
            })()
            .map_err(|e| at_item(path, item.line, e))?;
            logprobs.push(s.logprob);
            tokens.push(s.tokens);
        }
        let pred = first_max(logprobs.iter().copied());
        let pred_norm = first_max(
            logprobs
                .iter()
                .zip(&tokens)
                .map(|(l, &t)| l / t.max(1) as f64),
        );
        hit += (pred == item.gold) as usize;
        hit_norm += (pred_norm == item.gold) as usize;
        per_item.push(ChoiceItemResult {
            line: item.line,
            gold: item.gold,
            pred,
            pred_norm,
            logprobs,
            tokens,
        });
    }
    if items.is_empty() {
        return Err(fmt_err(path, "no items to evaluate".into()));
    }
    let n = items.len() as f64;
    Ok(ChoiceResult {
        items: items.len(),
        acc: hit as f64 / n,
        acc_norm: hit_norm as f64 / n,
        per_item,
    })
}

/// One LAMBADA item's score (the `--per-item` output).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LambadaItemResult {
    /// 1-based line of the item in its file.
    pub line: usize,
    /// Log-likelihood of the continuation.
    pub logprob: f64,
    /// Continuation tokens scored.
    pub tokens: usize,
    /// Whether every continuation token is the greedy prediction.
    pub greedy: bool,
}

/// LAMBADA results.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct LambadaResult {
    /// Items evaluated.
    pub items: usize,
    /// Fraction whose continuation is entirely the greedy prediction.
    pub acc: f64,
    /// exp(mean NLL per continuation token).
    pub ppl: f64,
    /// Every item's score.
    #[serde(skip)]
    pub per_item: Vec<LambadaItemResult>,
}

/// Evaluates LAMBADA `items` of the file `path`.
pub fn eval_lambada(
    model: &mut dyn LanguageModel,
    items: &[LambadaItem],
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    path: &Path,
) -> Result<LambadaResult> {
    let mut stats = TokenStats::default();
    let (mut hit, mut nll, mut tokens) = (0usize, 0.0f64, 0usize);
    let mut per_item = Vec::with_capacity(items.len());
    for item in items {
        let s = (|| {
            let ctx = encode(&item.context)?;
            if ctx.is_empty() {
                return Err(TrainError::Config(
                    "empty context: a completion needs at least one context token".into(),
                ));
            }
            let s = score_completion(model, &ctx, &encode(&item.continuation)?, &mut stats)?;
            if !s.logprob.is_finite() {
                return Err(TrainError::Model(format!(
                    "non-finite log-likelihood {}; the model's weights are broken",
                    s.logprob
                )));
            }
            Ok(s)
        })()
        .map_err(|e| at_item(path, item.line, e))?;
        hit += s.greedy as usize;
        nll -= s.logprob;
        tokens += s.tokens;
        per_item.push(LambadaItemResult {
            line: item.line,
            logprob: s.logprob,
            tokens: s.tokens,
            greedy: s.greedy,
        });
    }
    if items.is_empty() {
        return Err(fmt_err(path, "no items to evaluate".into()));
    }
    Ok(LambadaResult {
        items: items.len(),
        acc: hit as f64 / items.len() as f64,
        ppl: (nll / tokens.max(1) as f64).exp(),
        per_item,
    })
}
