//! Quick loader throughput check without criterion: writes a 16 M-token u16 shard to a temporary directory and
//! reads `B × T` shuffled batches from it. Prints target tokens per second of wall time; run under
//! `/usr/bin/time` to see CPU time on a busy machine. The criterion version is `benches/data.rs` (root package).
//!
//! `cargo run --profile test -p eslm-data --example loader_speed -- [B] [T] [batches]`

use std::time::Instant;

use eslm_data::loader::{Batch, DataLoader, LoaderConfig};
use eslm_data::shard::{write_shard, TokenWidth};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let b = args.first().copied().unwrap_or(8);
    let t = args.get(1).copied().unwrap_or(1024);
    let batches = args.get(2).copied().unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("train_000000.bin");
    let tokens: Vec<u32> = (0..16u64 << 20)
        .map(|i| ((i * 2_654_435_761) % 50_257) as u32)
        .collect();
    write_shard(&path, &tokens, TokenWidth::U16)?;
    drop(tokens);
    let mut loader = DataLoader::open(&path, LoaderConfig::new(b, t).with_seed(1))?;
    let mut batch = Batch::default();
    let start = Instant::now();
    let mut checksum = 0u64;
    for _ in 0..batches {
        loader.next_batch_into(&mut batch)?;
        checksum = checksum.wrapping_add(batch.targets[0] as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    let n = (batches * b * t) as f64;
    println!(
        "B={b} T={t}: {batches} batches, {:.0} M target tokens in {secs:.3} s = {:.1} M tokens/s (checksum {checksum})",
        n / 1e6,
        n / secs / 1e6
    );
    Ok(())
}
