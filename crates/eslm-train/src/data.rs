//! Training and validation data of a run: llm.c token shards (a file, a directory or a glob) or the built-in
//! synthetic corpus (`eslm_data::synthetic`), generated in memory from the run's seed. When the synthetic corpus
//! is used (or shards come with `.kinds` side files), every target carries its kind (template / learnable /
//! noise), so the trainer reports which kinds each policy keeps.

use eslm_data::synthetic::{KindTable, SyntheticConfig, SyntheticCorpus, TokenKind};
use eslm_data::{Batch, DataLoader, LoaderConfig, ShardReader, ValLoader};

use crate::config::RunConfig;
use crate::error::{Result, TrainError};

/// The training stream of a run.
#[derive(Debug)]
pub struct TrainData {
    /// The shuffled, resumable loader.
    pub loader: DataLoader,
    /// Kinds of the targets (synthetic data only).
    pub kinds: Option<KindTable>,
}

/// The validation set of a run.
#[derive(Debug)]
pub struct ValData {
    /// The deterministic loader over the whole set.
    pub loader: ValLoader,
    /// Kinds of the targets (synthetic data only).
    pub kinds: Option<KindTable>,
}

/// The data of a run and the vocabulary size it implies.
#[derive(Debug)]
pub struct RunData {
    /// Training data.
    pub train: TrainData,
    /// Validation data, if any.
    pub val: Option<ValData>,
    /// Vocabulary size of the data (synthetic: its own; shards: `--vocab-size` or GPT-2's 50257).
    pub vocab_size: usize,
    /// Whether this is the built-in synthetic corpus.
    pub synthetic: bool,
}

/// The synthetic corpus settings of a run (the data crate's defaults, sized and seeded by the run).
pub fn synthetic_config(cfg: &RunConfig) -> SyntheticConfig {
    SyntheticConfig {
        train_documents: cfg.synthetic_documents.max(1),
        val_documents: 256,
        ..SyntheticConfig::default()
    }
}

fn kinds_if_present(shards: &[ShardReader]) -> Option<KindTable> {
    KindTable::for_shards(shards).ok()
}

/// Opens the data of `cfg` for a single process.
pub fn open_run_data(cfg: &RunConfig) -> Result<RunData> {
    open_run_data_for_rank(cfg, 0, 1)
}

/// Opens the data of `cfg` for rank `rank` of `world_size` data-parallel ranks: the training loader reads this
/// rank's share of every epoch's window order (positions `rank, rank + R, …`; `--batch-size` rows per rank), the
/// validation loader the whole validation set (every rank evaluates the same batches).
pub fn open_run_data_for_rank(cfg: &RunConfig, rank: usize, world_size: usize) -> Result<RunData> {
    let loader_cfg = LoaderConfig::new(cfg.batch_size, cfg.seq_len)
        .with_seed(cfg.seed)
        .with_rank(rank, world_size);
    let val_cfg = LoaderConfig::new(cfg.batch_size, cfg.seq_len).with_shuffle(false);
    match &cfg.train {
        None => {
            if cfg.val.is_some() {
                return Err(TrainError::Config(
                    "--val needs --train (the synthetic corpus has its own split)".into(),
                ));
            }
            let syn = synthetic_config(cfg);
            let corpus = SyntheticCorpus::generate(&syn)?;
            let train = TrainData {
                loader: DataLoader::new(vec![corpus.train_shard()], loader_cfg)?,
                kinds: Some(corpus.train_kind_table()),
            };
            let val = ValData {
                loader: ValLoader::new(vec![corpus.val_shard()], val_cfg)?,
                kinds: Some(corpus.val_kind_table()),
            };
            let vocab_size = cfg.vocab_size.unwrap_or(syn.vocab_size as usize);
            Ok(RunData {
                train,
                val: Some(val),
                vocab_size,
                synthetic: true,
            })
        }
        Some(pattern) => {
            let loader = DataLoader::open(pattern, loader_cfg)?;
            let kinds = kinds_if_present(loader.shards());
            let train = TrainData { loader, kinds };
            let val = match &cfg.val {
                Some(p) => {
                    let loader = ValLoader::open(p, val_cfg)?;
                    let kinds = kinds_if_present(loader.shards());
                    Some(ValData { loader, kinds })
                }
                None => None,
            };
            let vocab_size = cfg.vocab_size.unwrap_or(eslm_data_default_vocab());
            Ok(RunData {
                train,
                val,
                vocab_size,
                synthetic: false,
            })
        }
    }
}

/// The vocabulary assumed for shards when `--vocab-size` is not given: GPT-2's.
pub fn eslm_data_default_vocab() -> usize {
    50257
}

/// Checks every token of every shard against the model's vocabulary (before training starts).
pub fn check_vocab(data: &RunData, vocab: usize) -> Result<()> {
    let mut shards: Vec<&ShardReader> = data.train.loader.shards().iter().collect();
    if let Some(v) = &data.val {
        shards.extend(v.loader.shards());
    }
    for s in shards {
        s.check_vocab(vocab as u64)?;
    }
    Ok(())
}

/// The kinds of a batch's targets, when the data has kinds.
pub fn batch_kinds(kinds: Option<&KindTable>, batch: &Batch) -> Result<Option<Vec<TokenKind>>> {
    kinds
        .map(|k| k.targets_of(batch))
        .transpose()
        .map_err(TrainError::from)
}
