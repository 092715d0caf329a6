//! A built-in synthetic corpus: a small artificial language whose tokens have known, mixed difficulty.
//!
//! Every document has the same layout of `D = num_templates · sentence_len + 1` slots: `num_templates`
//! sentences of `sentence_len` slots (sentence `k` uses template `k`) followed by `<|endoftext|>`. Each slot has
//! a kind, fixed once per language (by `seed`):
//! - **Template**: a fixed token id (distinct for every template slot; the first slot of every sentence and the
//!   closing EOT are always template slots). Given the preceding tokens it is certain: Bayes loss 0.
//! - **Noise**: an id drawn uniformly from `noise_vocab` ids, independently of everything: Bayes loss
//!   `ln(noise_vocab)` whatever the model (unlearnable).
//! - **Learnable**: a deterministic function of one or two earlier noise values `a`, `b` (among the last
//!   `lookback` noise slots before it): copy `v = a`, lookup `v = π(a)` (a fixed random permutation), or
//!   addition `v = (a + b) mod noise_vocab`; emitted as id `learnable_base + v`. Given the context it is
//!   certain (Bayes loss 0), but only a model that learned the rule predicts it: the informative tokens.
//!
//! The kind counts per document are exact: `noise = round(p_noise · D)`, `learnable = round(p_learnable · D)`,
//! `template = D − noise − learnable`, placed at random (seeded) over the free slots, with the first non-template
//! slot forced to be noise so every learnable slot has a source. The Bayes-optimal mean loss over all tokens is
//! `noise / D · ln(noise_vocab)`. These values assume the sources and the sentence start are inside the context;
//! near the start of a training window some tokens lack that context and are harder.
//!
//! Ids: template slots `0 .. n_template_ids`, learnable `learnable_base .. + noise_vocab`, noise
//! `noise_base .. + noise_vocab`, EOT = `vocab_size − 1`; the other ids never occur. Train documents use RNG
//! stream 1 of `seed`, validation documents stream 2; the language itself uses stream 0.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::loader::Batch;
use crate::rng::SplitMix64;
use crate::shard::{write_shard, ShardReader, TokenWidth};

/// The difficulty class of a token of the synthetic language.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[repr(u8)]
pub enum TokenKind {
    /// Fixed by the template: predictable from the position alone (Bayes loss 0).
    Template = 0,
    /// A deterministic rule of earlier noise tokens (Bayes loss 0 given the context).
    Learnable = 1,
    /// Uniformly random (Bayes loss ln(noise_vocab)).
    Noise = 2,
}

impl TokenKind {
    /// All kinds, in id order.
    pub const ALL: [TokenKind; 3] = [TokenKind::Template, TokenKind::Learnable, TokenKind::Noise];

    /// The kind with byte value `v` (0, 1, 2), if any.
    pub fn from_u8(v: u8) -> Option<TokenKind> {
        match v {
            0 => Some(TokenKind::Template),
            1 => Some(TokenKind::Learnable),
            2 => Some(TokenKind::Noise),
            _ => None,
        }
    }

    /// Lower-case name ("template", "learnable", "noise").
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Template => "template",
            TokenKind::Learnable => "learnable",
            TokenKind::Noise => "noise",
        }
    }
}

/// Settings of the synthetic language and corpus. `Default` gives the trainer's built-in corpus.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticConfig {
    /// Seed of the language (layout, template ids, rules) and of the documents.
    pub seed: u64,
    /// Vocabulary size of the model (ids used are fewer; EOT = `vocab_size − 1`).
    pub vocab_size: u32,
    /// Sentences (templates) per document.
    pub num_templates: usize,
    /// Slots per sentence.
    pub sentence_len: usize,
    /// Number of distinct noise values (and of learnable values).
    pub noise_vocab: u32,
    /// A learnable slot draws its sources among the last `lookback` noise slots before it.
    pub lookback: usize,
    /// Fraction of template tokens (EOT and sentence starts included).
    pub template_fraction: f64,
    /// Fraction of learnable tokens.
    pub learnable_fraction: f64,
    /// Fraction of noise tokens.
    pub noise_fraction: f64,
    /// Training documents.
    pub train_documents: usize,
    /// Validation documents.
    pub val_documents: usize,
    /// Maximum tokens per written shard.
    pub shard_tokens: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 1234,
            vocab_size: 512,
            num_templates: 8,
            sentence_len: 16,
            noise_vocab: 64,
            lookback: 8,
            template_fraction: 0.40,
            learnable_fraction: 0.35,
            noise_fraction: 0.25,
            train_documents: 16_384,
            val_documents: 512,
            shard_tokens: 1 << 20,
        }
    }
}

impl SyntheticConfig {
    /// Slots per document, EOT included.
    pub fn document_len(&self) -> usize {
        self.num_templates * self.sentence_len + 1
    }

    /// Exact count of each kind per document, indexed by `TokenKind as usize`.
    pub fn kind_counts_per_document(&self) -> [usize; 3] {
        let d = self.document_len();
        let noise = (self.noise_fraction * d as f64).round() as usize;
        let learnable = (self.learnable_fraction * d as f64).round() as usize;
        [d.saturating_sub(noise + learnable), learnable, noise]
    }

    /// The Bayes-optimal expected loss (nats) of a token of `kind`, given enough context.
    pub fn bayes_loss(&self, kind: TokenKind) -> f64 {
        match kind {
            TokenKind::Template | TokenKind::Learnable => 0.0,
            TokenKind::Noise => (self.noise_vocab as f64).ln(),
        }
    }

    /// The Bayes-optimal mean loss (nats) over all tokens: `noise / D · ln(noise_vocab)`.
    pub fn optimal_mean_loss(&self) -> f64 {
        let counts = self.kind_counts_per_document();
        counts[TokenKind::Noise as usize] as f64 / self.document_len() as f64
            * self.bayes_loss(TokenKind::Noise)
    }

    /// Checks that the configuration describes a language that can be built.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::Config(m));
        let fr = [
            self.template_fraction,
            self.learnable_fraction,
            self.noise_fraction,
        ];
        if fr.iter().any(|f| !f.is_finite() || *f < 0.0) {
            return bad(format!(
                "kind fractions must be finite and >= 0, got {fr:?}"
            ));
        }
        if (fr.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            return bad(format!("kind fractions must sum to 1, got {fr:?}"));
        }
        if self.num_templates == 0 || self.sentence_len == 0 {
            return bad("num_templates and sentence_len must be at least 1".into());
        }
        if self.noise_vocab < 2 {
            return bad(format!(
                "noise_vocab must be at least 2, got {}",
                self.noise_vocab
            ));
        }
        if self.lookback == 0 {
            return bad("lookback must be at least 1".into());
        }
        if self.shard_tokens < 2 {
            return bad("shard_tokens must be at least 2".into());
        }
        let counts = self.kind_counts_per_document();
        let d = self.document_len();
        if counts[1] + counts[2] > d {
            return bad("learnable + noise fractions exceed the document".into());
        }
        let fixed = self.num_templates + 1;
        if counts[0] < fixed {
            return bad(format!(
                "template fraction too small: {} template slots per document, but the {} sentence starts and the EOT need {}",
                counts[0], self.num_templates, fixed
            ));
        }
        if counts[1] > 0 && counts[2] == 0 {
            return bad(
                "learnable tokens need at least one noise token per document to depend on".into(),
            );
        }
        let used = counts[0] as u64 - 1 + 2 * self.noise_vocab as u64 + 1;
        if used > self.vocab_size as u64 {
            return bad(format!(
                "vocab_size {} too small: the language uses {} ids ({} template + 2 x {} learnable/noise + EOT)",
                self.vocab_size,
                used,
                counts[0] - 1,
                self.noise_vocab
            ));
        }
        Ok(())
    }
}

/// How a learnable slot computes its value from earlier noise values `a` (and `b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Rule {
    /// `v = a`, the value of noise slot `src`.
    Copy {
        /// Source slot.
        src: usize,
    },
    /// `v = π(a)` with the language's fixed permutation π.
    Lookup {
        /// Source slot.
        src: usize,
    },
    /// `v = (a + b) mod noise_vocab`.
    Add {
        /// First source slot.
        a: usize,
        /// Second source slot.
        b: usize,
    },
}

/// What a slot of the document layout emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Slot {
    /// A fixed id.
    Template(u32),
    /// A rule of earlier noise slots.
    Learnable(Rule),
    /// A uniform noise value.
    Noise,
}

impl Slot {
    /// The slot's kind.
    pub fn kind(&self) -> TokenKind {
        match self {
            Slot::Template(_) => TokenKind::Template,
            Slot::Learnable(_) => TokenKind::Learnable,
            Slot::Noise => TokenKind::Noise,
        }
    }
}

/// The language: one document layout, the lookup permutation and the id ranges.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Language {
    /// The configuration it was built from.
    pub config: SyntheticConfig,
    /// The document layout, `[D]`.
    pub slots: Vec<Slot>,
    /// The lookup rule's permutation of `0 .. noise_vocab`.
    pub permutation: Vec<u32>,
    /// First learnable id.
    pub learnable_base: u32,
    /// First noise id.
    pub noise_base: u32,
    /// The end-of-text id (`vocab_size − 1`).
    pub eot: u32,
}

impl Language {
    /// Builds the language of `config` (deterministic in `config.seed`).
    pub fn new(config: &SyntheticConfig) -> Result<Language> {
        config.validate()?;
        let mut rng = SplitMix64::with_stream(config.seed, 0);
        let d = config.document_len();
        let s = config.sentence_len;
        let [n_template, n_learn, n_noise] = config.kind_counts_per_document();
        // Free slots: everything except sentence starts and the final EOT.
        let free: Vec<usize> = (0..d - 1).filter(|i| i % s != 0).collect();
        let mut kinds = Vec::with_capacity(free.len());
        kinds.extend(std::iter::repeat_n(
            TokenKind::Template,
            n_template - config.num_templates - 1,
        ));
        kinds.extend(std::iter::repeat_n(TokenKind::Learnable, n_learn));
        kinds.extend(std::iter::repeat_n(TokenKind::Noise, n_noise));
        rng.shuffle(&mut kinds);
        // The first non-template free slot must be noise, so every learnable slot has an earlier source.
        let first_learn = kinds.iter().position(|&k| k == TokenKind::Learnable);
        let first_noise = kinds.iter().position(|&k| k == TokenKind::Noise);
        if let (Some(l), Some(n)) = (first_learn, first_noise) {
            if l < n {
                kinds.swap(l, n);
            }
        }
        let mut layout = vec![TokenKind::Template; d];
        for (&slot, &kind) in free.iter().zip(&kinds) {
            layout[slot] = kind;
        }
        let learnable_base = (n_template - 1) as u32;
        let noise_base = learnable_base + config.noise_vocab;
        let eot = config.vocab_size - 1;
        let mut slots = Vec::with_capacity(d);
        let mut next_template_id = 0u32;
        let mut noise_seen: Vec<usize> = Vec::new();
        for (i, kind) in layout.iter().enumerate() {
            let slot = match kind {
                TokenKind::Template if i == d - 1 => Slot::Template(eot),
                TokenKind::Template => {
                    next_template_id += 1;
                    Slot::Template(next_template_id - 1)
                }
                TokenKind::Noise => {
                    noise_seen.push(i);
                    Slot::Noise
                }
                TokenKind::Learnable => {
                    let window = &noise_seen[noise_seen.len().saturating_sub(config.lookback)..];
                    let pick =
                        |rng: &mut SplitMix64| window[rng.below(window.len() as u64) as usize];
                    let rule = match rng.below(3) {
                        0 => Rule::Copy {
                            src: pick(&mut rng),
                        },
                        1 => Rule::Lookup {
                            src: pick(&mut rng),
                        },
                        _ => Rule::Add {
                            a: pick(&mut rng),
                            b: pick(&mut rng),
                        },
                    };
                    Slot::Learnable(rule)
                }
            };
            slots.push(slot);
        }
        let mut permutation: Vec<u32> = (0..config.noise_vocab).collect();
        rng.shuffle(&mut permutation);
        Ok(Language {
            config: config.clone(),
            slots,
            permutation,
            learnable_base,
            noise_base,
            eot,
        })
    }

    /// The kind of every slot of a document, `[D]`.
    pub fn layout_kinds(&self) -> Vec<TokenKind> {
        self.slots.iter().map(Slot::kind).collect()
    }

    /// Appends one document drawn with `rng` to `tokens` and its kinds to `kinds`.
    pub fn generate_document(
        &self,
        rng: &mut SplitMix64,
        tokens: &mut Vec<u32>,
        kinds: &mut Vec<TokenKind>,
    ) {
        let v = self.config.noise_vocab;
        let mut values = vec![0u32; self.slots.len()];
        for (i, slot) in self.slots.iter().enumerate() {
            let token = match *slot {
                Slot::Template(id) => id,
                Slot::Noise => {
                    values[i] = rng.below(v as u64) as u32;
                    self.noise_base + values[i]
                }
                Slot::Learnable(rule) => {
                    let value = match rule {
                        Rule::Copy { src } => values[src],
                        Rule::Lookup { src } => self.permutation[values[src] as usize],
                        Rule::Add { a, b } => (values[a] + values[b]) % v,
                    };
                    self.learnable_base + value
                }
            };
            tokens.push(token);
            kinds.push(slot.kind());
        }
    }

    /// `documents` documents from RNG stream `stream` of the seed, with their kinds.
    pub fn generate(&self, documents: usize, stream: u64) -> (Vec<u32>, Vec<TokenKind>) {
        let mut rng = SplitMix64::with_stream(self.config.seed, stream);
        let n = documents * self.slots.len();
        let (mut tokens, mut kinds) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..documents {
            self.generate_document(&mut rng, &mut tokens, &mut kinds);
        }
        (tokens, kinds)
    }
}

/// A generated corpus held in memory: train and validation tokens with their kinds.
#[derive(Debug, Clone)]
pub struct SyntheticCorpus {
    /// The language.
    pub language: Language,
    /// Training tokens, `[train_documents · D]`.
    pub train: Vec<u32>,
    /// Kind of each training token.
    pub train_kinds: Vec<TokenKind>,
    /// Validation tokens, `[val_documents · D]`.
    pub val: Vec<u32>,
    /// Kind of each validation token.
    pub val_kinds: Vec<TokenKind>,
}

impl SyntheticCorpus {
    /// Generates the corpus of `config` in memory.
    ///
    /// ```
    /// use eslm_data::synthetic::{SyntheticConfig, SyntheticCorpus, TokenKind};
    /// let config = SyntheticConfig { train_documents: 10, val_documents: 2, ..Default::default() };
    /// let corpus = SyntheticCorpus::generate(&config)?;
    /// assert_eq!(corpus.train.len(), 10 * config.document_len());
    /// assert_eq!(corpus.train_kinds.len(), corpus.train.len());
    /// assert_eq!(*corpus.train.last().unwrap(), config.vocab_size - 1); // documents end with EOT
    /// # Ok::<(), eslm_data::DataError>(())
    /// ```
    pub fn generate(config: &SyntheticConfig) -> Result<SyntheticCorpus> {
        let language = Language::new(config)?;
        let (train, train_kinds) = language.generate(config.train_documents, 1);
        let (val, val_kinds) = language.generate(config.val_documents, 2);
        Ok(SyntheticCorpus {
            language,
            train,
            train_kinds,
            val,
            val_kinds,
        })
    }

    /// The training tokens as one in-memory shard (for [`crate::loader::DataLoader::new`]).
    pub fn train_shard(&self) -> ShardReader {
        ShardReader::from_tokens("<synthetic train>", self.train.clone())
    }

    /// The validation tokens as one in-memory shard (for [`crate::loader::ValLoader::new`]).
    pub fn val_shard(&self) -> ShardReader {
        ShardReader::from_tokens("<synthetic val>", self.val.clone())
    }

    /// Kind table for the training shard (index 0), matching [`SyntheticCorpus::train_shard`].
    pub fn train_kind_table(&self) -> KindTable {
        KindTable::from_kinds(vec![self.train_kinds.clone()])
    }

    /// Kind table for the validation shard (index 0), matching [`SyntheticCorpus::val_shard`].
    pub fn val_kind_table(&self) -> KindTable {
        KindTable::from_kinds(vec![self.val_kinds.clone()])
    }
}

/// Kinds of the tokens of a list of shards (same order as the loader's), to label batch targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindTable {
    shards: Vec<Vec<TokenKind>>,
}

/// The kinds side file of a shard: `train_000000.bin` → `train_000000.kinds`.
pub fn kinds_path(shard_path: &Path) -> PathBuf {
    shard_path.with_extension("kinds")
}

impl KindTable {
    /// A table from per-shard kind vectors.
    pub fn from_kinds(shards: Vec<Vec<TokenKind>>) -> KindTable {
        KindTable { shards }
    }

    /// Loads the `.kinds` side file of every shard (see [`kinds_path`]).
    pub fn for_shards(shards: &[ShardReader]) -> Result<KindTable> {
        let tables = shards
            .iter()
            .map(|s| {
                let kinds = read_kinds(kinds_path(s.path()))?;
                if kinds.len() != s.len() {
                    return Err(DataError::bad_shard(
                        kinds_path(s.path()),
                        format!("{} kinds for a shard of {} tokens", kinds.len(), s.len()),
                    ));
                }
                Ok(kinds)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KindTable { shards: tables })
    }

    /// Kinds of shard `i`.
    pub fn shard(&self, i: usize) -> Option<&[TokenKind]> {
        self.shards.get(i).map(Vec::as_slice)
    }

    /// The kind of every target of `batch`, `[b, t]` row-major (target `j` of a row is token `start + 1 + j`).
    pub fn targets_of(&self, batch: &Batch) -> Result<Vec<TokenKind>> {
        let mut out = Vec::with_capacity(batch.b * batch.t);
        for w in &batch.rows {
            let start = w.start as usize + 1;
            let kinds = self
                .shards
                .get(w.shard)
                .and_then(|k| k.get(start..start + batch.t))
                .ok_or_else(|| {
                    DataError::Config(format!(
                        "kind table has no kinds for shard {} tokens {}..{}",
                        w.shard,
                        start,
                        start + batch.t
                    ))
                })?;
            out.extend_from_slice(kinds);
        }
        Ok(out)
    }
}

/// Writes kinds as a u16 shard (values 0, 1, 2) at `path`, atomically.
pub fn write_kinds(path: impl AsRef<Path>, kinds: &[TokenKind]) -> Result<()> {
    let values: Vec<u32> = kinds.iter().map(|&k| k as u32).collect();
    write_shard(path, &values, TokenWidth::U16).map(|_| ())
}

/// Reads a kinds side file written by [`write_kinds`].
pub fn read_kinds(path: impl AsRef<Path>) -> Result<Vec<TokenKind>> {
    let shard = ShardReader::open(path.as_ref())?;
    let tokens = shard.tokens();
    (0..tokens.len())
        .map(|i| {
            let v = tokens.get(i).unwrap_or(u32::MAX);
            u8::try_from(v)
                .ok()
                .and_then(TokenKind::from_u8)
                .ok_or_else(|| {
                    DataError::bad_shard(
                        path.as_ref(),
                        format!("value {v} at position {i} is not a token kind (0, 1, 2)"),
                    )
                })
        })
        .collect()
}

/// What [`write_synthetic_corpus`] wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticSummary {
    /// Output directory.
    pub dir: PathBuf,
    /// Training shard files (`train_000000.bin`, …), each with a `.kinds` side file.
    pub train_shards: Vec<PathBuf>,
    /// Validation shard files (`val_000000.bin`, …), each with a `.kinds` side file.
    pub val_shards: Vec<PathBuf>,
    /// Training tokens.
    pub train_tokens: u64,
    /// Validation tokens.
    pub val_tokens: u64,
    /// Training tokens of each kind, indexed by `TokenKind as usize`.
    pub train_kind_counts: [u64; 3],
    /// Bayes-optimal loss of each kind (nats), indexed by `TokenKind as usize`.
    pub bayes_loss: [f64; 3],
    /// Bayes-optimal mean loss over all tokens (nats).
    pub optimal_mean_loss: f64,
    /// The model's vocabulary size.
    pub vocab_size: u32,
}

fn write_split(
    dir: &Path,
    prefix: &str,
    tokens: &[u32],
    kinds: &[TokenKind],
    shard_tokens: usize,
    width: TokenWidth,
) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for (i, (chunk, kind_chunk)) in tokens
        .chunks(shard_tokens)
        .zip(kinds.chunks(shard_tokens))
        .enumerate()
    {
        let path = dir.join(format!("{prefix}_{i:06}.bin"));
        write_shard(&path, chunk, width)?;
        write_kinds(kinds_path(&path), kind_chunk)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Generates the corpus of `config` and writes it to `dir` (created if needed): `train_NNNNNN.bin` and
/// `val_NNNNNN.bin` shards, a `.kinds` side file next to each, and `synthetic.json` (config and summary).
pub fn write_synthetic_corpus(
    dir: impl AsRef<Path>,
    config: &SyntheticConfig,
) -> Result<SyntheticSummary> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let corpus = SyntheticCorpus::generate(config)?;
    let width = TokenWidth::for_vocab(config.vocab_size as u64);
    let train_shards = write_split(
        dir,
        "train",
        &corpus.train,
        &corpus.train_kinds,
        config.shard_tokens,
        width,
    )?;
    let val_shards = write_split(
        dir,
        "val",
        &corpus.val,
        &corpus.val_kinds,
        config.shard_tokens,
        width,
    )?;
    let mut counts = [0u64; 3];
    for &k in &corpus.train_kinds {
        counts[k as usize] += 1;
    }
    let summary = SyntheticSummary {
        dir: dir.to_path_buf(),
        train_shards,
        val_shards,
        train_tokens: corpus.train.len() as u64,
        val_tokens: corpus.val.len() as u64,
        train_kind_counts: counts,
        bayes_loss: TokenKind::ALL.map(|k| config.bayes_loss(k)),
        optimal_mean_loss: config.optimal_mean_loss(),
        vocab_size: config.vocab_size,
    };
    let meta = serde_json::json!({ "config": config, "summary": summary });
    let meta_path = dir.join("synthetic.json");
    let text = serde_json::to_string_pretty(&meta).map_err(|e| DataError::Config(e.to_string()))?;
    std::fs::write(&meta_path, text).map_err(|e| DataError::io(&meta_path, e))?;
    Ok(summary)
}
