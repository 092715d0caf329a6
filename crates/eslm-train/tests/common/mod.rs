//! Setup shared by eslm-train's integration tests: small runs on the synthetic corpus that finish in seconds.
#![allow(dead_code)] // every test binary uses a part of it

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use eslm_train::config::{PolicyKind, TrainArgs};

/// A stop flag that is never raised.
pub fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// A small GPT-2 run (the `synth-tiny` model cut to 2 layers, width 32, 2 heads; B 4, T 32) on the synthetic
/// corpus, on the default device, writing into `out`.
pub fn small_gpt2(out: &Path, select: PolicyKind, steps: u64) -> TrainArgs {
    TrainArgs {
        model: Some("synth-tiny".into()),
        n_layer: Some(2),
        n_embd: Some(32),
        n_head: Some(2),
        lr: Some(3e-3),
        ..small_bigram(out, select, steps)
    }
}

/// A small bigram run (B 4, T 32, lr 0.05) on the synthetic corpus, writing into `out`.
pub fn small_bigram(out: &Path, select: PolicyKind, steps: u64) -> TrainArgs {
    TrainArgs {
        model: Some("bigram".into()),
        synthetic_documents: Some(256),
        select: Some(select),
        steps: Some(steps),
        batch_size: Some(4),
        seq_len: Some(32),
        lr: Some(0.05),
        warmup_steps: Some(2),
        eval_every: Some(0),
        eval_batches: Some(4),
        out: Some(out.to_path_buf()),
        no_progress: true,
        ..Default::default()
    }
}
