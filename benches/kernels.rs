//! Benchmarks of the `eslm-kernels` kernels, each against a baseline measured in the same run.
//!
//! CPU part (always built):
//! - token statistics, N = 8192, V = 50257, f32 (and bf16): bytes of logits read per second vs a plain memcpy of
//!   the same bytes (`copy_from_slice`, one thread and rayon-parallel); target ≥ 0.6× memcpy;
//! - selection (VaR, α = 0.7) at N = 8k, 64k, 1M vs a sort-based quantile on a copy of the scores
//!   (`select_nth_unstable_by` and a full `sort_unstable_by`, threshold only); target ≥ 5× faster than the sort at 1M;
//! - sparse cross-entropy at kept fractions 0.1, 0.3, 0.5, 1.0 (time should scale with the fraction).
//!
//! Criterion measures each case (`cargo bench --bench kernels`, usual criterion flags and filters); afterwards a
//! summary section re-times every case inline (median of a few runs) and prints the ratios the ledger quotes.
//! Set `ESLM_BENCH_SUMMARY=0` to skip the summary, `ESLM_BENCH_SUMMARY=only` to run only the summary.
//! A CUDA section (feature `cuda`) can be added next to the `cpu` module.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use eslm::kernels::{
    select, sparse_ce, token_stats, LogitsView, SelectRule, Selection, TokenStats,
    DEFAULT_IGNORE_INDEX,
};
use half::bf16;
use rayon::prelude::*;

mod cpu {
    use super::*;

    /// Token-statistics shape (GPT-2 vocabulary, unpadded so that memcpy copies exactly the bytes read).
    pub const N: usize = 8192;
    pub const V: usize = 50257;
    /// Selection sizes.
    pub const SELECT_SIZES: [usize; 3] = [8 << 10, 64 << 10, 1 << 20];
    /// Sparse CE kept fractions.
    pub const FRACTIONS: [f64; 4] = [0.1, 0.3, 0.5, 1.0];

    /// A cheap deterministic hash → uniform value in [0, 1).
    fn unit(i: u64) -> f32 {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        (x >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `[n, v]` logits uniform in [-10, 10], filled in parallel.
    pub fn logits(n: usize, v: usize) -> Vec<f32> {
        let mut data = vec![0.0f32; n * v];
        data.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            for (j, z) in row.iter_mut().enumerate() {
                *z = unit((i * v + j) as u64) * 20.0 - 10.0;
            }
        });
        data
    }

    pub fn targets(n: usize, v: usize) -> Vec<i32> {
        (0..n)
            .map(|i| (unit(i as u64 ^ 0xABCD) * v as f32) as i32 % v as i32)
            .collect()
    }

    /// Loss-like scores (exponential-ish, 0..~12).
    pub fn scores(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| -(1.0 - unit(i as u64 + 17)).ln() * 2.0)
            .collect()
    }

    pub fn memcpy_parallel(dst: &mut [f32], src: &[f32]) {
        dst.par_chunks_mut(1 << 18)
            .zip(src.par_chunks(1 << 18))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }

    /// Baseline quantile: copy, then `select_nth_unstable_by` for the k-th largest.
    pub fn select_nth_threshold(scores: &[f32], buf: &mut Vec<f32>, k: usize) -> f32 {
        buf.clear();
        buf.extend_from_slice(scores);
        *buf.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
    }

    /// Baseline quantile: copy, full sort, index.
    pub fn sort_threshold(scores: &[f32], buf: &mut Vec<f32>, k: usize) -> f32 {
        buf.clear();
        buf.extend_from_slice(scores);
        buf.sort_unstable_by(|a, b| b.total_cmp(a));
        buf[k - 1]
    }

    /// The kept rows of a sparse-CE bench at `fraction`, spread evenly.
    pub fn kept(n: usize, fraction: f64) -> Vec<u32> {
        let k = ((n as f64 * fraction).round() as usize).max(1);
        (0..k).map(|i| (i * n / k) as u32).collect()
    }

    pub fn bench_token_stats(c: &mut Criterion, logits: &[f32], targets: &[i32]) {
        let mut group = c.benchmark_group("token_stats");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(5));
        group.throughput(Throughput::Bytes((N * V * 4) as u64));
        let view = LogitsView::new(logits, N, V, V).expect("bench shape");
        let mut out = TokenStats::new();
        group.bench_function("f32_8192x50257", |b| {
            b.iter(|| {
                token_stats(&view, targets, DEFAULT_IGNORE_INDEX, &mut out).expect("token_stats")
            })
        });
        let mut dst = vec![0.0f32; logits.len()];
        group.bench_function("memcpy_1thread_same_bytes", |b| {
            b.iter(|| dst.copy_from_slice(black_box(logits)))
        });
        group.bench_function("memcpy_rayon_same_bytes", |b| {
            b.iter(|| memcpy_parallel(&mut dst, black_box(logits)))
        });
        drop(dst);
        let logits16: Vec<bf16> = logits.par_iter().map(|&z| bf16::from_f32(z)).collect();
        let view16 = LogitsView::new(&logits16, N, V, V).expect("bench shape");
        group.throughput(Throughput::Bytes((N * V * 2) as u64));
        group.bench_function("bf16_8192x50257", |b| {
            b.iter(|| {
                token_stats(&view16, targets, DEFAULT_IGNORE_INDEX, &mut out).expect("token_stats")
            })
        });
        group.finish();
    }

    pub fn bench_select(c: &mut Criterion) {
        let mut group = c.benchmark_group("select");
        for n in SELECT_SIZES {
            let scores = scores(n);
            let k = (n as f64 * 0.3).ceil() as usize;
            let mut sel = Selection::new();
            let mut buf = Vec::new();
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new("radix_var", n), &scores, |b, s| {
                b.iter(|| {
                    select(s, None, SelectRule::Var { alpha: 0.7 }, &mut sel).expect("select")
                })
            });
            group.bench_with_input(
                BenchmarkId::new("select_nth_unstable", n),
                &scores,
                |b, s| b.iter(|| select_nth_threshold(s, &mut buf, k)),
            );
            group.bench_with_input(BenchmarkId::new("full_sort", n), &scores, |b, s| {
                b.iter(|| sort_threshold(s, &mut buf, k))
            });
        }
        group.finish();
    }

    pub fn bench_sparse_ce(c: &mut Criterion, logits: &[f32], targets: &[i32], lse: &[f32]) {
        let mut group = c.benchmark_group("sparse_ce");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(5));
        let view = LogitsView::new(logits, N, V, V).expect("bench shape");
        let mut dlogits = vec![0.0f32; N * V];
        for fraction in FRACTIONS {
            let kept = kept(N, fraction);
            let scale = 1.0 / kept.len() as f32;
            group.throughput(Throughput::Bytes((kept.len() * V * 4) as u64));
            group.bench_function(BenchmarkId::new("kept_fraction", fraction), |b| {
                b.iter(|| {
                    sparse_ce(&view, targets, lse, &kept, scale, &mut dlogits, V)
                        .expect("sparse_ce")
                })
            });
        }
        group.finish();
    }

    /// Median wall time of `reps` runs of `f` (after one warm-up run).
    fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
        f();
        let mut times: Vec<Duration> = (0..reps)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        times.sort();
        times[reps / 2]
    }

    fn gbs(bytes: usize, t: Duration) -> f64 {
        bytes as f64 / t.as_secs_f64() / 1e9
    }

    /// Re-times every case inline and prints the ratios.
    pub fn summary(logits: &[f32], targets: &[i32], lse: &[f32]) {
        println!("\n=== eslm-kernels CPU summary (median of inline runs, same process; rayon threads: {}) ===",
            rayon::current_num_threads());
        let bytes = N * V * 4;
        let view = LogitsView::new(logits, N, V, V).expect("bench shape");
        let mut out = TokenStats::new();
        let t_stats = median_time(7, || {
            token_stats(&view, targets, DEFAULT_IGNORE_INDEX, &mut out).expect("stats")
        });
        let mut dst = vec![0.0f32; logits.len()];
        let t_copy1 = median_time(7, || dst.copy_from_slice(black_box(logits)));
        let t_copyp = median_time(7, || memcpy_parallel(&mut dst, black_box(logits)));
        drop(dst);
        let best_copy = gbs(bytes, t_copy1).max(gbs(bytes, t_copyp));
        println!(
            "token_stats f32 N={N} V={V}: {:.1} ms = {:.2} GB/s of logits; memcpy of the same {:.2} GB: 1 thread {:.2} GB/s, \
             rayon {:.2} GB/s; RATIO token_stats / best memcpy = {:.2} (target >= 0.6)",
            t_stats.as_secs_f64() * 1e3,
            gbs(bytes, t_stats),
            bytes as f64 / 1e9,
            gbs(bytes, t_copy1),
            gbs(bytes, t_copyp),
            gbs(bytes, t_stats) / best_copy
        );
        {
            let logits16: Vec<bf16> = logits.par_iter().map(|&z| bf16::from_f32(z)).collect();
            let view16 = LogitsView::new(&logits16, N, V, V).expect("bench shape");
            let t16 = median_time(5, || {
                token_stats(&view16, targets, DEFAULT_IGNORE_INDEX, &mut out).expect("stats")
            });
            println!(
                "token_stats bf16 N={N} V={V}: {:.1} ms = {:.2} GB/s of bf16 logits ({:.2} Glogits/s; f32: {:.2} Glogits/s)",
                t16.as_secs_f64() * 1e3,
                gbs(N * V * 2, t16),
                (N * V) as f64 / t16.as_secs_f64() / 1e9,
                (N * V) as f64 / t_stats.as_secs_f64() / 1e9
            );
        }

        for n in SELECT_SIZES {
            let scores = scores(n);
            let k = (n as f64 * 0.3).ceil() as usize;
            let reps = if n > 100_000 { 15 } else { 101 };
            let mut sel = Selection::new();
            let mut buf = Vec::new();
            let t_radix = median_time(reps, || {
                select(&scores, None, SelectRule::Var { alpha: 0.7 }, &mut sel).expect("select")
            });
            let t_nth = median_time(reps, || {
                black_box(select_nth_threshold(&scores, &mut buf, k));
            });
            let t_sort = median_time(reps, || {
                black_box(sort_threshold(&scores, &mut buf, k));
            });
            assert_eq!(
                sel.threshold,
                sort_threshold(&scores, &mut buf, k),
                "baselines agree on the threshold"
            );
            println!(
                "select VaR(0.7) N={n}: radix {:.1} us; select_nth_unstable {:.1} us (radix {:.1}x faster); full sort {:.1} us \
                 (radix {:.1}x faster){}",
                t_radix.as_secs_f64() * 1e6,
                t_nth.as_secs_f64() * 1e6,
                t_nth.as_secs_f64() / t_radix.as_secs_f64(),
                t_sort.as_secs_f64() * 1e6,
                t_sort.as_secs_f64() / t_radix.as_secs_f64(),
                if n == 1 << 20 { " (target >= 5x vs sort at 1M)" } else { "" }
            );
        }

        let mut dlogits = vec![0.0f32; N * V];
        let mut full = None;
        let mut lines = Vec::new();
        for fraction in FRACTIONS.iter().rev() {
            let kept = kept(N, *fraction);
            let scale = 1.0 / kept.len() as f32;
            let t = median_time(5, || {
                sparse_ce(&view, targets, lse, &kept, scale, &mut dlogits, V).expect("sparse_ce");
            });
            let t_full = *full.get_or_insert(t);
            lines.push(format!(
                "sparse_ce N={N} V={V} kept fraction {fraction}: K={} {:.1} ms, {:.2} GB/s written; time / time(1.0) = {:.2}",
                kept.len(),
                t.as_secs_f64() * 1e3,
                gbs(kept.len() * V * 4, t),
                t.as_secs_f64() / t_full.as_secs_f64()
            ));
        }
        for line in lines.iter().rev() {
            println!("{line}");
        }
    }
}

fn main() {
    // `cargo test --benches` runs this binary without `--bench`: skip the 1.6 GB workload there.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "kernels bench: not run as a benchmark (use `cargo bench --bench kernels`); skipping"
        );
        return;
    }
    let mode = std::env::var("ESLM_BENCH_SUMMARY").unwrap_or_default();
    let logits = cpu::logits(cpu::N, cpu::V);
    let targets = cpu::targets(cpu::N, cpu::V);
    let mut stats = TokenStats::new();
    let view = LogitsView::new(&logits, cpu::N, cpu::V, cpu::V).expect("bench shape");
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut stats).expect("token_stats");

    if mode != "only" {
        let mut c = Criterion::default().configure_from_args();
        cpu::bench_token_stats(&mut c, &logits, &targets);
        cpu::bench_select(&mut c);
        cpu::bench_sparse_ce(&mut c, &logits, &targets, &stats.lse);
        c.final_summary();
    }
    if mode != "0" {
        cpu::summary(&logits, &targets, &stats.lse);
    }
}
