//! `eslm-data`: the token data of eslm.
//!
//! - [`shard`]: llm.c token shards (256 × i32 header + u16/u32 tokens), memory-mapped reading, atomic writing.
//! - [`loader`]: `(inputs, targets)` batches of `B × T` from windows of `T + 1` tokens, seeded per-epoch
//!   shuffling, rank partitioning, exact resume; and a validation loader.
//! - [`synthetic`]: a built-in artificial language with template / learnable / noise tokens of known difficulty.
//! - [`tokenizer`]: the GPT-2 byte-level BPE tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`).
//! - [`prepare`]: text / gzip / JSONL → train and validation shards (the `eslm-data prepare` command).
//! - [`rng`]: the small serialisable RNG behind shuffles and generation.
#![warn(missing_docs)]

pub mod error;
pub mod loader;
pub mod prepare;
pub mod rng;
pub mod shard;
pub mod synthetic;
pub mod tokenizer;

pub use error::{DataError, Result};
pub use loader::{Batch, DataLoader, LoaderConfig, LoaderState, ValLoader, WindowRef};
pub use shard::{parse_header, write_shard, ShardHeader, ShardReader, ShardWriter, TokenWidth};
pub use synthetic::{
    write_synthetic_corpus, KindTable, SyntheticConfig, SyntheticCorpus, SyntheticSummary,
    TokenKind,
};
pub use tokenizer::Tokenizer;
