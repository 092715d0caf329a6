//! `eslm-train sample CKPT`: autoregressive generation. Each new token is drawn from
//! `softmax(z / temperature)` restricted to the `top_k` largest logits (temperature 0: greedy argmax), with a
//! seeded ChaCha8 RNG. Tokens are printed (and flushed) as they are generated, so an interrupted generation
//! keeps what it printed. The context is re-run in full every token (no KV cache yet: that needs an incremental
//! forward in the engine; fine for the small models this trainer produces) and left-truncated to the model's
//! maximum sequence length. A negative or non-finite temperature and non-finite logits are errors.

use std::path::PathBuf;

use eslm_data::Tokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainError};
use crate::model::LanguageModel;

/// Flags of `eslm-train sample`.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// Checkpoint directory.
    pub checkpoint: PathBuf,
    /// Prompt text (needs --tokenizer).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (for models without a tokenizer, e.g. the synthetic corpus).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Vec<u32>,
    /// Tokenizer (tokenizer.json or a directory with vocab.json + merges.txt).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Softmax temperature (0: greedy; must be finite and ≥ 0).
    #[arg(long, default_value_t = 0.8, value_parser = non_negative_f32)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with --features cuda; generation on a GPU runs the full
    /// context each token, the key/value cache is the CPU's).
    #[arg(long, default_value = "cpu", value_parser = crate::config::parse_device)]
    pub device: crate::config::Device,
}

/// clap value parser of `--temperature`: a finite number ≥ 0.
pub fn non_negative_f32(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` must be a finite number ≥ 0 (0 = greedy)"));
    }
    Ok(v)
}

/// Picks the next token from one row of `vocab` logits.
pub fn sample_token(logits: &[f32], temperature: f32, top_k: usize, rng: &mut ChaCha8Rng) -> u32 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature <= 0.0 || !temperature.is_finite() {
        return idx[0] as u32;
    }
    let k = if top_k == 0 {
        idx.len()
    } else {
        top_k.min(idx.len())
    };
    let top = &idx[..k];
    let m = logits[top[0]];
    let weights: Vec<f64> = top
        .iter()
        .map(|&i| (((logits[i] - m) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (w, &i) in weights.iter().zip(top) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    top[k - 1] as u32
}

/// Generates `n` tokens after `prompt`.
pub fn generate(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    n: usize,
    temperature: f32,
    top_k: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    generate_with(model, prompt, n, temperature, top_k, seed, &mut |_| Ok(()))
}

/// [`generate`] calling `on_token` with each token as soon as it is drawn (for streaming output).
pub fn generate_with(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    n: usize,
    temperature: f32,
    top_k: usize,
    seed: u64,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(TrainError::Config(
            "the prompt is empty; pass --prompt or --prompt-ids".into(),
        ));
    }
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(TrainError::Config(format!(
            "--temperature must be a finite number ≥ 0 (0 = greedy), got {temperature}"
        )));
    }
    let vocab = model.vocab_size();
    crate::error::check_tokens(prompt, vocab)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = prompt.to_vec();
    for i in 0..n {
        // The engine's KV cache makes each token O(t) while the context fits; the trait's default re-runs it.
        let row = model.next_token_logits(&ids)?;
        if let Some(bad) = row.iter().find(|z| !z.is_finite()) {
            return Err(TrainError::Model(format!(
                "the model's logits are not finite ({bad}) at generated token {}; its weights are broken \
                 (a diverged checkpoint?)",
                i + 1
            )));
        }
        let next = sample_token(&row, temperature, top_k, &mut rng);
        ids.push(next);
        on_token(next)?;
    }
    Ok(ids[prompt.len()..].to_vec())
}

/// Runs `eslm-train sample`: prints the prompt and its continuation.
pub fn run_sample(args: &SampleArgs) -> Result<String> {
    crate::models::check_device(args.device)?;
    let mut model = crate::models::open_model_on(&args.checkpoint, 1, usize::MAX, args.device)?;
    let tok = args
        .tokenizer
        .as_ref()
        .map(Tokenizer::from_path)
        .transpose()?;
    let prompt: Vec<u32> = match (&args.prompt, &tok) {
        (Some(text), Some(t)) => t.encode(text)?,
        (Some(_), None) => {
            return Err(TrainError::Config(
                "--prompt needs --tokenizer (or pass --prompt-ids)".into(),
            ));
        }
        (None, _) => args.prompt_ids.clone(),
    };
    use std::io::Write;
    let stdout = std::io::stdout();
    let io_err = |e| TrainError::io("<stdout>", e);
    let prefix = match &tok {
        Some(t) => t.decode(&prompt)?,
        None => format!(
            "{} |",
            prompt
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    };
    {
        let mut lock = stdout.lock();
        write!(lock, "{prefix}").map_err(io_err)?;
        lock.flush().map_err(io_err)?;
    }
    // With a tokenizer, decode everything generated so far and print the new suffix (a token may complete a
    // multi-byte character only together with the next one).
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let out = generate_with(
        model.as_mut(),
        &prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        &mut |id| {
            so_far.push(id);
            let piece = match &tok {
                Some(t) => {
                    let text = t.decode(&so_far)?;
                    let new = text
                        .strip_prefix(printed.as_str())
                        .map(str::to_string)
                        .unwrap_or_default();
                    if !new.is_empty() && !new.ends_with('\u{FFFD}') {
                        printed = text;
                        new
                    } else {
                        String::new()
                    }
                }
                None => format!(" {id}"),
            };
            let mut lock = stdout.lock();
            write!(lock, "{piece}").map_err(io_err)?;
            lock.flush().map_err(io_err)
        },
    )?;
    let text = match &tok {
        Some(t) => {
            let all = t.decode(&out)?;
            let rest = all.strip_prefix(printed.as_str()).unwrap_or("");
            print!("{rest}");
            format!("{prefix}{all}")
        }
        None => format!(
            "{prefix} {}",
            out.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        ),
    };
    println!();
    Ok(text)
}
