//! Text → train/val token shards (the library side of `eslm-data prepare`).
//!
//! 1. Inputs: files or folders (recursive, sorted, hidden entries skipped). `*.gz` is decompressed; `*.jsonl`
//!    (and `*.jsonl.gz`) is read line by line, one document per record, from a chosen string field; anything
//!    else is UTF-8 text. Unreadable paths, empty files, invalid UTF-8 and bad JSON lines are counted and
//!    reported, or abort the run with `strict`.
//! 2. Documents: every text is split on `<|endoftext|>`; empty pieces are dropped (and counted).
//! 3. Split: `round(val_fraction · documents)` documents (at least 1 when the fraction is positive and there
//!    are two or more documents), chosen by a seeded shuffle, go to validation; the rest, in input order, to
//!    train.
//! 4. Encoding: documents are cut into pieces of about `chunk_bytes` at points where cutting cannot change
//!    GPT-2's pre-tokenization (a `\n` between two printable ASCII characters), and pieces are encoded in
//!    parallel (rayon) and concatenated in order, so ids equal those of encoding each document whole.
//! 5. Streams: within a split, documents are joined with one EOT token *between* consecutive documents (none
//!    after the last), so a single document without separators gives exactly `tokenizer.encode(text)`.
//!    Streams are cut into shards of at most `shard_tokens` tokens, `train_000000.bin`, …, `val_000000.bin`,
//!    written atomically (temporary name, fsync, rename).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::rng::SplitMix64;
use crate::shard::{ShardWriter, TokenWidth};
use crate::tokenizer::{Tokenizer, EOT_TEXT};

/// Settings of a `prepare` run.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareConfig {
    /// Input files or folders.
    pub inputs: Vec<PathBuf>,
    /// Output directory (created if needed).
    pub out_dir: PathBuf,
    /// Fraction of documents for validation, in `[0, 1)`.
    pub val_fraction: f64,
    /// Maximum tokens per shard.
    pub shard_tokens: usize,
    /// JSON field holding the text of a JSONL record.
    pub jsonl_field: String,
    /// Abort on the first bad input instead of skipping it.
    pub strict: bool,
    /// Seed of the train/val document split.
    pub seed: u64,
    /// Approximate size of the pieces encoded in parallel, in bytes.
    pub chunk_bytes: usize,
    /// Replace existing `train_*.bin` / `val_*.bin` shards in the output directory.
    pub overwrite: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl PrepareConfig {
    /// Defaults for `inputs` → `out_dir`: no validation, 100 M tokens per shard, field `text`, lenient.
    pub fn new(inputs: Vec<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        PrepareConfig {
            inputs,
            out_dir: out_dir.into(),
            val_fraction: 0.0,
            shard_tokens: 100_000_000,
            jsonl_field: "text".into(),
            strict: false,
            seed: 0,
            chunk_bytes: 1 << 20,
            overwrite: false,
            progress: false,
        }
    }
}

/// An input that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// The file (or `file:line` for a JSONL record).
    pub path: String,
    /// Why it was skipped.
    pub reason: String,
}

/// What a `prepare` run did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrepareSummary {
    /// Input files read successfully.
    pub files_read: usize,
    /// Inputs skipped: unreadable, empty, invalid UTF-8, bad JSON lines.
    pub skipped: Vec<Skipped>,
    /// Empty documents dropped (e.g. two adjacent `<|endoftext|>`).
    pub empty_documents: usize,
    /// Training documents.
    pub train_documents: usize,
    /// Validation documents.
    pub val_documents: usize,
    /// Training tokens (EOT separators included).
    pub train_tokens: u64,
    /// Validation tokens (EOT separators included).
    pub val_tokens: u64,
    /// Training shards written.
    pub train_shards: Vec<PathBuf>,
    /// Validation shards written.
    pub val_shards: Vec<PathBuf>,
    /// UTF-8 bytes of text encoded.
    pub text_bytes: u64,
    /// Seconds spent encoding.
    pub encode_seconds: f64,
    /// Seconds for the whole run.
    pub total_seconds: f64,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// Things the user should know (e.g. a one-document input split by size for validation).
    pub warnings: Vec<String>,
}

impl PrepareSummary {
    /// Encoding throughput in MB/s (10^6 bytes of text per second).
    pub fn encode_mb_per_s(&self) -> f64 {
        self.text_bytes as f64 / 1e6 / self.encode_seconds.max(1e-9)
    }
}

impl std::fmt::Display for PrepareSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "files read:        {}", self.files_read)?;
        writeln!(f, "inputs skipped:    {}", self.skipped.len())?;
        for s in self.skipped.iter().take(20) {
            writeln!(f, "  {}: {}", s.path, s.reason)?;
        }
        if self.skipped.len() > 20 {
            writeln!(f, "  ... and {} more", self.skipped.len() - 20)?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        writeln!(f, "empty documents:   {}", self.empty_documents)?;
        writeln!(
            f,
            "documents:         {} train, {} val",
            self.train_documents, self.val_documents
        )?;
        writeln!(
            f,
            "tokens:            {} train, {} val",
            self.train_tokens, self.val_tokens
        )?;
        writeln!(
            f,
            "shards:            {} train, {} val",
            self.train_shards.len(),
            self.val_shards.len()
        )?;
        write!(
            f,
            "throughput:        {:.1} MB of text in {:.2} s = {:.2} MB/s ({} rayon threads); total {:.2} s",
            self.text_bytes as f64 / 1e6,
            self.encode_seconds,
            self.encode_mb_per_s(),
            rayon::current_num_threads(),
            self.total_seconds
        )
    }
}

/// Lists input files: files as given, folders recursively (sorted, hidden entries skipped).
fn collect_files(
    inputs: &[PathBuf],
    strict: bool,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| DataError::io(input, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            entries.sort();
            out.extend(collect_files(&entries, strict, skipped)?);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            let reason = "does not exist or is not a regular file".to_string();
            if strict {
                return Err(DataError::BadInput {
                    path: input.clone(),
                    reason,
                });
            }
            skipped.push(Skipped {
                path: input.display().to_string(),
                reason,
            });
        }
    }
    Ok(out)
}

fn file_name_lower(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

/// Reads a file's bytes, decompressing `.gz`.
fn read_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    if file_name_lower(path).ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)).read_to_end(&mut bytes)?;
    } else {
        std::io::BufReader::new(file).read_to_end(&mut bytes)?;
    }
    Ok(bytes)
}

/// Reads a whole text file (decompressing `.gz`) as UTF-8.
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let bytes = read_bytes(path).map_err(|e| DataError::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| DataError::BadInput {
        path: path.to_path_buf(),
        reason: format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
    })
}

/// Reads one input into texts (one per file, or one per JSONL record).
fn read_texts(
    path: &Path,
    cfg: &PrepareConfig,
    skipped: &mut Vec<Skipped>,
) -> Result<Option<Vec<String>>> {
    let mut skip = |what: String, reason: String| -> Result<()> {
        if cfg.strict {
            return Err(DataError::BadInput {
                path: PathBuf::from(what),
                reason,
            });
        }
        skipped.push(Skipped { path: what, reason });
        Ok(())
    };
    let shown = path.display().to_string();
    let bytes = match read_bytes(path) {
        Ok(b) => b,
        Err(e) => {
            skip(shown, format!("unreadable: {e}"))?;
            return Ok(None);
        }
    };
    if bytes.is_empty() {
        skip(shown, "empty file".into())?;
        return Ok(None);
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            skip(
                shown,
                format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
            )?;
            return Ok(None);
        }
    };
    let name = file_name_lower(path);
    if !(name.ends_with(".jsonl") || name.ends_with(".jsonl.gz")) {
        return Ok(Some(vec![text]));
    }
    let mut texts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{}:{}", shown, i + 1);
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => match v.get(&cfg.jsonl_field).and_then(|f| f.as_str()) {
                Some(s) => texts.push(s.to_string()),
                None => skip(where_, format!("no string field \"{}\"", cfg.jsonl_field))?,
            },
            Err(e) => skip(where_, format!("bad JSON: {e}"))?,
        }
    }
    Ok(Some(texts))
}

/// True if cutting `text` at byte `i` (between `text[i-1] == '\n'` and `text[i]`) cannot change GPT-2's
/// pre-tokenization: the newline sits between two printable ASCII characters.
fn safe_cut(bytes: &[u8], i: usize) -> bool {
    i >= 2
        && i < bytes.len()
        && bytes[i - 1] == b'\n'
        && bytes[i - 2].is_ascii_graphic()
        && bytes[i].is_ascii_graphic()
}

/// Cuts `text` into pieces of about `chunk` bytes at safe points (see `safe_cut`).
pub fn split_for_encoding(text: &str, chunk: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let chunk = chunk.max(64);
    let mut pieces = Vec::new();
    let mut start = 0;
    while bytes.len() - start > chunk {
        let target = start + chunk;
        let back = (start + chunk / 2..=target)
            .rev()
            .find(|&i| safe_cut(bytes, i));
        let cut = back.or_else(|| (target..bytes.len()).find(|&i| safe_cut(bytes, i)));
        match cut {
            // Cuts sit right after an ASCII '\n', so they are char boundaries.
            Some(c) => {
                pieces.push(&text[start..c]);
                start = c;
            }
            None => break,
        }
    }
    pieces.push(&text[start..]);
    pieces
}

/// Runs `prepare`: reads, splits, encodes and writes shards; returns the summary.
pub fn prepare(cfg: &PrepareConfig, tokenizer: &Tokenizer) -> Result<PrepareSummary> {
    let t0 = Instant::now();
    if !(0.0..1.0).contains(&cfg.val_fraction) {
        return Err(DataError::Config(format!(
            "val_fraction must be in [0, 1), got {}",
            cfg.val_fraction
        )));
    }
    if cfg.shard_tokens == 0 || cfg.shard_tokens > i32::MAX as usize {
        return Err(DataError::Config(format!(
            "shard_tokens must be in [1, 2^31 - 1], got {}",
            cfg.shard_tokens
        )));
    }
    let Some(eot) = tokenizer.eot_id() else {
        return Err(DataError::Tokenizer(format!(
            "{} has no {EOT_TEXT} token to separate documents",
            tokenizer.source().display()
        )));
    };
    let vocab_size = tokenizer.vocab_size();
    let width = TokenWidth::for_vocab(vocab_size as u64);
    prepare_out_dir(&cfg.out_dir, cfg.overwrite)?;

    // 1-2. Read inputs and split into documents.
    let mut skipped = Vec::new();
    let files = collect_files(&cfg.inputs, cfg.strict, &mut skipped)?;
    let mut files_read = 0;
    let mut documents: Vec<String> = Vec::new();
    let mut empty_documents = 0;
    for path in &files {
        if let Some(texts) = read_texts(path, cfg, &mut skipped)? {
            files_read += 1;
            for text in texts {
                for doc in text.split(EOT_TEXT) {
                    if doc.is_empty() {
                        empty_documents += 1;
                    } else {
                        documents.push(doc.to_string());
                    }
                }
            }
        }
    }
    if documents.is_empty() {
        let why: Vec<String> = skipped
            .iter()
            .take(5)
            .map(|s| format!("{}: {}", s.path, s.reason))
            .collect();
        return Err(DataError::NoInput(format!(
            "no non-empty document in {} input file(s) ({} skipped{}{})",
            files.len(),
            skipped.len(),
            if why.is_empty() { "" } else { ": " },
            why.join("; ")
        )));
    }
    // One document (text without `<|endoftext|>`) and a validation fraction: split it by size, at a line break
    // (else whitespace) near the cut, so a validation split exists.
    let mut warnings = Vec::new();
    let mut split_by_bytes = false;
    if cfg.val_fraction > 0.0 && documents.len() == 1 {
        if let Some((a, b)) = split_by_size(&documents[0], cfg.val_fraction) {
            warnings.push(format!(
                "the input is one document (no {EOT_TEXT}); --val-fraction {} split it by size: the last {} of \
                 {} bytes are the validation split",
                cfg.val_fraction,
                b.len(),
                documents[0].len()
            ));
            documents = vec![a, b];
            split_by_bytes = true;
        } else {
            warnings.push(format!(
                "the input is one document too short to split; no validation split was written despite \
                 --val-fraction {}",
                cfg.val_fraction
            ));
        }
    }

    // 3. Train/val split by document.
    let n = documents.len();
    let n_val = if cfg.val_fraction > 0.0 && n >= 2 {
        ((cfg.val_fraction * n as f64).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    let mut order: Vec<usize> = (0..n).collect();
    if split_by_bytes {
        order.reverse(); // the tail of the text is the validation document
    } else {
        SplitMix64::with_stream(cfg.seed, 0x5EED_5B17).shuffle(&mut order);
    }
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }

    // 4. Encode pieces in parallel.
    let pieces: Vec<(usize, &str)> = documents
        .iter()
        .enumerate()
        .flat_map(|(d, text)| {
            split_for_encoding(text, cfg.chunk_bytes)
                .into_iter()
                .map(move |p| (d, p))
        })
        .collect();
    let text_bytes: u64 = documents.iter().map(|d| d.len() as u64).sum();
    let bar = if cfg.progress {
        let bar = ProgressBar::new(text_bytes);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} encoding [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let t_enc = Instant::now();
    let encoded: Vec<Result<Vec<u32>>> = pieces
        .par_iter()
        .map(|(_, p)| {
            let ids = tokenizer.encode(p);
            bar.inc(p.len() as u64);
            ids
        })
        .collect();
    bar.finish_and_clear();
    let encode_seconds = t_enc.elapsed().as_secs_f64();

    // 5. Join documents with EOT separators and write shards.
    let mut train = SplitWriter::new(&cfg.out_dir, "train", width, cfg.shard_tokens, eot);
    let mut val = SplitWriter::new(&cfg.out_dir, "val", width, cfg.shard_tokens, eot);
    let mut previous_doc = usize::MAX;
    for ((doc, _), ids) in pieces.iter().zip(encoded) {
        let ids = ids?;
        let split = if is_val[*doc] { &mut val } else { &mut train };
        if *doc != previous_doc {
            split.start_document()?;
            previous_doc = *doc;
        }
        split.push(&ids)?;
    }
    let (train_shards, train_tokens) = train.finish()?;
    let (val_shards, val_tokens) = val.finish()?;
    Ok(PrepareSummary {
        files_read,
        skipped,
        empty_documents,
        train_documents: n - n_val,
        val_documents: n_val,
        train_tokens,
        val_tokens,
        train_shards,
        val_shards,
        text_bytes,
        encode_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
        vocab_size,
        warnings,
    })
}

/// Splits `text` into a head and a tail of about `fraction` of its bytes, at a line break (else whitespace, else
/// any character boundary) at or after the cut; `None` when either part would be empty.
fn split_by_size(text: &str, fraction: f64) -> Option<(String, String)> {
    let target = ((1.0 - fraction) * text.len() as f64).round() as usize;
    let target = target.clamp(1, text.len().saturating_sub(1));
    let rest = text
        .get(target..)
        .map(|_| target)
        .or_else(|| (target..text.len()).find(|&i| text.is_char_boundary(i)))?;
    let cut = text[rest..]
        .find('\n')
        .or_else(|| text[rest..].find(char::is_whitespace))
        .map(|i| rest + i)
        .filter(|&c| c < text.len() && c > 0)
        .unwrap_or(rest);
    let (a, b) = text.split_at(cut);
    (!a.is_empty() && !b.trim().is_empty()).then(|| (a.to_string(), b.to_string()))
}

/// Creates the output directory; refuses (or with `overwrite`, deletes) existing shards in it.
fn prepare_out_dir(dir: &Path, overwrite: bool) -> Result<()> {
    claim_out_dir(dir, overwrite).map(|_| ())
}

/// Whether `path` is a file a data command writes: `train_*.bin` / `val_*.bin` shards, their `.kinds` side
/// files, or `prepare.json`.
fn is_data_file(path: &Path) -> bool {
    let n = file_name_lower(path);
    n == "prepare.json"
        || ((n.starts_with("train_") || n.starts_with("val_"))
            && (n.ends_with(".bin") || n.ends_with(".kinds")))
}

/// Creates the output directory of `prepare` or `synthetic`. When it already holds shards, `.kinds` side files
/// or `prepare.json`, refuses (naming one) unless `overwrite`, which deletes them first so that two datasets are
/// never mixed. Returns the files deleted.
pub fn claim_out_dir(dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut existing: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_data_file(p))
        .collect();
    existing.sort();
    if existing.is_empty() {
        return Ok(existing);
    }
    if !overwrite {
        return Err(DataError::Config(format!(
            "{} already holds {} data file(s) (e.g. {}). HINT: choose another --out or pass --overwrite",
            dir.display(),
            existing.len(),
            existing[0].display()
        )));
    }
    for p in &existing {
        std::fs::remove_file(p).map_err(|e| DataError::io(p, e))?;
    }
    Ok(existing)
}

/// Writes one split's token stream into shards of at most `shard_tokens`.
struct SplitWriter {
    dir: PathBuf,
    prefix: &'static str,
    width: TokenWidth,
    shard_tokens: usize,
    eot: u32,
    current: Option<ShardWriter>,
    paths: Vec<PathBuf>,
    total: u64,
    documents: usize,
}

impl SplitWriter {
    fn new(
        dir: &Path,
        prefix: &'static str,
        width: TokenWidth,
        shard_tokens: usize,
        eot: u32,
    ) -> Self {
        SplitWriter {
            dir: dir.to_path_buf(),
            prefix,
            width,
            shard_tokens,
            eot,
            current: None,
            paths: Vec::new(),
            total: 0,
            documents: 0,
        }
    }

    /// Starts a document: an EOT separates it from the previous one.
    fn start_document(&mut self) -> Result<()> {
        if self.documents > 0 {
            self.push(&[self.eot])?;
        }
        self.documents += 1;
        Ok(())
    }

    fn push(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let writer = match self.current.as_mut() {
                Some(w) => w,
                None => {
                    let path =
                        self.dir
                            .join(format!("{}_{:06}.bin", self.prefix, self.paths.len()));
                    self.paths.push(path.clone());
                    self.current.insert(ShardWriter::create(path, self.width)?)
                }
            };
            let room = self.shard_tokens - writer.len() as usize;
            let take = room.min(ids.len());
            writer.write(&ids[..take])?;
            self.total += take as u64;
            ids = &ids[take..];
            if writer.len() as usize == self.shard_tokens {
                if let Some(w) = self.current.take() {
                    w.finish()?;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<PathBuf>, u64)> {
        if let Some(w) = self.current.take() {
            w.finish()?;
        }
        Ok((self.paths, self.total))
    }
}
