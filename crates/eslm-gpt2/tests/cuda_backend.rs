//! The CUDA backend against the CPU backend (feature `cuda`). Every test opens GPU 0 and **skips with a printed
//! message** (`skipping: no CUDA device for <test> (...)`; shown with `--nocapture`) where no CUDA driver loads (CI, the development machine); `scripts/gpu-check.sh` runs them on a GPU.
//!
//! Each op runs through one generic function on both backends ([`Backend`] is the seam) on random inputs, and the
//! results are compared element by element with `|gpu − cpu| ≤ abs + rel·|cpu|`. Stated tolerances (f32 on both
//! sides; the GPU sums in other orders, uses FMA and `tanhf`/`expf` instead of the CPU's approximations):
//! - elementwise and row-wise ops (encoder, GELU, residual, rows, scale, AdamW): abs 1e-6, rel 1e-5;
//! - reductions over a row or a column (layer norm, softmax, bias gradients): abs 1e-5, rel 1e-4;
//! - GEMM-based ops (linear, LM head, attention): abs 1e-4, rel 1e-3 (sums of up to a few hundred products);
//! - the loss head (token statistics, sparse CE): abs 1e-5, rel 1e-4; selection: identical;
//! - a whole training step (loss, kept rows, gradients, updated parameters): abs 1e-4, rel 1e-3, kept rows
//!   identical.
//!
//! Ragged sizes: V = 50257 in the padded stride Vp = 50304, N = 1, and row sets with K = 0, 1, a random subset,
//! and every row (as `Rows` and as `All`). Seeds are fixed (override with `ESLM_TEST_SEED`) and printed on failure.
#![cfg(feature = "cuda")]

use eslm_gpt2::backend::CollectiveOp;
use eslm_gpt2::backend::{
    AdamWSlices, Affine, Embeddings, HeadDims, KeptTargets, LinearDims, LnSaved, LnStats, Logits,
    OwnStat, RowGrad, RowScores,
};
use eslm_gpt2::ops::attention::AttnDims;
use eslm_gpt2::optim::{AdamWConfig, AdamWStep};
use eslm_gpt2::{Backend, Cpu, Cuda, Gpt2, GptConfig, Keep, MatmulPrecision, RowSet, ScoreSource};
use eslm_kernels::select::{SelectRule, Selection};
use eslm_kernels::token_stats::TokenStats;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// GPU 0, or `None` with a printed reason (no driver, no GPU): the test then passes without checking anything.
fn gpu(test: &str) -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("skipping: no CUDA device for {test} ({e})");
            None
        }
    }
}

fn seed() -> u64 {
    std::env::var("ESLM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_601)
}

fn rng(salt: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed() ^ salt)
}

fn randn(r: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| (r.gen::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

#[track_caller]
fn close(what: &str, gpu: &[f32], cpu: &[f32], abs: f32, rel: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= abs + rel * c.abs() || (g.is_nan() && c.is_nan()),
            "{what}[{i}]: gpu {g} vs cpu {c} (abs {abs}, rel {rel}; seed {}, ESLM_TEST_SEED overrides)",
            seed()
        );
    }
}

fn up<B: Backend>(be: &mut B, x: &[f32]) -> B::Buf {
    let mut b = be.alloc(x.len());
    be.upload(B::view_mut(&mut b), x);
    b
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    let mut v = vec![0.0; B::len(b)];
    be.download(B::view(b), &mut v);
    v
}

/// The row sets every row-sparse op is checked on (over `n` rows).
fn row_sets(n: usize, r: &mut ChaCha8Rng) -> Vec<RowSet> {
    let mut some: Vec<u32> = (0..n as u32).filter(|_| r.gen_bool(0.4)).collect();
    if some.is_empty() {
        some.push((n / 2) as u32);
    }
    vec![
        RowSet::All,
        RowSet::Rows(vec![]),
        RowSet::Rows(vec![(n - 1) as u32]),
        RowSet::Rows(some),
        RowSet::Rows((0..n as u32).collect()),
    ]
}

// ---- generic runners: one op on any backend, host in, host out ----

#[allow(clippy::too_many_arguments)]
fn run_encoder<B: Backend>(
    be: &mut B,
    tokens: &[u32],
    wte: &[f32],
    wpe: &[f32],
    dout: &[f32],
    rows: &RowSet,
    t: usize,
    c: usize,
) -> [Vec<f32>; 3] {
    let n = tokens.len();
    let mut tok = be.alloc_tokens(n);
    be.upload_tokens(&mut tok, tokens);
    let (wte_b, wpe_b) = (up(be, wte), up(be, wpe));
    let mut out = be.alloc(n * c);
    let emb = Embeddings {
        wte: B::view(&wte_b),
        wpe: B::view(&wpe_b),
    };
    be.encoder_forward(B::view_mut(&mut out), &tok, emb, n, t, c);
    let (mut dwte, mut dwpe) = (up(be, &vec![0.5; wte.len()]), be.alloc(wpe.len()));
    let g = up(be, dout);
    be.encoder_backward(
        Embeddings {
            wte: B::view_mut(&mut dwte),
            wpe: B::view_mut(&mut dwpe),
        },
        RowGrad {
            g: B::view(&g),
            rows,
            n,
        },
        &tok,
        t,
        c,
    );
    [down(be, &out), down(be, &dwte), down(be, &dwpe)]
}

#[test]
fn encoder_matches_cpu() {
    let Some(mut gpu) = gpu("encoder_matches_cpu") else {
        return;
    };
    let mut r = rng(1);
    let (b, t, c, v) = (3, 7, 12, 13);
    let n = b * t;
    let tokens: Vec<u32> = (0..n).map(|_| r.gen_range(0..v as u32)).collect();
    let (wte, wpe) = (randn(&mut r, v * c, 1.0), randn(&mut r, t * c, 1.0));
    for rows in row_sets(n, &mut r) {
        let dout = randn(&mut r, rows.count(n) * c, 1.0);
        let want = run_encoder(&mut Cpu::new(), &tokens, &wte, &wpe, &dout, &rows, t, c);
        let got = run_encoder(&mut gpu, &tokens, &wte, &wpe, &dout, &rows, t, c);
        for (i, name) in ["out", "dwte", "dwpe"].iter().enumerate() {
            close(name, &got[i], &want[i], 1e-6, 1e-5);
        }
    }
    gpu.status().unwrap();
}

fn run_layernorm<B: Backend>(
    be: &mut B,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    dy: &[f32],
    rows: &RowSet,
    c: usize,
) -> [Vec<f32>; 6] {
    let n = x.len() / c;
    let (xb, wb, bb) = (up(be, x), up(be, w), up(be, bias));
    let (mut y, mut mean, mut rstd) = (be.alloc(n * c), be.alloc(n), be.alloc(n));
    be.layernorm_forward(
        B::view_mut(&mut y),
        LnStats {
            mean: B::view_mut(&mut mean),
            rstd: B::view_mut(&mut rstd),
        },
        B::view(&xb),
        Affine {
            w: B::view(&wb),
            b: B::view(&bb),
        },
        n,
        c,
    );
    let k = rows.count(n);
    let (mut dx, mut dw, mut db) = (be.alloc(k * c), up(be, &vec![0.25; c]), be.alloc(c));
    let g = up(be, dy);
    be.layernorm_backward(
        B::view_mut(&mut dx),
        Affine {
            w: B::view_mut(&mut dw),
            b: B::view_mut(&mut db),
        },
        RowGrad {
            g: B::view(&g),
            rows,
            n,
        },
        LnSaved {
            x: B::view(&xb),
            stats: LnStats {
                mean: B::view(&mean),
                rstd: B::view(&rstd),
            },
            w: B::view(&wb),
        },
        c,
    );
    [
        down(be, &y),
        down(be, &mean),
        down(be, &rstd),
        down(be, &dx),
        down(be, &dw),
        down(be, &db),
    ]
}

#[test]
fn layernorm_matches_cpu() {
    let Some(mut gpu) = gpu("layernorm_matches_cpu") else {
        return;
    };
    let mut r = rng(2);
    for (n, c) in [(1, 8), (37, 48), (130, 768)] {
        let x = randn(&mut r, n * c, 2.0);
        let (w, bias) = (randn(&mut r, c, 1.0), randn(&mut r, c, 0.5));
        for rows in row_sets(n, &mut r) {
            let dy = randn(&mut r, rows.count(n) * c, 1.0);
            let want = run_layernorm(&mut Cpu::new(), &x, &w, &bias, &dy, &rows, c);
            let got = run_layernorm(&mut gpu, &x, &w, &bias, &dy, &rows, c);
            for (i, name) in ["y", "mean", "rstd", "dx", "dw", "db"].iter().enumerate() {
                close(name, &got[i], &want[i], 1e-5, 1e-4);
            }
        }
    }
    gpu.status().unwrap();
}

fn run_linear<B: Backend>(
    be: &mut B,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    dy: &[f32],
    rows: &RowSet,
    d: LinearDims,
) -> [Vec<f32>; 4] {
    let n = x.len() / d.d_in;
    let (xb, wb, bb) = (up(be, x), up(be, w), up(be, bias));
    let mut y = be.alloc(n * d.d_out);
    be.linear_forward(
        B::view_mut(&mut y),
        B::view(&xb),
        Affine {
            w: B::view(&wb),
            b: B::view(&bb),
        },
        n,
        d,
    );
    let k = rows.count(n);
    let mut dx = be.alloc(k * d.d_in);
    let (mut dw, mut db) = (up(be, &vec![0.125; w.len()]), be.alloc(d.d_out));
    let g = up(be, dy);
    be.linear_backward(
        Some(B::view_mut(&mut dx)),
        Affine {
            w: B::view_mut(&mut dw),
            b: B::view_mut(&mut db),
        },
        RowGrad {
            g: B::view(&g),
            rows,
            n,
        },
        B::view(&xb),
        B::view(&wb),
        d,
    );
    [down(be, &y), down(be, &dx), down(be, &dw), down(be, &db)]
}

/// The forward linear layer with the bias in cuBLASLt's epilogue (on) and as a separate kernel (off).
#[test]
fn linear_matches_cpu() {
    let Some(mut gpu) = gpu("linear_matches_cpu") else {
        return;
    };
    let mut r = rng(3);
    for fused in [true, false] {
        gpu.set_fused_epilogues(fused);
        for (n, d_in, d_out) in [(1, 5, 3), (29, 16, 48), (70, 64, 33)] {
            let d = LinearDims { d_in, d_out };
            let x = randn(&mut r, n * d_in, 1.0);
            let (w, bias) = (randn(&mut r, d_out * d_in, 0.3), randn(&mut r, d_out, 0.3));
            for rows in row_sets(n, &mut r) {
                let dy = randn(&mut r, rows.count(n) * d_out, 1.0);
                let want = run_linear(&mut Cpu::new(), &x, &w, &bias, &dy, &rows, d);
                let got = run_linear(&mut gpu, &x, &w, &bias, &dy, &rows, d);
                for (i, name) in ["y", "dx", "dw", "db"].iter().enumerate() {
                    close(
                        &format!("{name} (fused {fused})"),
                        &got[i],
                        &want[i],
                        1e-4,
                        1e-3,
                    );
                }
            }
        }
    }
    gpu.status().unwrap();
}

/// `linear_gelu_forward` of views starting `offset` floats into their buffers: `[pre, post]`.
fn run_linear_gelu<B: Backend>(
    be: &mut B,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    d: LinearDims,
    offset: usize,
) -> [Vec<f32>; 2] {
    let n = x.len() / d.d_in;
    let pad = |v: &[f32]| [vec![0.5; offset], v.to_vec()].concat();
    let (xb, wb, bb) = (up(be, &pad(x)), up(be, &pad(w)), up(be, &pad(bias)));
    let len = n * d.d_out;
    let (mut pre, mut post) = (be.alloc(offset + len), be.alloc(offset + len));
    let at = |b| B::slice(B::view(b), offset..offset + B::len(b) - offset);
    be.linear_gelu_forward(
        B::slice_mut(B::view_mut(&mut pre), offset..offset + len),
        B::slice_mut(B::view_mut(&mut post), offset..offset + len),
        at(&xb),
        Affine {
            w: at(&wb),
            b: at(&bb),
        },
        n,
        d,
    );
    [
        down(be, &pre)[offset..].to_vec(),
        down(be, &post)[offset..].to_vec(),
    ]
}

/// The MLP's first layer and GELU: cuBLASLt's `GELU_AUX_BIAS` epilogue (widths that are multiples of 8, aligned
/// outputs) and the fallback (width 33, or outputs 4 bytes off 16-byte alignment), views at aligned and unaligned
/// offsets, each precision, against the CPU's linear then tanh GELU.
#[test]
fn linear_gelu_forward_matches_cpu() {
    let Some(mut gpu) = gpu("linear_gelu_forward_matches_cpu") else {
        return;
    };
    let mut r = rng(17);
    for (n, d_in, d_out) in [(29, 16, 48), (70, 64, 33), (64, 768, 3072)] {
        let d = LinearDims { d_in, d_out };
        let x = randn(&mut r, n * d_in, 1.0);
        let (w, bias) = (randn(&mut r, d_out * d_in, 0.1), randn(&mut r, d_out, 0.3));
        let want = run_linear_gelu(&mut Cpu::new(), &x, &w, &bias, d, 0);
        let scale = want[0].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (precision, rel) in [
            (MatmulPrecision::F32, 1e-5f32),
            (MatmulPrecision::Tf32, 4e-3),
            (MatmulPrecision::Bf16, 3e-2),
        ] {
            gpu.set_matmul_precision(precision).unwrap();
            for (fused, offset) in [(true, 0), (true, 1), (true, 4), (false, 0)] {
                gpu.set_fused_epilogues(fused);
                let got = run_linear_gelu(&mut gpu, &x, &w, &bias, d, offset);
                for (i, name) in ["pre", "post"].iter().enumerate() {
                    let worst = got[i]
                        .iter()
                        .zip(&want[i])
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        worst <= rel * scale,
                        "{name} {n}x{d_in}->{d_out} {precision:?} fused {fused} offset {offset}: worst error \
                         {worst} vs {} allowed",
                        rel * scale
                    );
                }
            }
        }
    }
    gpu.set_matmul_precision(MatmulPrecision::F32).unwrap();
    gpu.set_fused_epilogues(true);
    gpu.status().unwrap();
}

fn run_lm_head<B: Backend>(
    be: &mut B,
    h: &[f32],
    wte: &[f32],
    dz: &[f32],
    rows: &RowSet,
    d: HeadDims,
) -> [Vec<f32>; 3] {
    let n = h.len() / d.c;
    let (hb, wb) = (up(be, h), up(be, wte));
    let mut z = up(be, &vec![7.0; n * d.vp]); // padded columns must stay untouched
    be.lm_head_forward(B::view_mut(&mut z), B::view(&hb), B::view(&wb), n, d);
    let k = rows.count(n);
    let (mut dh, mut dwte, g) = (be.alloc(k * d.c), be.alloc(wte.len()), up(be, dz));
    be.lm_head_backward(
        B::view_mut(&mut dh),
        B::view_mut(&mut dwte),
        RowGrad {
            g: B::view(&g),
            rows,
            n,
        },
        B::view(&hb),
        B::view(&wb),
        d,
    );
    [down(be, &z), down(be, &dh), down(be, &dwte)]
}

#[test]
fn lm_head_matches_cpu_with_the_gpt2_vocabulary() {
    let Some(mut gpu) = gpu("lm_head_matches_cpu_with_the_gpt2_vocabulary") else {
        return;
    };
    let mut r = rng(4);
    let d = HeadDims {
        c: 16,
        v: 50257,
        vp: 50304,
    };
    let mut wte = randn(&mut r, d.vp * d.c, 0.1);
    wte[d.v * d.c..].iter_mut().for_each(|x| *x = 0.0);
    for n in [1usize, 5] {
        let h = randn(&mut r, n * d.c, 1.0);
        for rows in row_sets(n, &mut r) {
            let mut dz = randn(&mut r, rows.count(n) * d.vp, 1e-3);
            for row in dz.chunks_mut(d.vp) {
                row[d.v..].iter_mut().for_each(|x| *x = 0.0);
            }
            let want = run_lm_head(&mut Cpu::new(), &h, &wte, &dz, &rows, d);
            let got = run_lm_head(&mut gpu, &h, &wte, &dz, &rows, d);
            for (i, name) in ["z", "dh", "dwte"].iter().enumerate() {
                close(name, &got[i], &want[i], 1e-4, 1e-3);
            }
        }
    }
    gpu.status().unwrap();
}

fn run_gelu<B: Backend>(
    be: &mut B,
    x: &[f32],
    dy: &[f32],
    rows: &RowSet,
    width: usize,
) -> [Vec<f32>; 2] {
    let n = x.len() / width;
    let xb = up(be, x);
    let mut y = be.alloc(x.len());
    be.gelu_forward(B::view_mut(&mut y), B::view(&xb));
    let mut dx = be.alloc(rows.count(n) * width);
    let g = up(be, dy);
    be.gelu_backward(
        B::view_mut(&mut dx),
        RowGrad {
            g: B::view(&g),
            rows,
            n,
        },
        B::view(&xb),
        width,
    );
    [down(be, &y), down(be, &dx)]
}

/// The tensor-core precisions against the CPU's f32: the linear op's forward and backward (every GEMM shape the
/// layers use) within what rounding the operands to 10 (TF32) or 8 (bf16) mantissa bits allows, relative to the
/// largest magnitude of each output; then back to exact f32.
#[test]
fn tf32_and_bf16_products_match_cpu_within_their_precision() {
    let Some(mut gpu) = gpu("tf32_and_bf16_products_match_cpu_within_their_precision") else {
        return;
    };
    let mut r = rng(13);
    let (n, d_in, d_out) = (70, 256, 96);
    let d = LinearDims { d_in, d_out };
    let x = randn(&mut r, n * d_in, 1.0);
    let (w, bias) = (randn(&mut r, d_out * d_in, 0.3), randn(&mut r, d_out, 0.3));
    let dy = randn(&mut r, n * d_out, 1.0);
    let want = run_linear(&mut Cpu::new(), &x, &w, &bias, &dy, &RowSet::All, d);
    for (precision, rel) in [
        (MatmulPrecision::Tf32, 4e-3f32),
        (MatmulPrecision::Bf16, 3e-2),
    ] {
        gpu.set_matmul_precision(precision).unwrap();
        let got = run_linear(&mut gpu, &x, &w, &bias, &dy, &RowSet::All, d);
        for (i, name) in ["y", "dx", "dw", "db"].iter().enumerate() {
            let scale = want[i].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = got[i]
                .iter()
                .zip(&want[i])
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= rel * scale,
                "{precision:?} {name}: worst error {worst} vs {} allowed",
                rel * scale
            );
        }
    }
    gpu.set_matmul_precision(MatmulPrecision::F32).unwrap();
    let got = run_linear(&mut gpu, &x, &w, &bias, &dy, &RowSet::All, d);
    for (i, name) in ["y", "dx", "dw", "db"].iter().enumerate() {
        close(name, &got[i], &want[i], 1e-4, 1e-3);
    }
    gpu.status().unwrap();
}

#[test]
fn gelu_matches_cpu() {
    let Some(mut gpu) = gpu("gelu_matches_cpu") else {
        return;
    };
    let mut r = rng(5);
    let (n, width) = (23, 40);
    let x = randn(&mut r, n * width, 6.0);
    for rows in row_sets(n, &mut r) {
        let dy = randn(&mut r, rows.count(n) * width, 1.0);
        let want = run_gelu(&mut Cpu::new(), &x, &dy, &rows, width);
        let got = run_gelu(&mut gpu, &x, &dy, &rows, width);
        // The CPU's rational tanh differs from tanhf by < 1e-6 (absolute).
        close("gelu y", &got[0], &want[0], 1e-5, 1e-5);
        close("gelu dx", &got[1], &want[1], 1e-5, 1e-5);
    }
    gpu.status().unwrap();
}

fn run_attention<B: Backend>(
    be: &mut B,
    qkv: &[f32],
    dy: &[f32],
    rows: &RowSet,
    d: AttnDims,
) -> [Vec<f32>; 3] {
    let AttnDims { b, t, c, nh } = d;
    let qb = up(be, qkv);
    let (mut y, mut att) = (be.alloc(b * t * c), be.alloc(b * nh * t * t));
    be.attention_forward(B::view_mut(&mut y), B::view_mut(&mut att), B::view(&qb), d);
    let mut dqkv = up(be, &vec![3.0; b * t * 3 * c]); // must be overwritten entirely
    let g = up(be, dy);
    be.attention_backward(
        B::view_mut(&mut dqkv),
        RowGrad {
            g: B::view(&g),
            rows,
            n: b * t,
        },
        B::view(&qb),
        B::view(&att),
        d,
    );
    [down(be, &y), down(be, &att), down(be, &dqkv)]
}

#[test]
fn attention_matches_cpu() {
    let Some(mut gpu) = gpu("attention_matches_cpu") else {
        return;
    };
    let mut r = rng(6);
    for d in [
        AttnDims {
            b: 1,
            t: 1,
            c: 8,
            nh: 2,
        },
        AttnDims {
            b: 2,
            t: 37,
            c: 24,
            nh: 3,
        },
        AttnDims {
            b: 3,
            t: 64,
            c: 32,
            nh: 4,
        },
    ] {
        let n = d.b * d.t;
        let qkv = randn(&mut r, n * 3 * d.c, 1.0);
        for rows in row_sets(n, &mut r) {
            let dy = randn(&mut r, rows.count(n) * d.c, 1.0);
            let want = run_attention(&mut Cpu::new(), &qkv, &dy, &rows, d);
            let got = run_attention(&mut gpu, &qkv, &dy, &rows, d);
            for (i, name) in ["y", "att", "dqkv"].iter().enumerate() {
                close(name, &got[i], &want[i], 1e-4, 1e-3);
            }
        }
    }
    gpu.status().unwrap();
}

fn run_rows<B: Backend>(
    be: &mut B,
    a: &[f32],
    b: &[f32],
    ga: (&RowSet, &[f32]),
    gb: (&RowSet, &[f32]),
    n: usize,
    width: usize,
) -> (Vec<Vec<f32>>, RowSet) {
    let (ab, bb) = (up(be, a), up(be, b));
    let mut out = be.alloc(a.len());
    be.residual_forward(B::view_mut(&mut out), B::view(&ab), B::view(&bb));
    let (gab, gbb) = (up(be, ga.1), up(be, gb.1));
    let mut merged = be.alloc(n * width);
    let union = be.residual_merge(
        B::view_mut(&mut merged),
        RowGrad {
            g: B::view(&gab),
            rows: ga.0,
            n,
        },
        RowGrad {
            g: B::view(&gbb),
            rows: gb.0,
            n,
        },
        width,
    );
    let k = union.count(n);
    let merged = down(be, &merged)[..k * width].to_vec();
    let mut gathered = be.alloc(ga.0.count(n) * width);
    be.gather_rows(B::view_mut(&mut gathered), B::view(&ab), ga.0, width);
    let mut scattered = up(be, b);
    be.scatter_add_rows(
        B::view_mut(&mut scattered),
        RowGrad {
            g: B::view(&gab),
            rows: ga.0,
            n,
        },
        width,
    );
    let weights: Vec<f32> = (0..ga.0.count(n)).map(|i| 0.5 + i as f32).collect();
    let mut rows_scaled = up(be, ga.1);
    be.scale_rows(B::view_mut(&mut rows_scaled), width, &weights);
    (
        vec![
            down(be, &out),
            merged,
            down(be, &gathered),
            down(be, &scattered),
            down(be, &rows_scaled),
        ],
        union,
    )
}

#[test]
fn residual_rows_and_scale_match_cpu() {
    let Some(mut gpu) = gpu("residual_rows_and_scale_match_cpu") else {
        return;
    };
    let mut r = rng(7);
    let (n, width) = (19, 12);
    let (a, b) = (randn(&mut r, n * width, 1.0), randn(&mut r, n * width, 1.0));
    let sets = row_sets(n, &mut r);
    for ra in &sets {
        for rb in &sets {
            let ga = randn(&mut r, ra.count(n) * width, 1.0);
            let gb = randn(&mut r, rb.count(n) * width, 1.0);
            let (want, wu) = run_rows(&mut Cpu::new(), &a, &b, (ra, &ga), (rb, &gb), n, width);
            let (got, gu) = run_rows(&mut gpu, &a, &b, (ra, &ga), (rb, &gb), n, width);
            assert_eq!(gu, wu, "union of {ra:?} and {rb:?}");
            let names = ["residual", "merge", "gather", "scatter_add", "scale_rows"];
            for (i, name) in names.iter().enumerate() {
                close(name, &got[i], &want[i], 1e-6, 1e-5);
            }
        }
    }
    gpu.status().unwrap();
}

fn run_optimizer<B: Backend>(
    be: &mut B,
    p: &[f32],
    g: &[f32],
    decays: bool,
) -> ([Vec<f32>; 3], f64) {
    let (mut pb, gb) = (up(be, p), up(be, g));
    let (mut m, mut v) = (up(be, &vec![0.01; p.len()]), up(be, &vec![0.02; p.len()]));
    let cfg = AdamWConfig::default();
    for step in 1..=3 {
        let s = AdamWStep::new(&cfg, 3e-3, step);
        be.adamw(
            AdamWSlices {
                p: B::view_mut(&mut pb),
                g: B::view(&gb),
                m: B::view_mut(&mut m),
                v: B::view_mut(&mut v),
            },
            decays,
            &s,
        );
    }
    let ss = be.sum_squares(B::view(&gb));
    ([down(be, &pb), down(be, &m), down(be, &v)], ss)
}

#[test]
fn adamw_and_sum_squares_match_cpu() {
    let Some(mut gpu) = gpu("adamw_and_sum_squares_match_cpu") else {
        return;
    };
    let mut r = rng(8);
    for len in [1usize, 1000, 300_001] {
        let (p, g) = (randn(&mut r, len, 1.0), randn(&mut r, len, 1e-2));
        for decays in [false, true] {
            let (want, ss_cpu) = run_optimizer(&mut Cpu::new(), &p, &g, decays);
            let (got, ss_gpu) = run_optimizer(&mut gpu, &p, &g, decays);
            for (i, name) in ["p", "m", "v"].iter().enumerate() {
                close(name, &got[i], &want[i], 1e-6, 1e-5);
            }
            assert!(
                (ss_gpu - ss_cpu).abs() <= 1e-12 * ss_cpu.abs().max(1e-30),
                "sum of squares {ss_gpu} vs {ss_cpu}"
            );
            // Reproducible: the same buffer twice gives the same bits.
            let gb = up(&mut gpu, &g);
            assert_eq!(
                gpu.sum_squares(Cuda::view(&gb)).to_bits(),
                gpu.sum_squares(Cuda::view(&gb)).to_bits()
            );
        }
    }
    gpu.status().unwrap();
}

#[test]
fn nccl_collectives_on_one_rank_keep_the_buffer() {
    let Some(mut gpu) = gpu("nccl_collectives_on_one_rank_keep_the_buffer") else {
        return;
    };
    let one = eslm_collective::SingleProcess;
    if let Err(e) = gpu.connect_nccl(&one) {
        println!(
            "skipping: NCCL not available for nccl_collectives_on_one_rank_keep_the_buffer ({e})"
        );
        return;
    }
    let mut r = rng(11);
    for len in [1usize, 1000, 300_001] {
        let x = randn(&mut r, len, 1.0);
        for op in [
            CollectiveOp::AllReduceSum,
            CollectiveOp::ReduceScatterSum,
            CollectiveOp::AllGather,
        ] {
            let mut b = up(&mut gpu, &x);
            gpu.collective(op, Cuda::view_mut(&mut b), &one).unwrap();
            assert_eq!(down(&gpu, &b), x, "{op:?} over one rank, {len} values");
        }
    }
    gpu.status().unwrap();
}

/// Token statistics, selection and sparse CE of one logits matrix. `own`: the selection ranks the backend's own
/// loss statistic and the sparse CE reads its own kept list (on the GPU: the device copies); otherwise both are
/// handed over as host vectors (uploaded).
fn run_loss_head<B: Backend>(
    be: &mut B,
    z: &[f32],
    targets: &[i32],
    d: HeadDims,
    rule: SelectRule,
    own: bool,
) -> (TokenStats, Selection, Vec<f32>, f32) {
    let n = targets.len();
    let zb = up(be, z);
    let mut tg = be.alloc_targets(n);
    be.upload_targets(&mut tg, targets);
    let logits = Logits {
        z: B::view(&zb),
        rows: n,
        dims: d,
    };
    let mut stats = TokenStats::default();
    be.token_stats(logits, &tg, &mut stats).unwrap();
    let mut sel = Selection::default();
    let scores = RowScores {
        host: &stats.loss,
        own: own.then_some(OwnStat::Loss),
    };
    be.select(scores, &stats.valid, rule, &mut sel).unwrap();
    let k = sel.indices.len();
    let mut dz = up(be, &vec![9.0; k * d.vp]);
    let rows = KeptTargets {
        targets: &tg,
        kept: &sel.indices,
        own_selection: own,
    };
    let loss = be
        .sparse_ce(
            logits,
            rows,
            &stats.lse,
            1.0 / k.max(1) as f32,
            B::view_mut(&mut dz),
        )
        .unwrap();
    let dz = down(be, &dz);
    (stats, sel, dz, loss)
}

#[test]
fn loss_head_matches_cpu_with_the_gpt2_vocabulary() {
    let Some(mut gpu) = gpu("loss_head_matches_cpu_with_the_gpt2_vocabulary") else {
        return;
    };
    let mut r = rng(9);
    let d = HeadDims {
        c: 1,
        v: 50257,
        vp: 50304,
    };
    for n in [1usize, 9] {
        let z = randn(&mut r, n * d.vp, 8.0);
        let targets: Vec<i32> = (0..n)
            .map(|i| {
                if i % 4 == 3 {
                    -100
                } else {
                    r.gen_range(0..d.v as i32)
                }
            })
            .collect();
        for (rule, own) in [SelectRule::Var { alpha: 0.5 }, SelectRule::TopK { k: 1 }]
            .into_iter()
            .flat_map(|rule| [(rule, true), (rule, false)])
        {
            let (ws, wsel, wdz, wl) = run_loss_head(&mut Cpu::new(), &z, &targets, d, rule, own);
            let (gs, gsel, gdz, gl) = run_loss_head(&mut gpu, &z, &targets, d, rule, own);
            close("lse", &gs.lse, &ws.lse, 1e-5, 1e-4);
            close("loss", &gs.loss, &ws.loss, 1e-5, 1e-4);
            close("entropy", &gs.entropy, &ws.entropy, 1e-5, 1e-4);
            assert_eq!(gs.valid, ws.valid);
            assert_eq!(
                gsel.indices, wsel.indices,
                "kept rows (own device copies: {own})"
            );
            assert_eq!(gsel.keep, wsel.keep, "keep mask (own: {own})");
            assert_eq!(gsel.k, wsel.k, "k (own: {own})");
            close("dlogits", &gdz, &wdz, 1e-7, 1e-4);
            close("ce loss", &[gl], &[wl], 1e-5, 1e-4);
        }
    }
    gpu.status().unwrap();
}

/// The KD gradient and mean loss of `kept` rows of `student` against `teacher` on a backend.
fn run_kd<B: Backend>(
    be: &mut B,
    z: &[f32],
    u: &[f32],
    targets: &[i32],
    kept: &[u32],
    d: HeadDims,
    kd: eslm_kernels::kd::KdParams,
) -> (Vec<f32>, f32) {
    let n = targets.len();
    let (zb, ub) = (up(be, z), up(be, u));
    let mut tg = be.alloc_targets(n);
    be.upload_targets(&mut tg, targets);
    // Pre-filled with garbage: every output element, padding included, must be written.
    let mut dz = up(be, &vec![7.0; kept.len() * d.vp]);
    let logits = |b| Logits {
        z: B::view(b),
        rows: n,
        dims: d,
    };
    let rows = KeptTargets {
        targets: &tg,
        kept,
        own_selection: false,
    };
    let loss = be
        .kd_grad(
            logits(&zb),
            logits(&ub),
            rows,
            kd,
            0.25,
            B::view_mut(&mut dz),
        )
        .unwrap();
    (down(be, &dz), loss)
}

#[test]
fn kd_matches_cpu() {
    let Some(mut gpu) = gpu("kd_matches_cpu") else {
        return;
    };
    let mut r = rng(12);
    for (n, v, vp) in [(1usize, 3usize, 4usize), (9, 1000, 1003), (5, 50257, 50304)] {
        let d = HeadDims { c: 1, v, vp };
        let mut z = randn(&mut r, n * vp, 4.0);
        let u = randn(&mut r, n * vp, 4.0);
        if n > 2 {
            z[vp + 1] = -1e30; // a (nearly) masked logit
        }
        let targets: Vec<i32> = (0..n)
            .map(|i| {
                if i % 4 == 3 {
                    -1
                } else {
                    r.gen_range(0..v as i32)
                }
            })
            .collect();
        let kept: Vec<u32> = (0..n as u32)
            .filter(|&i| targets[i as usize] >= 0)
            .collect();
        for (kd_weight, temperature) in [(0.0, 1.0), (0.5, 2.0), (1.0, 0.5)] {
            let kd = eslm_kernels::kd::KdParams {
                kd_weight,
                temperature,
            };
            let (want, want_loss) = run_kd(&mut Cpu::new(), &z, &u, &targets, &kept, d, kd);
            let (got, got_loss) = run_kd(&mut gpu, &z, &u, &targets, &kept, d, kd);
            close("kd dlogits", &got, &want, 1e-7, 1e-5);
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "KD loss {got_loss} vs {want_loss} (n {n}, V {v}, W {kd_weight}, τ {temperature})"
            );
        }
    }
    gpu.status().unwrap();
}

/// One selective training step on a model: (loss, kept rows, gradients, parameters after the update).
/// The learning rate of [`train_step`].
const LR: f32 = 1e-3;

fn train_step<B: Backend>(
    model: &mut Gpt2<B>,
    inputs: &[u32],
    targets: &[i32],
    b: usize,
    t: usize,
    keep: Keep,
) -> (f32, Vec<u32>, Vec<f32>, Vec<f32>, f64) {
    model.zero_grad();
    model.forward_stats(inputs, targets, b, t).unwrap();
    let kept = model
        .select(ScoreSource::Loss, keep)
        .unwrap()
        .indices
        .clone();
    let loss = model.ce_grad(1.0 / kept.len().max(1) as f32).unwrap();
    model.backward_selected().unwrap();
    let grads = model.grads_to_host().as_slice().to_vec();
    let norm = model
        .clip_and_update(AdamWConfig::default(), LR, 1.0)
        .unwrap();
    (
        loss,
        kept,
        grads,
        model.params_to_host().as_slice().to_vec(),
        norm,
    )
}

/// `n` random token ids and targets below `vocab`, the target of row `ignored` set to the ignore index.
fn random_batch(
    r: &mut ChaCha8Rng,
    vocab: usize,
    n: usize,
    ignored: usize,
) -> (Vec<u32>, Vec<i32>) {
    let inputs = (0..n).map(|_| r.gen_range(0..vocab as u32)).collect();
    let targets = (0..n)
        .map(|i| {
            if i == ignored {
                -100
            } else {
                r.gen_range(0..vocab as i32)
            }
        })
        .collect();
    (inputs, targets)
}

#[test]
fn a_training_step_matches_cpu() {
    let Some(gpu) = gpu("a_training_step_matches_cpu") else {
        return;
    };
    let cfg = GptConfig::tiny();
    let (b, t) = (2, 16);
    let (inputs, targets) = random_batch(&mut rng(10), cfg.vocab_size, b * t, 5);
    let mut on_gpu = Gpt2::new_on(gpu, cfg, b, t, 7).unwrap();
    let mut on_cpu = Gpt2::new_on(Cpu::new(), cfg, b, t, 7).unwrap();
    for keep in [
        Keep::AllValid,
        Keep::Rule(SelectRule::Var { alpha: 0.5 }),
        Keep::Rule(SelectRule::Var { alpha: 0.7 }),
        Keep::Rule(SelectRule::TopK { k: 1 }),
    ] {
        let (wl, wk, wg, wp, wn) = train_step(&mut on_cpu, &inputs, &targets, b, t, keep);
        let (gl, gk, gg, gp, gn) = train_step(&mut on_gpu, &inputs, &targets, b, t, keep);
        assert_eq!(gk, wk, "kept rows ({keep:?})");
        close("loss", &[gl], &[wl], 1e-5, 1e-4);
        close("gradients", &gg, &wg, 1e-4, 1e-3);
        assert!((gn - wn).abs() <= 1e-4 * wn, "grad norm {gn} vs {wn}");
        close("parameters after AdamW", &gp, &wp, 1e-4, 1e-3);
    }
}

#[test]
fn a_step_of_the_gpt2_head_matches_cpu() {
    // V = 50257 in Vp = 50304 through the whole model, N = 1.
    let Some(gpu) = gpu("a_step_of_the_gpt2_head_matches_cpu") else {
        return;
    };
    let cfg = GptConfig {
        vocab_size: 50257,
        padded_vocab_size: 50304,
        ..GptConfig::tiny()
    };
    let (inputs, targets) = ([50256u32], [17i32]);
    let mut on_gpu = Gpt2::new_on(gpu, cfg, 1, 1, 3).unwrap();
    let mut on_cpu = Gpt2::new_on(Cpu::new(), cfg, 1, 1, 3).unwrap();
    let (wl, wk, wg, wp, _) = train_step(&mut on_cpu, &inputs, &targets, 1, 1, Keep::AllValid);
    let (gl, gk, gg, gp, _) = train_step(&mut on_gpu, &inputs, &targets, 1, 1, Keep::AllValid);
    assert_eq!(gk, wk);
    close("loss", &[gl], &[wl], 1e-5, 1e-4);
    close("gradients", &gg, &wg, 1e-4, 1e-3);
    close("parameters", &gp, &wp, 1e-4, 1e-3);
}

/// Largest `|gpu − cpu|` relative to the largest `|cpu|`.
fn worst_relative(gpu: &[f32], cpu: &[f32]) -> f32 {
    let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = gpu
        .iter()
        .zip(cpu)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    worst / scale
}

/// bf16 storage (llm.c's recipe: bf16 activations, their gradients and the logits; bf16 products with f32
/// accumulation; f32 master weights, gradients and AdamW state) against the CPU's f32 over two training steps:
/// the loss within 2e-2, CLM's gradients within bf16's precision relative to their largest magnitude, its kept
/// rows exact, ESLM's kept count at least k. AdamW moves each parameter by about ±lr whatever the gradient's size,
/// so a near-zero gradient whose sign bf16 flips moves it 2·lr the other way: parameters are held to 2·lr per step.
#[test]
fn bf16_storage_training_steps_are_close_to_cpu() {
    let Some(mut gpu) = gpu("bf16_storage_training_steps_are_close_to_cpu") else {
        return;
    };
    gpu.set_activation_dtype(eslm_gpt2::backend::cuda::Dtype::Bf16)
        .unwrap();
    let cfg = GptConfig::tiny();
    let (b, t) = (2, 16);
    let (inputs, targets) = random_batch(&mut rng(19), cfg.vocab_size, b * t, 3);
    let mut on_gpu = Gpt2::new_on(gpu, cfg, b, t, 7).unwrap();
    let mut on_cpu = Gpt2::new_on(Cpu::new(), cfg, b, t, 7).unwrap();
    let mut steps = 0;
    for keep in [Keep::AllValid, Keep::Rule(SelectRule::Var { alpha: 0.5 })] {
        let (wl, wk, wg, wp, _) = train_step(&mut on_cpu, &inputs, &targets, b, t, keep);
        let (gl, gk, gg, gp, gn) = train_step(&mut on_gpu, &inputs, &targets, b, t, keep);
        match keep {
            Keep::AllValid => assert_eq!(gk, wk, "CLM keeps every valid row"),
            // M = 31 valid rows, k = ⌈0.5·31⌉ = 16 (more only with ties at the threshold).
            _ => assert!(
                (16..=31).contains(&gk.len()),
                "{keep:?} kept {} rows",
                gk.len()
            ),
        }
        assert!(gn.is_finite(), "grad norm {gn}");
        assert!((gl - wl).abs() <= 2e-2, "{keep:?} loss {gl} vs CPU {wl}");
        if keep == Keep::AllValid {
            let g = worst_relative(&gg, &wg);
            assert!(g <= 5e-2, "{keep:?} gradients: worst relative error {g}");
        }
        steps += 1;
        let worst = gp
            .iter()
            .zip(&wp)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            gp.iter().all(|x| x.is_finite()) && worst <= 2.0 * LR * steps as f32 * 1.01,
            "{keep:?} parameters after AdamW: worst difference {worst} after {steps} steps of lr {LR}"
        );
    }
    on_gpu.status().unwrap();
}

/// An op given views of two element types records a typed error (no kernel reads bf16 bits as f32).
#[test]
fn mixed_element_types_are_a_recorded_error() {
    let Some(mut gpu) = gpu("mixed_element_types_are_a_recorded_error") else {
        return;
    };
    let f = up(&mut gpu, &[1.0, 2.0, 3.0]);
    gpu.set_activation_dtype(eslm_gpt2::backend::cuda::Dtype::Bf16)
        .unwrap();
    let mut h = gpu.alloc_act(3);
    gpu.upload(Cuda::view_mut(&mut h), &[0.5, 0.25, 2.0]);
    assert_eq!(down(&gpu, &h), vec![0.5, 0.25, 2.0], "bf16 round trip");
    let mut out = gpu.alloc(3);
    gpu.residual_forward(Cuda::view_mut(&mut out), Cuda::view(&f), Cuda::view(&h));
    let e = gpu.status().unwrap_err().to_string();
    assert!(e.contains("Bf16") && e.contains("residual"), "{e}");
}

/// Mean loss over the valid rows of a no-grad forward.
fn mean_loss<B: Backend>(
    model: &mut Gpt2<B>,
    inputs: &[u32],
    targets: &[i32],
    b: usize,
    t: usize,
) -> f32 {
    let stats = model.forward_stats(inputs, targets, b, t).unwrap();
    let (sum, n) = stats
        .loss
        .iter()
        .zip(&stats.valid)
        .filter(|(_, &v)| v)
        .fold((0f64, 0usize), |(s, n), (&l, _)| (s + l as f64, n + 1));
    (sum / n as f64) as f32
}

/// Under bf16 products the weights are read from the parameters' bf16 copy (`shadow.rs`); the copy follows every
/// write into the parameters: after `load_params` (parameters × 4, a loss far from the first) and after an AdamW
/// step the GPU's loss is the CPU's with the same parameters, not the one of a stale copy.
#[test]
fn bf16_weight_copy_follows_parameter_writes() {
    let Some(mut gpu) = gpu("bf16_weight_copy_follows_parameter_writes") else {
        return;
    };
    gpu.set_matmul_precision(MatmulPrecision::Bf16).unwrap();
    let cfg = GptConfig::tiny();
    let (b, t) = (2, 16);
    let (inputs, targets) = random_batch(&mut rng(23), cfg.vocab_size, b * t, 7);
    let mut on_gpu = Gpt2::new_on(gpu, cfg, b, t, 7).unwrap();
    let mut on_cpu = Gpt2::new_on(Cpu::new(), cfg, b, t, 7).unwrap();
    let first = mean_loss(&mut on_cpu, &inputs, &targets, b, t);
    let got = mean_loss(&mut on_gpu, &inputs, &targets, b, t);
    assert!(
        (got - first).abs() <= 2e-2,
        "initial loss {got} vs CPU {first}"
    );
    let mut scaled = on_cpu.params().clone();
    scaled.as_mut_slice().iter_mut().for_each(|x| *x *= 4.0);
    on_cpu.load_params(&scaled).unwrap();
    on_gpu.load_params(&scaled).unwrap();
    let want = mean_loss(&mut on_cpu, &inputs, &targets, b, t);
    assert!(
        (want - first).abs() > 0.2,
        "the scaled parameters must move the loss: {first} -> {want}"
    );
    let got = mean_loss(&mut on_gpu, &inputs, &targets, b, t);
    assert!(
        (got - want).abs() <= 5e-2,
        "after load_params: loss {got} vs CPU {want}"
    );
    for model_step in 0..3 {
        let (wl, ..) = train_step(&mut on_cpu, &inputs, &targets, b, t, Keep::AllValid);
        let (gl, ..) = train_step(&mut on_gpu, &inputs, &targets, b, t, Keep::AllValid);
        assert!(
            (gl - wl).abs() <= 5e-2,
            "step {model_step}: loss {gl} vs CPU {wl}"
        );
    }
    on_gpu.status().unwrap();
}
