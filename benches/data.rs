//! Data benchmarks: loader throughput (tokens/s) and GPT-2 tokenization throughput (MB/s of text).
//!
//! - `loader/*`: `DataLoader::next_batch_into` over a 16 M-token u16 shard in a temporary directory, shuffled
//!   windows; throughput = B·T target tokens per batch. Baseline printed in the same run: a plain `memcpy`-style
//!   widening copy of the same number of tokens from the mapped shard.
//! - `tokenize/*`: encoding the first 16 MB of `../shared/data/corpus/gutenberg_100mb.txt.gz` cut into ~1 MB
//!   pieces at safe points, on a 2-thread rayon pool (the setting) and on 1 thread (baseline).
//!   Skipped with a message when the shared data is missing.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use eslm_data::loader::{Batch, DataLoader, LoaderConfig};
use eslm_data::prepare::{read_text, split_for_encoding};
use eslm_data::shard::{write_shard, ShardReader, TokenWidth};
use eslm_data::Tokenizer;
use rayon::prelude::*;

fn bench_loader(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("eslm-bench-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("train_000000.bin");
    let n = 16 << 20;
    let tokens: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 2_654_435_761) % 50_257) as u32)
        .collect();
    write_shard(&path, &tokens, TokenWidth::U16).expect("write shard");
    drop(tokens);

    let mut group = c.benchmark_group("loader");
    for (b, t) in [(8usize, 1024usize), (64, 64)] {
        let mut loader =
            DataLoader::open(&path, LoaderConfig::new(b, t).with_seed(1)).expect("loader");
        let mut batch = Batch::default();
        group.throughput(Throughput::Elements((b * t) as u64));
        group.bench_function(format!("next_batch_B{b}_T{t}"), |bench| {
            bench.iter(|| loader.next_batch_into(&mut batch).expect("batch"))
        });
        // Baseline: widen the same number of contiguous tokens from the map.
        let shard = ShardReader::open(&path).expect("shard");
        let mut out = vec![0u32; b * (t + 1)];
        let mut start = 0usize;
        group.bench_function(format!("baseline_contiguous_copy_B{b}_T{t}"), |bench| {
            bench.iter(|| {
                if start + out.len() > shard.len() {
                    start = 0;
                }
                shard.tokens().copy_to_u32(start, &mut out);
                start += out.len();
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIP tokenize bench: {} not found (shared data missing)",
            p.display()
        );
        None
    }
}

fn bench_tokenize(c: &mut Criterion) {
    let (Some(corpus), Some(tok_path)) = (
        shared("corpus/gutenberg_100mb.txt.gz"),
        shared("gpt2/tokenizer.json"),
    ) else {
        return;
    };
    let tok = Tokenizer::from_path(tok_path).expect("tokenizer");
    let text = read_text(corpus).expect("corpus");
    let mut end = (16 << 20).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let slice = &text[..end];
    let pieces = split_for_encoding(slice, 1 << 20);
    let mut group = c.benchmark_group("tokenize");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(slice.len() as u64));
    for threads in [2usize, 1] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        group.bench_function(format!("gutenberg_16MB_{threads}_threads"), |bench| {
            bench.iter_batched(
                || (),
                |_| {
                    pool.install(|| {
                        pieces
                            .par_iter()
                            .map(|p| tok.encode(p).expect("encode").len())
                            .sum::<usize>()
                    })
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_loader, bench_tokenize);
criterion_main!(benches);
