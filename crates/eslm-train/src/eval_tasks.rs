//! Downstream evaluation by completion log-likelihood: HellaSwag (six-line text format), LAMBADA (JSONL
//! `context` / `continuation`) and ARC-style multiple choice (JSONL `query` / `choices` / `gold`).
//!
//! For a context `c` and a completion `x` (tokens `x_1..x_m`, the text prefixed with one space), the score is
//! `log p(x | c) = Σ_j log p(x_j | c, x_<j)` from one no-grad forward over `c ++ x` (left-truncated to the
//! model's maximum sequence length + 1). Multiple choice: `acc` picks the highest total log-likelihood,
//! `acc_norm` the highest mean log-likelihood per completion token (llm.c's HellaSwag convention; lm-eval
//! normalises by bytes instead, so its acc_norm differs slightly). LAMBADA: `acc` = every continuation token is
//! the model's greedy argmax; `ppl` = exp of the mean NLL per continuation token.

use std::path::Path;

use eslm_kernels::token_stats::{TokenStats, DEFAULT_IGNORE_INDEX};

use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

/// A multiple-choice item: context, candidate completions (with their leading space) and the gold index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceItem {
    /// The context text.
    pub context: String,
    /// Candidate completions, each starting with a space.
    pub choices: Vec<String>,
    /// Index of the correct completion.
    pub gold: usize,
}

/// A LAMBADA item: predict `continuation` (the last word, with its leading space) after `context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LambadaItem {
    /// The passage without its last word.
    pub context: String,
    /// The last word, starting with a space.
    pub continuation: String,
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
            Ok(ChoiceItem {
                context: l[0].to_string(),
                choices: l[2..6].iter().map(|e| with_space(e.trim_end())).collect(),
                gold,
            })
        })
        .collect()
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
            })
        })
        .collect()
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
            let gold = v.get("gold").and_then(|g| g.as_u64()).ok_or_else(|| {
                fmt_err(path, format!("line {line}: missing integer field `gold`"))
            })? as usize;
            if gold >= choices.len() {
                return Err(fmt_err(
                    path,
                    format!("line {line}: gold {gold} but {} choices", choices.len()),
                ));
            }
            Ok(ChoiceItem {
                context: str_field(&v, "query", line, path)?,
                choices,
                gold,
            })
        })
        .collect()
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
    if let Some(&id) = all.iter().find(|&&x| x as usize >= vocab) {
        return Err(TrainError::TokenOutOfRange { id, vocab });
    }
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

/// Accuracy of a multiple-choice evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct ChoiceResult {
    /// Items evaluated.
    pub items: usize,
    /// Fraction where the gold completion has the highest total log-likelihood.
    pub acc: f64,
    /// Fraction where the gold completion has the highest mean log-likelihood per token.
    pub acc_norm: f64,
}

/// Evaluates multiple-choice `items` with `encode` turning text into token ids.
pub fn eval_choices(
    model: &mut dyn LanguageModel,
    items: &[ChoiceItem],
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
) -> Result<ChoiceResult> {
    let mut stats = TokenStats::default();
    let (mut hit, mut hit_norm) = (0usize, 0usize);
    for item in items {
        let ctx = encode(&item.context)?;
        let mut best = (f64::NEG_INFINITY, 0usize);
        let mut best_norm = (f64::NEG_INFINITY, 0usize);
        for (i, choice) in item.choices.iter().enumerate() {
            let s = score_completion(model, &ctx, &encode(choice)?, &mut stats)?;
            if s.logprob > best.0 {
                best = (s.logprob, i);
            }
            let norm = s.logprob / s.tokens as f64;
            if norm > best_norm.0 {
                best_norm = (norm, i);
            }
        }
        hit += (best.1 == item.gold) as usize;
        hit_norm += (best_norm.1 == item.gold) as usize;
    }
    let n = items.len().max(1) as f64;
    Ok(ChoiceResult {
        items: items.len(),
        acc: hit as f64 / n,
        acc_norm: hit_norm as f64 / n,
    })
}

/// LAMBADA results.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct LambadaResult {
    /// Items evaluated.
    pub items: usize,
    /// Fraction whose continuation is entirely the greedy prediction.
    pub acc: f64,
    /// exp(mean NLL per continuation token).
    pub ppl: f64,
}

/// Evaluates LAMBADA `items`.
pub fn eval_lambada(
    model: &mut dyn LanguageModel,
    items: &[LambadaItem],
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
) -> Result<LambadaResult> {
    let mut stats = TokenStats::default();
    let (mut hit, mut nll, mut tokens) = (0usize, 0.0f64, 0usize);
    for item in items {
        let s = score_completion(
            model,
            &encode(&item.context)?,
            &encode(&item.continuation)?,
            &mut stats,
        )?;
        hit += s.greedy as usize;
        nll -= s.logprob;
        tokens += s.tokens;
    }
    Ok(LambadaResult {
        items: items.len(),
        acc: hit as f64 / items.len().max(1) as f64,
        ppl: (nll / tokens.max(1) as f64).exp(),
    })
}
