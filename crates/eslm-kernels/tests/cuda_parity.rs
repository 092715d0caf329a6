//! GPU vs CPU parity for the three kernel families (feature `cuda`).
//!
//! Every GPU test first probes for a CUDA driver and a GPU; without one it prints
//! `skipping: no CUDA driver (...)` and returns (so `cargo test --features cuda` passes on CPU-only machines, and
//! CI compiles these with `--no-run`). With a GPU each kernel is compared to the CPU reference on fresh random
//! inputs: selection exactly (threshold, k, keep mask, indices, errors), statistics and gradients to f32 / bf16
//! tolerances relative to the entries' own scale. Outputs are pre-filled with NaN, so an element the kernel should
//! write but does not (padding included) fails the comparison.
//!
//! Seeds: each test prints its seed, and prints it again with the rerun command if it fails; `ESLM_TEST_SEED=<u64>`
//! replays a run. `ESLM_TEST_QUICK=1` (what `scripts/gpu-check.sh` sets under compute-sanitizer, which slows
//! kernels 10–100×) keeps the selection sweep to N ≤ 8192 and skips the 4 GB test. The ptxas-report test needs no
//! GPU and always runs.
#![cfg(feature = "cuda")]

use eslm_kernels::cuda::cudarc::driver::CudaSlice;
use eslm_kernels::cuda::{
    cuda_available, cuda_probe, CudaKernels, DeviceLogits, DeviceSelection, DeviceSparseCe,
};
use eslm_kernels::cuda::{DeviceTokenStats, GradScale, SparseCeArgs, NO_ROW, PTXAS_REPORT};
use eslm_kernels::{
    select, sparse_ce, token_stats, KernelError, LogitsView, SelectRule, Selection, TokenStats,
    DEFAULT_IGNORE_INDEX,
};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU backend, or `None` (after printing why) when this machine has no CUDA driver or GPU.
fn gpu() -> Option<CudaKernels> {
    match cuda_probe() {
        Err(e) => {
            println!("skipping: no CUDA driver ({e})");
            None
        }
        // A driver and a GPU are present: from here on any failure is a real failure.
        Ok(_) => Some(
            CudaKernels::new(0)
                .expect("CUDA driver and GPU present, but the kernels failed to load"),
        ),
    }
}

/// Whether `ESLM_TEST_QUICK=1` asks for the reduced sizes (runs under compute-sanitizer).
fn quick() -> bool {
    std::env::var("ESLM_TEST_QUICK").is_ok_and(|v| v == "1")
}

/// Prints the seed again, with the command that replays it, when the test that holds it panics.
struct SeedReport {
    test: &'static str,
    seed: u64,
}

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}: FAILED with seed {}; replay with ESLM_TEST_SEED={} cargo test -p eslm-kernels --features cuda \
                 --test cuda_parity {}",
                self.test, self.seed, self.seed, self.test
            );
        }
    }
}

/// The generator of one test: seeded from `ESLM_TEST_SEED` if set, else from the clock; the seed is printed now and
/// on failure (keep the returned guard alive for the whole test).
fn rng(test: &'static str) -> (ChaCha8Rng, SeedReport) {
    let seed = match std::env::var("ESLM_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("ESLM_TEST_SEED={v:?} is not a u64: {e}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    println!("{test}: seed {seed}");
    (ChaCha8Rng::seed_from_u64(seed), SeedReport { test, seed })
}

/// `|a − b| ≤ atol + rtol·|b|`, with NaN matching NaN and infinities matching exactly.
fn close(a: f32, b: f32, atol: f32, rtol: f32) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= atol + rtol * b.abs()
}

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], atol: f32, rtol: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(close(g, c, atol, rtol), "{what}[{i}]: gpu {g} vs cpu {c}");
    }
}

#[test]
fn probe_never_panics_and_new_fails_cleanly_without_a_driver() {
    let available = cuda_available();
    assert_eq!(available, cuda_probe().is_ok());
    if !available {
        let err =
            CudaKernels::new(0).expect_err("no driver or GPU, yet CudaKernels::new succeeded");
        assert!(
            matches!(err, KernelError::NoCudaDriver | KernelError::Cuda(_)),
            "unexpected error {err:?}"
        );
        println!("no CUDA here: {err}");
    }
}

#[test]
fn ptxas_report_has_both_architectures_and_no_spills() {
    for (file, report) in PTXAS_REPORT {
        for arch in ["sm_80", "sm_90"] {
            assert!(
                report.contains(&format!("for '{arch}'")),
                "{file}: no ptxas report for {arch}:\n{report}"
            );
        }
        let spills: Vec<&str> = report
            .lines()
            .filter(|l| l.contains("spill stores") && !l.contains(" 0 bytes spill stores"))
            .collect();
        assert!(spills.is_empty(), "{file}: register spills: {spills:?}");
        let stack: Vec<&str> = report
            .lines()
            .filter(|l| l.contains("bytes stack frame") && !l.contains(" 0 bytes stack frame"))
            .collect();
        assert!(
            stack.is_empty(),
            "{file}: local-memory stack frames: {stack:?}"
        );
    }
}

/// Random logits `[rows, stride]` (padding filled with NaN so reading it would show) and targets (some ignored).
fn random_case(
    rng: &mut ChaCha8Rng,
    rows: usize,
    vocab: usize,
    stride: usize,
) -> (Vec<f32>, Vec<i32>) {
    let mut logits = vec![f32::NAN; rows * stride];
    for r in 0..rows {
        let spread: f32 = rng.gen_range(0.1..8.0);
        for v in &mut logits[r * stride..r * stride + vocab] {
            *v = rng.gen_range(-1.0f32..1.0) * spread;
        }
    }
    let targets = (0..rows)
        .map(|_| {
            if rng.gen_bool(0.15) {
                DEFAULT_IGNORE_INDEX
            } else {
                rng.gen_range(0..vocab) as i32
            }
        })
        .collect();
    (logits, targets)
}

fn compare_stats(label: &str, g: &TokenStats, c: &TokenStats) {
    assert_eq!(g.valid, c.valid, "{label}: valid");
    assert_close(&format!("{label} lse"), &g.lse, &c.lse, 1e-4, 1e-5);
    assert_close(&format!("{label} loss"), &g.loss, &c.loss, 1e-4, 1e-5);
    assert_close(
        &format!("{label} entropy"),
        &g.entropy,
        &c.entropy,
        1e-4,
        1e-4,
    );
}

#[test]
fn token_stats_matches_cpu_f32_and_bf16() {
    let Some(gpu) = gpu() else { return };
    let (mut rng, _seed) = rng("token_stats_matches_cpu_f32_and_bf16");
    // (rows, vocab, stride): GPT-2's padded vocabulary, N = 1, an odd stride (misaligned rows), tiny rows.
    for &(rows, vocab, stride) in &[
        (12, 50257, 50304),
        (1, 50257, 50304),
        (5, 50257, 50257),
        (9, 3, 5),
        (4, 1, 1),
        (7, 1000, 1003),
    ] {
        let (mut logits, targets) = random_case(&mut rng, rows, vocab, stride);
        if rows >= 5 && vocab >= 3 {
            logits[0] = f32::NEG_INFINITY; // a masked entry
            logits[stride + 1] = 3.0e38; // a huge logit
            logits[2 * stride + 2] = f32::INFINITY; // +inf row
            logits[3 * stride] = f32::NAN; // NaN row
            for v in &mut logits[4 * stride..4 * stride + vocab] {
                *v = f32::NEG_INFINITY; // all -inf row
            }
        }
        if rows >= 8 && vocab >= 1000 {
            // Masked with -FLT_MAX instead of -inf: the running max jumps from -FLT_MAX to an ordinary value
            // (row 5), and to 3e38 (row 6); row 7 is -FLT_MAX everywhere (entropy ln V).
            logits[5 * stride..5 * stride + vocab / 2].fill(f32::MIN);
            logits[6 * stride..6 * stride + vocab].fill(f32::MIN);
            logits[6 * stride + 3] = 0.5;
            logits[6 * stride + vocab - 2] = 3.0e38;
            logits[7 * stride..7 * stride + vocab].fill(f32::MIN);
        }
        let label = format!("f32 rows {rows} vocab {vocab} stride {stride}");
        let view = LogitsView::new(&logits, rows, vocab, stride).unwrap();
        let (mut c, mut g) = (TokenStats::new(), TokenStats::new());
        token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut c).unwrap();
        gpu.token_stats_host(&view, &targets, DEFAULT_IGNORE_INDEX, &mut g)
            .unwrap();
        compare_stats(&label, &g, &c);

        let logits16: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
        let view16 = LogitsView::new(&logits16, rows, vocab, stride).unwrap();
        token_stats(&view16, &targets, DEFAULT_IGNORE_INDEX, &mut c).unwrap();
        gpu.token_stats_host(&view16, &targets, DEFAULT_IGNORE_INDEX, &mut g)
            .unwrap();
        compare_stats(&format!("bf16 {label}"), &g, &c);
    }
    // A batch whose every target is ignored: nothing read, every row invalid (and nothing to select from).
    let (logits, _) = random_case(&mut rng, 6, 1000, 1000);
    let ignored = vec![DEFAULT_IGNORE_INDEX; 6];
    let view = LogitsView::new(&logits, 6, 1000, 1000).unwrap();
    let (mut c, mut g) = (TokenStats::new(), TokenStats::new());
    token_stats(&view, &ignored, DEFAULT_IGNORE_INDEX, &mut c).unwrap();
    gpu.token_stats_host(&view, &ignored, DEFAULT_IGNORE_INDEX, &mut g)
        .unwrap();
    compare_stats("all ignored", &g, &c);
    assert!(g.valid.iter().all(|&v| !v));
    compare_select(
        &gpu,
        &g.loss,
        Some(&g.valid),
        SelectRule::Var { alpha: 0.5 },
    );
    // Errors come from the same checks as the CPU's.
    let logits = vec![0.0f32; 8];
    let view = LogitsView::new(&logits, 2, 4, 4).unwrap();
    let mut g = TokenStats::new();
    assert_eq!(
        gpu.token_stats_host(&view, &[0, 4], DEFAULT_IGNORE_INDEX, &mut g),
        Err(KernelError::TargetOutOfRange {
            row: 1,
            target: 4,
            vocab: 4
        })
    );
}

fn compare_select(gpu: &CudaKernels, scores: &[f32], valid: Option<&[bool]>, rule: SelectRule) {
    let (mut c, mut g) = (Selection::new(), Selection::new());
    let cr = select(scores, valid, rule, &mut c);
    let gr = gpu.select_host(scores, valid, rule, &mut g);
    assert_eq!(gr, cr, "n {} rule {rule:?}: results differ", scores.len());
    if cr.is_ok() {
        assert_eq!(
            g.threshold.to_bits(),
            c.threshold.to_bits(),
            "threshold (n {}, {rule:?})",
            scores.len()
        );
        assert_eq!(g.k, c.k, "k");
        assert_eq!(
            g.indices,
            c.indices,
            "indices (n {}, {rule:?})",
            scores.len()
        );
        assert_eq!(g.keep, c.keep, "keep");
    }
}

#[test]
fn select_matches_cpu_exactly() {
    let Some(gpu) = gpu() else { return };
    let (mut rng, _seed) = rng("select_matches_cpu_exactly");
    let sizes: &[usize] = if quick() {
        &[1, 2, 7, 2047, 2049, 8192]
    } else {
        &[1, 2, 7, 2047, 2048, 2049, 8192, 100_003]
    };
    for &n in sizes {
        for case in 0..4 {
            let scores: Vec<f32> = (0..n)
                .map(|_| match case {
                    0 => rng.gen_range(0.0f32..12.0), // continuous losses
                    1 => (rng.gen_range(0.0f32..4.0) * 4.0).round() / 4.0, // heavy ties
                    2 => 1.5,                         // all equal
                    _ => match rng.gen_range(0..10) {
                        // signs, zeros, infinities
                        0 => f32::INFINITY,
                        1 => f32::NEG_INFINITY,
                        2 => -0.0,
                        3 => 0.0,
                        _ => rng.gen_range(-5.0f32..5.0),
                    },
                })
                .collect();
            let valid: Vec<bool> = (0..n).map(|_| rng.gen_bool(0.8)).collect();
            for alpha in [1e-3, 0.3, 0.5, 0.7, 0.999] {
                compare_select(&gpu, &scores, None, SelectRule::Var { alpha });
                compare_select(&gpu, &scores, Some(&valid), SelectRule::Var { alpha });
            }
            for k in [1, n / 3 + 1, n / 2 + 1, n] {
                compare_select(&gpu, &scores, None, SelectRule::TopK { k });
                compare_select(&gpu, &scores, Some(&valid), SelectRule::TopK { k });
            }
        }
    }
    // Errors, in the CPU's order: NaN (lowest valid row), no valid rows, k = 0 / k > M, alpha.
    let mut scores = vec![1.0f32; 5000];
    scores[4000] = f32::NAN;
    scores[3000] = f32::NAN;
    compare_select(&gpu, &scores, None, SelectRule::Var { alpha: 0.5 });
    let mut valid = vec![true; 5000];
    valid[3000] = false;
    compare_select(&gpu, &scores, Some(&valid), SelectRule::TopK { k: 3 });
    compare_select(
        &gpu,
        &[1.0, 2.0],
        Some(&[false, false]),
        SelectRule::Var { alpha: 0.5 },
    );
    compare_select(
        &gpu,
        &[1.0, 2.0, 3.0],
        Some(&[true, false, true]),
        SelectRule::TopK { k: 3 },
    );
    compare_select(&gpu, &[1.0, 2.0, 3.0], None, SelectRule::TopK { k: 0 });
    compare_select(&gpu, &[1.0, 2.0, 3.0], None, SelectRule::Var { alpha: 1.0 });
    compare_select(&gpu, &[], None, SelectRule::Var { alpha: 0.5 });
}

/// The device computes k = ⌈(1 − α)·M⌉ itself (M is only known there): same rounding band as the CPU's
/// `var_keep_count`, checked on values where float noise decides (e.g. (1 − 0.7)·10 = 3.0000000000000004).
#[test]
fn var_keep_count_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let alphas = [
        0.1,
        0.2,
        0.3,
        0.7,
        0.9,
        1.0 / 3.0,
        2.0 / 3.0,
        0.25,
        0.5,
        1e-9,
        1.0 - 1e-9,
        0.123456789,
    ];
    for m in [1usize, 2, 3, 7, 10, 30, 100, 333, 1000, 4097] {
        let scores: Vec<f32> = (0..m).map(|i| i as f32).collect();
        for alpha in alphas {
            compare_select(&gpu, &scores, None, SelectRule::Var { alpha });
        }
    }
}

/// Gradient tolerances on the scale of the entries: every entry is `(p − [j = y])·g` with `p ∈ [0, 1]`, so its
/// error is relative (the exp and the f32 lse, ≈ 1e-5) plus an absolute floor far below `|g|` (entries of rows
/// whose probabilities underflow are exactly 0 on both sides). Returns `(atol, rtol)`.
fn grad_tolerance(scale: f32, bf16_out: bool) -> (f32, f32) {
    let rtol = if bf16_out { 8e-3 } else { 1e-5 }; // bf16: one rounding (2^-9) of the f32 value, twice over
    (1e-7 * scale.abs(), rtol)
}

/// Runs the CPU and the GPU sparse CE on the same inputs and compares them; the GPU output starts as NaN.
#[allow(clippy::too_many_arguments)]
fn compare_sparse_ce<T: eslm_kernels::LogitElem + eslm_kernels::cuda::DeviceElem>(
    gpu: &CudaKernels,
    label: &str,
    view: &LogitsView<'_, T>,
    targets: &[i32],
    kept: &[u32],
    scale: f32,
    out_stride: usize,
) {
    let mut stats = TokenStats::new();
    token_stats(view, targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
    let k = kept.len();
    let mut cpu_out = vec![9.0f32; k * out_stride];
    let cpu_loss = sparse_ce(
        view,
        targets,
        &stats.lse,
        kept,
        scale,
        &mut cpu_out,
        out_stride,
    )
    .unwrap();
    let (atol, rtol) = grad_tolerance(scale, false);
    let mut gpu_out = vec![f32::NAN; k * out_stride];
    let gpu_loss = gpu
        .sparse_ce_host(
            view,
            targets,
            &stats.lse,
            kept,
            scale,
            &mut gpu_out,
            out_stride,
        )
        .unwrap();
    assert!(
        close(gpu_loss, cpu_loss, 1e-6, 1e-5),
        "{label}: loss {gpu_loss} vs {cpu_loss}"
    );
    assert_close(
        &format!("{label} dlogits f32"),
        &gpu_out,
        &cpu_out,
        atol,
        rtol,
    );

    // bf16 gradients: the CPU's f32 result rounded once to bf16.
    let (atol, rtol) = grad_tolerance(scale, true);
    let mut gpu16 = vec![bf16::NAN; k * out_stride];
    gpu.sparse_ce_host(
        view, targets, &stats.lse, kept, scale, &mut gpu16, out_stride,
    )
    .unwrap();
    let gpu16: Vec<f32> = gpu16.iter().map(|x| x.to_f32()).collect();
    assert_close(
        &format!("{label} dlogits bf16"),
        &gpu16,
        &cpu_out,
        atol,
        rtol,
    );
}

#[test]
fn sparse_ce_matches_cpu_f32_and_bf16() {
    let Some(gpu) = gpu() else { return };
    let (mut rng, _seed) = rng("sparse_ce_matches_cpu_f32_and_bf16");
    // (rows, vocab, stride, out_stride): aligned and unaligned output rows (out_stride 50257 is odd while the
    // logits stride is a multiple of 8: the output rows get their own head / body / tail), tiny rows.
    for &(rows, vocab, stride, out_stride) in &[
        (16, 50257, 50304, 50304),
        (1, 50257, 50304, 50257),
        (5, 50257, 50304, 50259),
        (9, 1001, 1001, 1003),
        (6, 3, 3, 8),
        (3, 1, 1, 1),
    ] {
        let (mut logits, mut targets) = random_case(&mut rng, rows, vocab, stride);
        for t in &mut targets {
            if *t < 0 {
                *t = 0;
            }
        }
        if rows >= 5 && vocab >= 1000 {
            logits[stride..stride + vocab / 2].fill(f32::MIN); // -FLT_MAX masks
            logits[2 * stride + 7] = f32::NEG_INFINITY;
        }
        // Any order, repeats allowed.
        let k = rng.gen_range(1..=rows.max(2));
        let kept: Vec<u32> = (0..k).map(|_| rng.gen_range(0..rows) as u32).collect();
        let scale = 1.0 / k as f32;
        let label = format!("rows {rows} vocab {vocab} stride {stride} out {out_stride} K {k}");
        let view = LogitsView::new(&logits, rows, vocab, stride).unwrap();
        compare_sparse_ce(&gpu, &label, &view, &targets, &kept, scale, out_stride);
        // bf16 logits (bf16 → f32 and bf16 → bf16).
        let logits16: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
        let view16 = LogitsView::new(&logits16, rows, vocab, stride).unwrap();
        compare_sparse_ce(
            &gpu,
            &format!("bf16 {label}"),
            &view16,
            &targets,
            &kept,
            scale,
            out_stride,
        );
    }
    // Errors and K = 0 behave like the CPU.
    let logits = vec![0.0f32; 8];
    let view = LogitsView::new(&logits, 2, 4, 4).unwrap();
    let lse = [4f32.ln(); 2];
    let mut out = vec![0.0f32; 8];
    assert_eq!(
        gpu.sparse_ce_host(&view, &[0, 1], &lse, &[2], 1.0, &mut out, 4),
        Err(KernelError::KeptRowOutOfRange {
            position: 0,
            row: 2,
            rows: 2
        })
    );
    assert_eq!(
        gpu.sparse_ce_host(&view, &[0, 1], &lse, &[], 1.0, &mut out, 4),
        Ok(0.0)
    );
}

/// The device API's edges: K = 0 through the kernel, rows `[K, capacity)` zeroed on every call (never the previous
/// call's gradients), K over the capacity reported as a typed error, and a bad kept row flagged.
#[test]
fn sparse_ce_device_count_edges() {
    let Some(gpu) = gpu() else { return };
    let (mut rng, _seed) = rng("sparse_ce_device_count_edges");
    let (rows, vocab, stride, cap) = (8usize, 1003usize, 1008usize, 6usize);
    let (logits, mut targets) = random_case(&mut rng, rows, vocab, stride);
    targets.iter_mut().for_each(|t| *t = (*t).max(0));
    let view = LogitsView::new(&logits, rows, vocab, stride).unwrap();
    let mut stats = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
    let kept_host: Vec<u32> = vec![7, 2, 5, 0, 3, 1];

    let d_logits = gpu.upload(&logits).unwrap();
    let d_view = DeviceLogits::new(d_logits.slice(0..logits.len()), rows, vocab, stride).unwrap();
    let d_targets = gpu.upload(&targets).unwrap();
    let d_lse = gpu.upload(&stats.lse).unwrap();
    let d_kept = gpu.upload(&kept_host).unwrap();
    let mut d_out = gpu.upload(&vec![f32::NAN; cap * stride]).unwrap();
    let mut work = DeviceSparseCe::new(&gpu, cap).unwrap();
    let run = |k: u32, d_out: &mut CudaSlice<f32>, work: &mut DeviceSparseCe| {
        let d_count = gpu.upload(&[k]).unwrap();
        let mut out_view = d_out.slice_mut(0..cap * stride);
        gpu.sparse_ce(
            SparseCeArgs {
                logits: &d_view,
                targets: &d_targets.slice(0..rows),
                lse: &d_lse.slice(0..rows),
                kept: &d_kept.slice(0..cap),
                count: &d_count.slice(0..1),
                dlogits: &mut out_view,
                out_stride: stride,
                scale: GradScale::OverCount(1.0),
            },
            work,
        )
        .unwrap();
    };
    // K = capacity, then K = 2 into the same buffers: rows 2.. must be zeros afterwards, not the first call's.
    for k in [cap, 2, 0] {
        run(k as u32, &mut d_out, &mut work);
        let loss = work.read_loss(&gpu).unwrap();
        let got = gpu.download(&d_out.slice(0..cap * stride)).unwrap();
        let mut want = vec![0.0f32; cap * stride];
        let cpu_loss = sparse_ce(
            &view,
            &targets,
            &stats.lse,
            &kept_host[..k],
            1.0 / k.max(1) as f32,
            &mut want,
            stride,
        )
        .unwrap();
        assert!(
            close(loss, cpu_loss, 1e-6, 1e-5),
            "K {k}: loss {loss} vs {cpu_loss}"
        );
        let (atol, rtol) = grad_tolerance(1.0 / k.max(1) as f32, false);
        assert_close(&format!("K {k} dlogits"), &got, &want, atol, rtol);
    }
    // K over the capacity: a typed error naming both counts, every row zeroed, loss NaN.
    run(cap as u32 + 3, &mut d_out, &mut work);
    assert_eq!(
        work.read_loss(&gpu),
        Err(KernelError::KeptOverCapacity {
            count: cap + 3,
            capacity: cap
        })
    );
    let got = gpu.download(&d_out.slice(0..cap * stride)).unwrap();
    assert!(
        got.iter().all(|&x| x == 0.0),
        "over capacity: rows not zeroed"
    );
    assert!(gpu.download(&work.loss.slice(0..1)).unwrap()[0].is_nan());
}

/// The whole step on the device (statistics → selection on the loss → sparse CE over the device count, g = 1/K),
/// with no host round trip until the end, against the same pipeline on the CPU.
#[test]
fn device_pipeline_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let (mut rng, _seed) = rng("device_pipeline_matches_cpu");
    let (rows, vocab, stride) = (64, 50257, 50304);
    let (logits, targets) = random_case(&mut rng, rows, vocab, stride);
    let rule = SelectRule::Var { alpha: 0.5 };
    let d_logits = gpu.upload(&logits).unwrap();
    let d_targets = gpu.upload(&targets).unwrap();
    let d_view = DeviceLogits::new(d_logits.slice(0..logits.len()), rows, vocab, stride).unwrap();
    let mut d_stats = DeviceTokenStats::new(&gpu, rows).unwrap();
    gpu.token_stats(
        &d_view,
        &d_targets.slice(0..rows),
        DEFAULT_IGNORE_INDEX,
        &mut d_stats,
    )
    .unwrap();
    let mut d_sel = DeviceSelection::new(&gpu, rows).unwrap();
    let (loss_view, valid_view) = (d_stats.loss.slice(0..rows), d_stats.valid.slice(0..rows));
    gpu.select(&loss_view, Some(&valid_view), rule, &mut d_sel)
        .unwrap();
    // NaN everywhere first: rows [0, K) must get gradients, rows [K, rows) zeros.
    let mut d_out = gpu.upload(&vec![f32::NAN; rows * stride]).unwrap();
    let mut work = DeviceSparseCe::new(&gpu, rows).unwrap();
    {
        let mut out_view = d_out.slice_mut(0..rows * stride);
        let lse_view = d_stats.lse.slice(0..rows);
        gpu.sparse_ce_selected(
            &d_view,
            &d_targets.slice(0..rows),
            &lse_view,
            &d_sel,
            GradScale::OverCount(1.0),
            &mut out_view,
            stride,
            &mut work,
        )
        .unwrap();
    }
    d_stats.check_status(&gpu).unwrap();

    // CPU reference: statistics on the CPU, but the selection runs on the GPU's losses (selection parity is tested
    // exactly above; this avoids a boundary flip between two losses that differ by f32 rounding only).
    let view = LogitsView::new(&logits, rows, vocab, stride).unwrap();
    let mut stats = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
    let gpu_losses = gpu.download(&d_stats.loss.slice(0..rows)).unwrap();
    let mut sel = Selection::new();
    select(&gpu_losses, Some(&stats.valid), rule, &mut sel).unwrap();
    let k = sel.kept();
    let mut cpu_out = vec![0.0f32; k * stride];
    let cpu_loss = sparse_ce(
        &view,
        &targets,
        &stats.lse,
        &sel.indices,
        1.0 / k as f32,
        &mut cpu_out,
        stride,
    )
    .unwrap();

    let summary = d_sel.summary(&gpu).unwrap();
    assert_eq!(
        (summary.count, summary.k, summary.threshold.to_bits()),
        (k, sel.k, sel.threshold.to_bits())
    );
    let gpu_loss = work.read_loss(&gpu).unwrap();
    assert!(
        close(gpu_loss, cpu_loss, 1e-6, 1e-5),
        "loss {gpu_loss} vs {cpu_loss}"
    );
    let gpu_out = gpu.download(&d_out.slice(0..rows * stride)).unwrap();
    let (atol, rtol) = grad_tolerance(1.0 / k as f32, false);
    assert_close(
        "pipeline dlogits",
        &gpu_out[..k * stride],
        &cpu_out,
        atol,
        rtol,
    );
    assert!(
        gpu_out[k * stride..].iter().all(|&x| x == 0.0),
        "pipeline: rows past K not zeroed"
    );
}

/// One stream, no cudarc event tracking; empty uploads are real one-element allocations.
#[test]
fn backend_setup_and_empty_uploads() {
    let Some(gpu) = gpu() else { return };
    assert!(
        !gpu.context().is_event_tracking(),
        "CudaKernels::new should turn cudarc's multi-stream event tracking off"
    );
    let empty = gpu.upload::<f32>(&[]).unwrap();
    assert_eq!(empty.len(), 1);
    assert_eq!(gpu.download(&empty.slice(0..0)).unwrap(), Vec::<f32>::new());
    // An empty batch through the device API: nothing launched, no error.
    let d_targets = gpu.upload::<i32>(&[]).unwrap();
    let d_logits = gpu.upload::<f32>(&[]).unwrap();
    let view = DeviceLogits::new(d_logits.slice(0..0), 0, 4, 4).unwrap();
    let mut stats = DeviceTokenStats::new(&gpu, 0).unwrap();
    gpu.token_stats(
        &view,
        &d_targets.slice(0..0),
        DEFAULT_IGNORE_INDEX,
        &mut stats,
    )
    .unwrap();
    stats.check_status(&gpu).unwrap();
}

/// After a selection, `indices` past the count hold `NO_ROW`, including entries a previous, larger selection
/// wrote; on a device-side error every entry is `NO_ROW`.
#[test]
fn select_indices_past_the_count_are_no_row() {
    let Some(gpu) = gpu() else { return };
    let (mut rng, _seed) = rng("select_indices_past_the_count_are_no_row");
    let cap = 5000;
    let mut sel = DeviceSelection::new(&gpu, cap).unwrap();
    for n in [cap, 3000, 17, 1] {
        let scores: Vec<f32> = (0..n).map(|_| rng.gen_range(0.0f32..4.0)).collect();
        let d_scores = gpu.upload(&scores).unwrap();
        gpu.select(
            &d_scores.slice(0..n),
            None,
            SelectRule::Var { alpha: 0.5 },
            &mut sel,
        )
        .unwrap();
        let mut cpu = Selection::new();
        select(&scores, None, SelectRule::Var { alpha: 0.5 }, &mut cpu).unwrap();
        let indices = gpu.download(&sel.indices.slice(0..cap)).unwrap();
        let count = sel.summary(&gpu).unwrap().count;
        assert_eq!(&indices[..count], &cpu.indices[..], "n {n}: kept indices");
        assert!(
            indices[count..].iter().all(|&i| i == NO_ROW),
            "n {n}: stale entries past the count {count}"
        );
    }
    let d_nan = gpu.upload(&[1.0f32, f32::NAN, 2.0]).unwrap();
    gpu.select(
        &d_nan.slice(0..3),
        None,
        SelectRule::Var { alpha: 0.5 },
        &mut sel,
    )
    .unwrap();
    assert_eq!(sel.summary(&gpu), Err(KernelError::NanScore { row: 1 }));
    let indices = gpu.download(&sel.indices.slice(0..cap)).unwrap();
    assert!(indices.iter().all(|&i| i == NO_ROW), "after an error");
}

/// Views that start at an element offset (not 16-byte aligned) for the logits and the gradients, f32 and bf16.
#[test]
fn unaligned_view_offsets_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (mut rng, _seed) = rng("unaligned_view_offsets_match_cpu");
    let (rows, vocab, stride) = (7usize, 50257usize, 50264usize);
    let (logits, mut targets) = random_case(&mut rng, rows, vocab, stride);
    targets.iter_mut().for_each(|t| *t = (*t).max(0));
    let view = LogitsView::new(&logits, rows, vocab, stride).unwrap();
    let mut stats = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
    let kept: Vec<u32> = vec![6, 1, 4, 1];
    let k = kept.len();
    let mut cpu_out = vec![0.0f32; k * vocab];
    let cpu_loss = sparse_ce(
        &view,
        &targets,
        &stats.lse,
        &kept,
        0.25,
        &mut cpu_out,
        vocab,
    )
    .unwrap();
    let d_targets = gpu.upload(&targets).unwrap();
    let d_lse = gpu.upload(&stats.lse).unwrap();
    let d_kept = gpu.upload(&kept).unwrap();
    let d_count = gpu.upload(&[k as u32]).unwrap();
    for (in_off, out_off) in [(1usize, 3usize), (3, 1), (5, 0), (0, 7)] {
        let label = format!("input offset {in_off}, output offset {out_off}");
        let mut padded = vec![f32::NAN; in_off];
        padded.extend_from_slice(&logits);
        let d_logits = gpu.upload(&padded).unwrap();
        let d_view = DeviceLogits::new(
            d_logits.slice(in_off..in_off + logits.len()),
            rows,
            vocab,
            stride,
        )
        .unwrap();
        let mut d_stats = DeviceTokenStats::new(&gpu, rows).unwrap();
        gpu.token_stats(
            &d_view,
            &d_targets.slice(0..rows),
            DEFAULT_IGNORE_INDEX,
            &mut d_stats,
        )
        .unwrap();
        let mut g = TokenStats::new();
        d_stats.to_host(&gpu, &mut g).unwrap();
        compare_stats(&label, &g, &stats);

        let mut d_out = gpu.upload(&vec![f32::NAN; out_off + k * vocab]).unwrap();
        let mut work = DeviceSparseCe::new(&gpu, k).unwrap();
        {
            let mut out_view = d_out.slice_mut(out_off..out_off + k * vocab);
            gpu.sparse_ce(
                SparseCeArgs {
                    logits: &d_view,
                    targets: &d_targets.slice(0..rows),
                    lse: &d_lse.slice(0..rows),
                    kept: &d_kept.slice(0..k),
                    count: &d_count.slice(0..1),
                    dlogits: &mut out_view,
                    out_stride: vocab,
                    scale: GradScale::Constant(0.25),
                },
                &mut work,
            )
            .unwrap();
        }
        let loss = work.read_loss(&gpu).unwrap();
        assert!(
            close(loss, cpu_loss, 1e-6, 1e-5),
            "{label}: loss {loss} vs {cpu_loss}"
        );
        let got = gpu
            .download(&d_out.slice(out_off..out_off + k * vocab))
            .unwrap();
        let (atol, rtol) = grad_tolerance(0.25, false);
        assert_close(&format!("{label} dlogits"), &got, &cpu_out, atol, rtol);

        // bf16 logits at an odd element offset, bf16 gradients at another.
        let mut padded16 = vec![bf16::NAN; in_off];
        padded16.extend(logits.iter().map(|&x| bf16::from_f32(x)));
        let logits16: Vec<bf16> = padded16[in_off..].to_vec();
        let view16 = LogitsView::new(&logits16, rows, vocab, stride).unwrap();
        let mut stats16 = TokenStats::new();
        token_stats(&view16, &targets, DEFAULT_IGNORE_INDEX, &mut stats16).unwrap();
        let mut cpu16 = vec![0.0f32; k * vocab];
        sparse_ce(
            &view16,
            &targets,
            &stats16.lse,
            &kept,
            0.25,
            &mut cpu16,
            vocab,
        )
        .unwrap();
        let d_logits16 = gpu.upload(&padded16).unwrap();
        let d_view16 = DeviceLogits::new(
            d_logits16.slice(in_off..in_off + logits.len()),
            rows,
            vocab,
            stride,
        )
        .unwrap();
        gpu.token_stats(
            &d_view16,
            &d_targets.slice(0..rows),
            DEFAULT_IGNORE_INDEX,
            &mut d_stats,
        )
        .unwrap();
        d_stats.to_host(&gpu, &mut g).unwrap();
        compare_stats(&format!("bf16 {label}"), &g, &stats16);
        let d_lse16 = gpu.upload(&stats16.lse).unwrap();
        let mut d_out16 = gpu.upload(&vec![bf16::NAN; out_off + k * vocab]).unwrap();
        {
            let mut out_view = d_out16.slice_mut(out_off..out_off + k * vocab);
            gpu.sparse_ce(
                SparseCeArgs {
                    logits: &d_view16,
                    targets: &d_targets.slice(0..rows),
                    lse: &d_lse16.slice(0..rows),
                    kept: &d_kept.slice(0..k),
                    count: &d_count.slice(0..1),
                    dlogits: &mut out_view,
                    out_stride: vocab,
                    scale: GradScale::Constant(0.25),
                },
                &mut work,
            )
            .unwrap();
        }
        work.check_status(&gpu).unwrap();
        let got: Vec<f32> = gpu
            .download(&d_out16.slice(out_off..out_off + k * vocab))
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let (atol, rtol) = grad_tolerance(0.25, true);
        assert_close(
            &format!("bf16 {label} dlogits bf16"),
            &got,
            &cpu16,
            atol,
            rtol,
        );
    }
}

/// Row offsets past 2³¹ elements (`N·stride > 2³¹`): 64-bit index arithmetic in both kernels. Needs ≈ 4.3 GB of
/// GPU memory (bf16 logits); skipped with a message if that allocation fails.
#[test]
fn offsets_beyond_2_pow_31_elements() {
    let Some(gpu) = gpu() else { return };
    if quick() {
        println!("skipping: ESLM_TEST_QUICK=1 (4 GB of logits)");
        return;
    }
    let (mut rng, _seed) = rng("offsets_beyond_2_pow_31_elements");
    let (rows, vocab, stride) = (3usize, 50257usize, (1usize << 30) + 64);
    let len = (rows - 1) * stride + vocab;
    assert!(len > 1 << 31);
    let mut d_logits = match gpu.zeros::<bf16>(len) {
        Ok(d) => d,
        Err(e) => {
            println!("skipping: cannot allocate {len} bf16 logits ({e})");
            return;
        }
    };
    // The same rows compactly on the host.
    let (compact, mut targets) = random_case(&mut rng, rows, vocab, vocab);
    targets.iter_mut().for_each(|t| *t = (*t).max(0));
    let compact16: Vec<bf16> = compact.iter().map(|&x| bf16::from_f32(x)).collect();
    for r in 0..rows {
        let mut dst = d_logits.slice_mut(r * stride..r * stride + vocab);
        gpu.stream()
            .memcpy_htod(&compact16[r * vocab..(r + 1) * vocab], &mut dst)
            .unwrap();
    }
    let view = LogitsView::new(&compact16, rows, vocab, vocab).unwrap();
    let mut stats = TokenStats::new();
    token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
    let d_view = DeviceLogits::new(d_logits.slice(0..len), rows, vocab, stride).unwrap();
    let d_targets = gpu.upload(&targets).unwrap();
    let mut d_stats = DeviceTokenStats::new(&gpu, rows).unwrap();
    gpu.token_stats(
        &d_view,
        &d_targets.slice(0..rows),
        DEFAULT_IGNORE_INDEX,
        &mut d_stats,
    )
    .unwrap();
    let mut g = TokenStats::new();
    d_stats.to_host(&gpu, &mut g).unwrap();
    compare_stats("rows 2^30 + 64 apart", &g, &stats);

    let kept: Vec<u32> = vec![2, 0, 1];
    let mut cpu_out = vec![0.0f32; rows * vocab];
    let cpu_loss = sparse_ce(&view, &targets, &stats.lse, &kept, 1.0, &mut cpu_out, vocab).unwrap();
    let d_kept = gpu.upload(&kept).unwrap();
    let d_count = gpu.upload(&[rows as u32]).unwrap();
    let d_lse = gpu.upload(&stats.lse).unwrap();
    let mut d_out = gpu.upload(&vec![f32::NAN; rows * vocab]).unwrap();
    let mut work = DeviceSparseCe::new(&gpu, rows).unwrap();
    {
        let mut out_view = d_out.slice_mut(0..rows * vocab);
        gpu.sparse_ce(
            SparseCeArgs {
                logits: &d_view,
                targets: &d_targets.slice(0..rows),
                lse: &d_lse.slice(0..rows),
                kept: &d_kept.slice(0..rows),
                count: &d_count.slice(0..1),
                dlogits: &mut out_view,
                out_stride: vocab,
                scale: GradScale::OverCount(1.0),
            },
            &mut work,
        )
        .unwrap();
    }
    let loss = work.read_loss(&gpu).unwrap();
    let cpu_mean = cpu_loss; // scale 1 on the CPU: the loss is the mean either way
    assert!(
        close(loss, cpu_mean, 1e-6, 1e-5),
        "loss {loss} vs {cpu_mean}"
    );
    let got = gpu.download(&d_out.slice(0..rows * vocab)).unwrap();
    let want: Vec<f32> = cpu_out.iter().map(|&x| x / rows as f32).collect();
    let (atol, rtol) = grad_tolerance(1.0 / rows as f32, false);
    assert_close("dlogits rows 2^30 + 64 apart", &got, &want, atol, rtol);
}
