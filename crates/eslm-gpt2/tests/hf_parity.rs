//! Parity with HuggingFace transformers on a tiny random GPT-2 (L=2, H=2, C=32, V=100 padded to 128, B=2, T=8).
//!
//! `scripts/make_golden.py` wrote `tests/golden/gpt2-tiny/` (the model as `save_pretrained` writes it) and
//! `tests/golden/gpt2-tiny-batch.safetensors` (explicit inputs and targets, the logits, the mean cross-entropy over
//! all B·T positions and the gradient of that loss for every parameter, computed by transformers in float64 from
//! the f32 weights). We load the model through the HF checkpoint loader, run forward + dense backward with the same
//! targets, and require logits, loss and every gradient to match with relative error
//! `max|a − b| / max|b| ≤ 1e-4` per tensor. Both the training-step path (token statistics + sparse CE from
//! `eslm-kernels`, every row kept) and a plain dense backward from `dlogits` computed here in f64 are checked.

use std::path::PathBuf;

use eslm_gpt2::checkpoint::hf;
use eslm_gpt2::step::{Selector, StepWorkspace};
use eslm_gpt2::{Gpt2, ParamKind, ParamSet};
use safetensors::tensor::{Dtype, SafeTensors};

const TOL: f64 = 1e-4;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

struct Batch {
    b: usize,
    t: usize,
    inputs: Vec<u32>,
    targets: Vec<i32>,
    logits: Vec<f32>,
    loss: f32,
    bytes: Vec<u8>,
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let v = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
    assert_eq!(v.dtype(), Dtype::F32, "{name}");
    v.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn i32s(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<i32>) {
    let v = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
    assert_eq!(v.dtype(), Dtype::I32, "{name}");
    let data = v
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (v.shape().to_vec(), data)
}

fn load_batch() -> Batch {
    let bytes =
        std::fs::read(golden_dir().join("gpt2-tiny-batch.safetensors")).expect("read golden batch");
    let st = SafeTensors::deserialize(&bytes).expect("parse golden batch");
    let (shape, inputs) = i32s(&st, "inputs");
    let (_, targets) = i32s(&st, "targets");
    let logits = f32s(&st, "logits");
    let loss = f32s(&st, "loss")[0];
    drop(st);
    Batch {
        b: shape[0],
        t: shape[1],
        inputs: inputs.iter().map(|&x| x as u32).collect(),
        targets,
        logits,
        loss,
        bytes,
    }
}

/// `max|a − b| / max(max|b|, 1e-30)`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max);
    diff / scale.max(1e-30)
}

fn load_model(b: usize, t: usize) -> Gpt2 {
    let params =
        hf::load_pretrained(&golden_dir().join("gpt2-tiny")).expect("load golden HF checkpoint");
    let cfg = *params.config();
    assert_eq!(
        (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size),
        (2, 2, 32, 100)
    );
    assert_eq!(cfg.padded_vocab_size, 128);
    Gpt2::from_params(params, b, t).expect("model")
}

fn check_logits(model: &Gpt2, batch: &Batch) {
    let view = model.logits().expect("logits");
    let v = view.vocab();
    let ours: Vec<f32> = (0..view.rows())
        .flat_map(|i| view.row(i)[..v].to_vec())
        .collect();
    let err = rel_err(&ours, &batch.logits);
    println!("logits rel err {err:.3e}");
    assert!(err <= TOL, "logits rel err {err:.3e} > {TOL:e}");
}

fn check_grads(grads: &ParamSet, batch: &Batch, label: &str) {
    let cfg = *grads.config();
    let golden =
        hf::params_from_safetensors(&batch.bytes, &cfg, Some("grad.")).expect("golden grads");
    let mut worst = (0.0f64, "");
    for kind in ParamKind::ALL {
        let (ours, theirs) = (grads.get(kind), golden.get(kind));
        let err = rel_err(ours, theirs);
        println!("{label}: grad {:<8} rel err {err:.3e}", kind.name());
        assert!(
            theirs.iter().any(|&x| x != 0.0),
            "golden grad {} is all zero",
            kind.name()
        );
        assert!(
            err <= TOL,
            "{label}: grad {} rel err {err:.3e} > {TOL:e}",
            kind.name()
        );
        if err > worst.0 {
            worst = (err, kind.name());
        }
    }
    let wte = grads.get(ParamKind::Wte);
    assert!(
        wte[cfg.vocab_size * cfg.n_embd..].iter().all(|&x| x == 0.0),
        "padded wte rows got gradient"
    );
    println!(
        "{label}: worst gradient rel err {:.3e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn hf_parity_training_step_path() {
    let batch = load_batch();
    let mut model = load_model(batch.b, batch.t);
    model.zero_grad();
    let mut ws = StepWorkspace::new();
    let report = model
        .loss_and_backward(
            &mut ws,
            &batch.inputs,
            &batch.targets,
            batch.b,
            batch.t,
            Selector::All,
        )
        .expect("step");
    assert_eq!(report.kept, batch.b * batch.t);
    for (name, loss) in [
        ("loss_all", report.loss_all),
        ("loss_kept", report.loss_kept),
    ] {
        let err = (loss - batch.loss as f64).abs() / (batch.loss as f64).abs();
        println!(
            "{name} {loss:.7} vs HF {:.7}: rel err {err:.3e}",
            batch.loss
        );
        assert!(err <= TOL, "{name} rel err {err:.3e}");
    }
    check_logits(&model, &batch);
    check_grads(model.grads(), &batch, "step path");
}

#[test]
fn hf_parity_dense_backward() {
    let batch = load_batch();
    let mut model = load_model(batch.b, batch.t);
    let n = batch.b * batch.t;
    let (v, vp) = (model.config().vocab_size, model.config().padded_vocab_size);
    // dlogits of the mean cross-entropy, in f64 from our logits: (softmax(z) − onehot(y)) / N.
    let mut dlogits = vec![0.0f32; n * vp];
    let mut loss = 0.0f64;
    {
        let view = model
            .forward(&batch.inputs, batch.b, batch.t)
            .expect("forward");
        for i in 0..n {
            let z = &view.row(i)[..v];
            let m = z.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let s: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
            let y = batch.targets[i] as usize;
            loss += m + s.ln() - z[y] as f64;
            for j in 0..v {
                let p = (z[j] as f64 - m).exp() / s;
                let g = p - if j == y { 1.0 } else { 0.0 };
                dlogits[i * vp + j] = (g / n as f64) as f32;
            }
        }
    }
    loss /= n as f64;
    let err = (loss - batch.loss as f64).abs() / (batch.loss as f64).abs();
    println!("loss {loss:.7} vs HF {:.7}: rel err {err:.3e}", batch.loss);
    assert!(err <= TOL);
    check_logits(&model, &batch);
    model.zero_grad();
    model.backward(&dlogits).expect("backward");
    check_grads(model.grads(), &batch, "dense backward");
}
