//! GPU vs CPU parity for the three kernel families (feature `cuda`).
//!
//! Every GPU test first probes for a CUDA driver and a GPU; without one it prints
//! `skipping: no CUDA driver (...)` and returns (so `cargo test --features cuda` passes on CPU-only machines, and
//! CI compiles these with `--no-run`). With a GPU each kernel is compared to the CPU reference on fresh random
//! inputs (the seed is printed): selection exactly (threshold, k, keep mask, indices, errors), statistics and
//! gradients to f32 / bf16 tolerances. The ptxas-report test needs no GPU and always runs.
#![cfg(feature = "cuda")]

use eslm_kernels::cuda::{
    cuda_available, cuda_probe, CudaKernels, DeviceLogits, DeviceSelection, DeviceSparseCe,
};
use eslm_kernels::cuda::{DeviceTokenStats, GradScale, PTXAS_REPORT};
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

/// A fresh seed per run, printed so a failure can be reproduced.
fn rng(test: &str) -> ChaCha8Rng {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("{test}: seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
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
    let mut rng = rng("token_stats");
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
    let mut rng = rng("select");
    for &n in &[1usize, 2, 7, 2047, 2048, 2049, 8192, 100_003] {
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

#[test]
fn sparse_ce_matches_cpu_f32_and_bf16() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("sparse_ce");
    for &(rows, vocab, stride, out_stride) in &[
        (16, 50257, 50304, 50304),
        (1, 50257, 50304, 50257),
        (9, 1001, 1001, 1003),
        (6, 3, 3, 8),
    ] {
        let (logits, mut targets) = random_case(&mut rng, rows, vocab, stride);
        for t in &mut targets {
            if *t < 0 {
                *t = 0;
            }
        }
        let view = LogitsView::new(&logits, rows, vocab, stride).unwrap();
        let mut stats = TokenStats::new();
        token_stats(&view, &targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
        // Any order, repeats allowed.
        let k = rng.gen_range(1..=rows.max(2));
        let kept: Vec<u32> = (0..k).map(|_| rng.gen_range(0..rows) as u32).collect();
        let scale = 1.0 / k as f32;
        let label = format!("rows {rows} vocab {vocab} stride {stride} out {out_stride} K {k}");

        let mut cpu_out = vec![9.0f32; k * out_stride];
        let cpu_loss = sparse_ce(
            &view,
            &targets,
            &stats.lse,
            &kept,
            scale,
            &mut cpu_out,
            out_stride,
        )
        .unwrap();
        let mut gpu_out = vec![9.0f32; k * out_stride];
        let gpu_loss = gpu
            .sparse_ce_host(
                &view,
                &targets,
                &stats.lse,
                &kept,
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
            1e-6,
            1e-5,
        );

        // bf16 gradients: the CPU's f32 result rounded to bf16, within one bf16 ulp.
        let mut gpu16 = vec![bf16::from_f32(9.0); k * out_stride];
        gpu.sparse_ce_host(
            &view, &targets, &stats.lse, &kept, scale, &mut gpu16, out_stride,
        )
        .unwrap();
        let gpu16: Vec<f32> = gpu16.iter().map(|x| x.to_f32()).collect();
        assert_close(
            &format!("{label} dlogits bf16"),
            &gpu16,
            &cpu_out,
            1e-6,
            1e-2,
        );

        // bf16 logits.
        let logits16: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
        let view16 = LogitsView::new(&logits16, rows, vocab, stride).unwrap();
        token_stats(&view16, &targets, DEFAULT_IGNORE_INDEX, &mut stats).unwrap();
        let cpu_loss = sparse_ce(
            &view16,
            &targets,
            &stats.lse,
            &kept,
            scale,
            &mut cpu_out,
            out_stride,
        )
        .unwrap();
        let gpu_loss = gpu
            .sparse_ce_host(
                &view16,
                &targets,
                &stats.lse,
                &kept,
                scale,
                &mut gpu_out,
                out_stride,
            )
            .unwrap();
        assert!(
            close(gpu_loss, cpu_loss, 1e-6, 1e-5),
            "bf16 {label}: loss {gpu_loss} vs {cpu_loss}"
        );
        assert_close(
            &format!("bf16 {label} dlogits"),
            &gpu_out,
            &cpu_out,
            1e-6,
            1e-5,
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

/// The whole step on the device (statistics → selection on the loss → sparse CE over the device count, g = 1/K),
/// with no host round trip until the end, against the same pipeline on the CPU.
#[test]
fn device_pipeline_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("pipeline");
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
    let mut d_out = gpu.zeros::<f32>(rows * stride).unwrap();
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
    let gpu_out = gpu.download(&d_out.slice(0..k * stride)).unwrap();
    assert_close("pipeline dlogits", &gpu_out, &cpu_out, 1e-6, 1e-5);
}
