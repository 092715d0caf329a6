//! Batches of `(inputs, targets)` from token shards: windows of `T + 1` tokens, seeded shuffling per epoch,
//! rank partitioning for data parallelism, and an exactly resumable position.
//!
//! Windows: shard `s` with `n_s` tokens holds `w_s = ⌊(n_s − 1) / T⌋` windows; window `i` starts at token `i·T`
//! and spans `T + 1` tokens, so `inputs = x[iT .. iT+T]` and `targets = x[iT+1 .. iT+T+1]` (consecutive windows
//! share one boundary token; the trailing `(n_s − 1) mod T` tokens of a shard are never a target).
//! Windows of all shards are numbered globally `0 .. W` in shard order.
//!
//! Epoch `e`: the global order is the identity (no shuffle) or a Fisher–Yates permutation drawn from
//! `SplitMix64::with_stream(seed, e)`; rank `r` of `R` takes positions `r, r+R, r+2R, …` of that order, up to
//! `⌊W / R⌋` windows each, so ranks read disjoint windows and all ranks see the same count. Batches take the
//! next `B` windows of the rank's order; at the end of an epoch the stream wraps into epoch `e + 1` (a batch
//! may span two epochs; no window is dropped or repeated within an epoch).
//!
//! The position (`epoch`, `cursor` into the rank's order) is the loader's whole state: the permutation is a
//! pure function of `(seed, epoch)`, so [`LoaderState`] is small, serialisable, and restoring it reproduces the
//! exact next batch.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::rng::SplitMix64;
use crate::shard::ShardReader;

/// Loader settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderConfig {
    /// Rows per batch (B).
    pub batch_size: usize,
    /// Tokens per row (T); each row reads T + 1 tokens.
    pub seq_len: usize,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
    /// Shuffle the window order each epoch (training); `false` reads windows in file order.
    pub shuffle: bool,
    /// This process's rank in `0 .. world_size`.
    pub rank: usize,
    /// Number of data-parallel ranks.
    pub world_size: usize,
}

impl LoaderConfig {
    /// B × T batches, seed 0, shuffled, single rank.
    pub fn new(batch_size: usize, seq_len: usize) -> Self {
        LoaderConfig {
            batch_size,
            seq_len,
            seed: 0,
            shuffle: true,
            rank: 0,
            world_size: 1,
        }
    }

    /// Returns the configuration with another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Returns the configuration with another rank / world size.
    pub fn with_rank(mut self, rank: usize, world_size: usize) -> Self {
        self.rank = rank;
        self.world_size = world_size;
        self
    }

    /// Returns the configuration with shuffling switched on or off.
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(DataError::Config("batch_size must be at least 1".into()));
        }
        if self.seq_len == 0 {
            return Err(DataError::Config("seq_len must be at least 1".into()));
        }
        if self.world_size == 0 {
            return Err(DataError::Config("world_size must be at least 1".into()));
        }
        if self.rank >= self.world_size {
            return Err(DataError::Config(format!(
                "rank {} must be below world_size {}",
                self.rank, self.world_size
            )));
        }
        Ok(())
    }
}

/// Where a batch row came from: `inputs = shard[start .. start+T]`, `targets = shard[start+1 .. start+T+1]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct WindowRef {
    /// Index of the shard in the loader's shard list.
    pub shard: usize,
    /// Token offset of the window's first input token.
    pub start: u64,
}

/// One batch. `inputs` and `targets` are row-major `[b, t]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Input ids, `[b, t]` row-major.
    pub inputs: Vec<u32>,
    /// Target ids (inputs shifted by one), `[b, t]` row-major.
    pub targets: Vec<u32>,
    /// Rows in this batch (B, or fewer for the last validation batch).
    pub b: usize,
    /// Tokens per row (T).
    pub t: usize,
    /// Source window of each row, `[b]`.
    pub rows: Vec<WindowRef>,
}

impl Batch {
    fn clear(&mut self, t: usize) {
        self.inputs.clear();
        self.targets.clear();
        self.rows.clear();
        self.b = 0;
        self.t = t;
    }

    /// Appends the window `w` of `shard` as a row.
    fn push(&mut self, shards: &[ShardReader], w: WindowRef) -> Result<()> {
        let t = self.t;
        let Some(shard) = shards.get(w.shard) else {
            return Err(DataError::Config(format!(
                "window refers to missing shard {}",
                w.shard
            )));
        };
        let tokens = shard.tokens();
        let start = w.start as usize;
        let (ni, nt) = (self.inputs.len(), self.targets.len());
        self.inputs.resize(ni + t, 0);
        self.targets.resize(nt + t, 0);
        if !tokens.copy_to_u32(start, &mut self.inputs[ni..])
            || !tokens.copy_to_u32(start + 1, &mut self.targets[nt..])
        {
            self.inputs.truncate(ni);
            self.targets.truncate(nt);
            return Err(DataError::bad_shard(
                shard.path(),
                format!(
                    "window at {} runs past the end of {} tokens",
                    w.start,
                    shard.len()
                ),
            ));
        }
        self.rows.push(w);
        self.b += 1;
        Ok(())
    }
}

/// The serialisable position of a [`DataLoader`]. Restoring it continues with exactly the next batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    /// Seed of the per-epoch shuffles (the RNG of epoch `e` is `SplitMix64::with_stream(seed, e)`).
    pub seed: u64,
    /// Epoch of the next window (0-based).
    pub epoch: u64,
    /// Index of the next window in this rank's order for that epoch (always below the windows per epoch).
    pub cursor: u64,
    /// Shard of the next window (informational; derived from epoch and cursor).
    pub shard: usize,
    /// Token offset of the next window (informational).
    pub offset: u64,
    /// Sequence length the position was taken with.
    pub seq_len: usize,
    /// Whether the order is shuffled.
    pub shuffle: bool,
    /// Rank the position belongs to.
    pub rank: usize,
    /// World size the position belongs to.
    pub world_size: usize,
    /// Total windows over all shards (checks that the same data is loaded).
    pub total_windows: u64,
}

/// Windows of every shard, numbered globally.
#[derive(Debug)]
struct WindowIndex {
    /// `prefix[s]` = number of windows in shards `0 .. s`; `prefix.len() == shards + 1`.
    prefix: Vec<u64>,
    seq_len: usize,
}

impl WindowIndex {
    fn new(shards: &[ShardReader], seq_len: usize) -> Self {
        let mut prefix = Vec::with_capacity(shards.len() + 1);
        prefix.push(0u64);
        let mut total = 0u64;
        for s in shards {
            let n = s.len() as u64;
            total += if n == 0 { 0 } else { (n - 1) / seq_len as u64 };
            prefix.push(total);
        }
        WindowIndex { prefix, seq_len }
    }

    fn total(&self) -> u64 {
        self.prefix.last().copied().unwrap_or(0)
    }

    fn locate(&self, global: u64) -> WindowRef {
        // The last shard whose first window is <= global.
        let shard = self
            .prefix
            .partition_point(|&p| p <= global)
            .saturating_sub(1);
        WindowRef {
            shard,
            start: (global - self.prefix[shard]) * self.seq_len as u64,
        }
    }
}

/// Expands a path pattern: a directory (all `*.bin` files in it), a file, or a pattern with `*` / `?` in its
/// last component (e.g. `data/train_*.bin`). Results are sorted by name.
pub fn expand_pattern(pattern: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let pattern = pattern.as_ref();
    if pattern.is_dir() {
        return list_matching(pattern, "*.bin");
    }
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.contains('*') || name.contains('?') {
        let dir = match pattern.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        return list_matching(&dir, &name);
    }
    if pattern.is_file() {
        return Ok(vec![pattern.to_path_buf()]);
    }
    Err(DataError::NoInput(format!(
        "{} does not exist",
        pattern.display()
    )))
}

fn list_matching(dir: &Path, glob: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if wildcard_match(glob.as_bytes(), name.as_bytes()) && entry.path().is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(DataError::NoInput(format!(
            "no file matches {} in {}",
            glob,
            dir.display()
        )));
    }
    Ok(out)
}

/// Shell-style match of `*` (any run) and `?` (one byte).
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let (mut star, mut mark) = (None, 0usize);
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = n;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            n = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// Opens every shard matching `pattern` (see [`expand_pattern`]).
pub fn open_shards(pattern: impl AsRef<Path>) -> Result<Vec<ShardReader>> {
    expand_pattern(pattern)?
        .iter()
        .map(ShardReader::open)
        .collect()
}

/// The training loader: endless, shuffled per epoch, partitioned by rank, resumable.
///
/// ```
/// use eslm_data::loader::{DataLoader, LoaderConfig};
/// use eslm_data::shard::ShardReader;
/// let shard = ShardReader::from_tokens("<memory>", (0..1000).collect());
/// let mut loader = DataLoader::new(vec![shard], LoaderConfig::new(4, 16).with_seed(1))?;
/// let saved = loader.state();
/// let batch = loader.next_batch()?;
/// assert_eq!((batch.b, batch.t, batch.inputs.len()), (4, 16, 64));
/// assert_eq!(batch.targets[0], batch.inputs[0] + 1);
/// loader.restore(&saved)?;
/// assert_eq!(loader.next_batch()?, batch);
/// # Ok::<(), eslm_data::DataError>(())
/// ```
#[derive(Debug)]
pub struct DataLoader {
    shards: Vec<ShardReader>,
    config: LoaderConfig,
    index: WindowIndex,
    per_rank: u64,
    epoch: u64,
    cursor: u64,
    /// This rank's global window ids for the current epoch, `[per_rank]`.
    order: Vec<u64>,
}

impl DataLoader {
    /// A loader over `shards` (in this order). Fails if the configuration is invalid or there are fewer
    /// windows than ranks.
    pub fn new(shards: Vec<ShardReader>, config: LoaderConfig) -> Result<Self> {
        config.validate()?;
        let index = WindowIndex::new(&shards, config.seq_len);
        let per_rank = index.total() / config.world_size as u64;
        if per_rank == 0 {
            let tokens: usize = shards.iter().map(|s| s.len()).sum();
            return Err(DataError::NotEnoughData(format!(
                "{} shards with {} tokens hold {} windows of {} tokens; {} ranks need at least one each",
                shards.len(),
                tokens,
                index.total(),
                config.seq_len + 1,
                config.world_size
            )));
        }
        let mut loader = DataLoader {
            shards,
            config,
            index,
            per_rank,
            epoch: 0,
            cursor: 0,
            order: Vec::new(),
        };
        loader.build_order();
        Ok(loader)
    }

    /// A loader over every shard matching `pattern` (a directory, a file, or e.g. `data/train_*.bin`).
    pub fn open(pattern: impl AsRef<Path>, config: LoaderConfig) -> Result<Self> {
        DataLoader::new(open_shards(pattern)?, config)
    }

    fn build_order(&mut self) {
        let total = self.index.total();
        let world = self.config.world_size as u64;
        let rank = self.config.rank as u64;
        self.order.clear();
        if self.config.shuffle {
            let mut all: Vec<u64> = (0..total).collect();
            SplitMix64::with_stream(self.config.seed, self.epoch).shuffle(&mut all);
            self.order
                .extend((0..self.per_rank).map(|i| all[(i * world + rank) as usize]));
        } else {
            self.order
                .extend((0..self.per_rank).map(|i| i * world + rank));
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// The shards, in window-numbering order.
    pub fn shards(&self) -> &[ShardReader] {
        &self.shards
    }

    /// Total windows over all shards (all ranks).
    pub fn total_windows(&self) -> u64 {
        self.index.total()
    }

    /// Windows this rank reads per epoch (`⌊total / world_size⌋`).
    pub fn windows_per_epoch(&self) -> u64 {
        self.per_rank
    }

    /// Target tokens this rank reads per epoch.
    pub fn tokens_per_epoch(&self) -> u64 {
        self.per_rank * self.config.seq_len as u64
    }

    /// Epoch of the next window (0-based; it advances as soon as an epoch's last window has been read).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The window the next batch row will read.
    pub fn next_window(&self) -> WindowRef {
        // Invariant: cursor < per_rank (the epoch advances as soon as it is exhausted) and per_rank >= 1.
        self.index
            .locate(self.order.get(self.cursor as usize).copied().unwrap_or(0))
    }

    /// The next batch of B rows (wrapping into the next epoch when this one is exhausted).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let mut batch = Batch::default();
        self.next_batch_into(&mut batch)?;
        Ok(batch)
    }

    /// Like [`DataLoader::next_batch`], reusing `batch`'s buffers.
    pub fn next_batch_into(&mut self, batch: &mut Batch) -> Result<()> {
        batch.clear(self.config.seq_len);
        for _ in 0..self.config.batch_size {
            batch.push(&self.shards, self.next_window())?;
            self.cursor += 1;
            if self.cursor == self.per_rank {
                self.epoch += 1;
                self.cursor = 0;
                self.build_order();
            }
        }
        Ok(())
    }

    /// The current position, to save with a checkpoint.
    pub fn state(&self) -> LoaderState {
        let next = if self.cursor < self.per_rank {
            self.next_window()
        } else {
            WindowRef {
                shard: self.shards.len(),
                start: 0,
            }
        };
        LoaderState {
            seed: self.config.seed,
            epoch: self.epoch,
            cursor: self.cursor,
            shard: next.shard,
            offset: next.start,
            seq_len: self.config.seq_len,
            shuffle: self.config.shuffle,
            rank: self.config.rank,
            world_size: self.config.world_size,
            total_windows: self.index.total(),
        }
    }

    /// Moves to a saved position. The seed, sequence length, shuffle flag, rank, world size and data must
    /// match the loader's (the batch size may differ: the position counts windows, not batches).
    pub fn restore(&mut self, state: &LoaderState) -> Result<()> {
        let c = &self.config;
        let mut diffs = Vec::new();
        if state.seed != c.seed {
            diffs.push(format!("seed {} vs {}", state.seed, c.seed));
        }
        if state.seq_len != c.seq_len {
            diffs.push(format!("seq_len {} vs {}", state.seq_len, c.seq_len));
        }
        if state.shuffle != c.shuffle {
            diffs.push(format!("shuffle {} vs {}", state.shuffle, c.shuffle));
        }
        if state.rank != c.rank || state.world_size != c.world_size {
            diffs.push(format!(
                "rank {}/{} vs {}/{}",
                state.rank, state.world_size, c.rank, c.world_size
            ));
        }
        if state.total_windows != self.index.total() {
            diffs.push(format!(
                "{} windows in the saved data vs {} now (different shards?)",
                state.total_windows,
                self.index.total()
            ));
        }
        if state.cursor >= self.per_rank {
            diffs.push(format!(
                "cursor {} past the epoch's {} windows",
                state.cursor, self.per_rank
            ));
        }
        if !diffs.is_empty() {
            return Err(DataError::StateMismatch(diffs.join("; ")));
        }
        if state.epoch != self.epoch {
            self.epoch = state.epoch;
            self.build_order();
        }
        self.cursor = state.cursor;
        Ok(())
    }
}

/// The validation loader: every window of the data exactly once, in file order, in batches of up to B rows
/// (the last batch may be smaller). With several ranks, rank `r` reads windows `r, r+R, …`, so the ranks
/// together cover every window once.
///
/// ```
/// use eslm_data::loader::{LoaderConfig, ValLoader};
/// use eslm_data::shard::ShardReader;
/// let shard = ShardReader::from_tokens("<memory>", (0..101).collect());
/// let val = ValLoader::new(vec![shard], LoaderConfig::new(3, 10))?;
/// let sizes: Vec<usize> = val.iter().map(|b| b.map(|b| b.b)).collect::<Result<_, _>>()?;
/// assert_eq!(sizes, vec![3, 3, 3, 1]);
/// # Ok::<(), eslm_data::DataError>(())
/// ```
#[derive(Debug)]
pub struct ValLoader {
    shards: Vec<ShardReader>,
    config: LoaderConfig,
    index: WindowIndex,
}

impl ValLoader {
    /// A validation loader over `shards`. `config.seed` and `config.shuffle` are ignored.
    pub fn new(shards: Vec<ShardReader>, config: LoaderConfig) -> Result<Self> {
        config.validate()?;
        let index = WindowIndex::new(&shards, config.seq_len);
        Ok(ValLoader {
            shards,
            config,
            index,
        })
    }

    /// A validation loader over every shard matching `pattern`.
    pub fn open(pattern: impl AsRef<Path>, config: LoaderConfig) -> Result<Self> {
        ValLoader::new(open_shards(pattern)?, config)
    }

    /// The shards.
    pub fn shards(&self) -> &[ShardReader] {
        &self.shards
    }

    /// Windows this rank reads in one pass.
    pub fn num_windows(&self) -> u64 {
        let total = self.index.total();
        let (r, w) = (self.config.rank as u64, self.config.world_size as u64);
        if total > r {
            (total - r).div_ceil(w)
        } else {
            0
        }
    }

    /// Batches in one pass.
    pub fn num_batches(&self) -> u64 {
        self.num_windows().div_ceil(self.config.batch_size as u64)
    }

    /// Target tokens in one pass.
    pub fn num_tokens(&self) -> u64 {
        self.num_windows() * self.config.seq_len as u64
    }

    /// Batch `i` of the pass (`None` past the end).
    pub fn batch(&self, i: u64) -> Option<Result<Batch>> {
        let n = self.num_windows();
        let b = self.config.batch_size as u64;
        let first = i.checked_mul(b)?;
        if first >= n {
            return None;
        }
        let last = (first + b).min(n);
        let mut batch = Batch::default();
        batch.clear(self.config.seq_len);
        let (r, w) = (self.config.rank as u64, self.config.world_size as u64);
        for k in first..last {
            if let Err(e) = batch.push(&self.shards, self.index.locate(k * w + r)) {
                return Some(Err(e));
            }
        }
        Some(Ok(batch))
    }

    /// Iterates over one full pass, from the first window.
    pub fn iter(&self) -> impl Iterator<Item = Result<Batch>> + '_ {
        (0..self.num_batches()).filter_map(move |i| self.batch(i))
    }
}
