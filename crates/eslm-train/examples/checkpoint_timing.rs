//! Wall time of the checkpoint I/O of a GPT-2 model (default 124M): writing a checkpoint (model, AdamW moments,
//! trainer state, manifest), verifying it against its manifest, and loading it back — what a resume, and a
//! SIGTERM's checkpoint before a cluster's kill deadline, wait for.
//!
//! `cargo run --release -p eslm-train --example checkpoint_timing -- [model=124m] [repeats=3] [dir]`

use std::path::PathBuf;
use std::time::Instant;

use eslm_train::checkpoint::{
    load_trainer_state, save_checkpoint, verify_checkpoint, TrainerState,
};
use eslm_train::config::RunConfig;
use eslm_train::models::build_model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model_name = args.get(1).cloned().unwrap_or_else(|| "124m".into());
    let repeats: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let root = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let cfg = RunConfig {
        model: model_name.clone(),
        batch_size: 1,
        seq_len: 8,
        ..RunConfig::default()
    };
    let mut model = build_model(&cfg, 50257)?;
    let loader = serde_json::from_value(serde_json::json!({
        "seed": 0, "epoch": 0, "cursor": 0, "shard": 0, "offset": 0, "seq_len": 8, "shuffle": false,
        "rank": 0, "world_size": 1, "total_windows": 1
    }))?;
    let state = TrainerState {
        version: eslm_train::checkpoint::TRAINER_STATE_VERSION,
        step: 1,
        tokens: 0,
        flops_paper: 0.0,
        flops_realized: 0.0,
        wall_s: 0.0,
        loader,
        policy: serde_json::Value::Null,
        vocab_size: 50257,
        config: cfg,
        world_size: 1,
        rank_policies: Vec::new(),
    };
    for r in 0..repeats {
        let out = tempfile::tempdir_in(&root)?;
        let t = Instant::now();
        let dir = save_checkpoint(out.path(), model.as_ref(), &state, 1)?;
        let save = t.elapsed();
        let bytes: u64 = std::fs::read_dir(&dir)?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let t = Instant::now();
        verify_checkpoint(&dir)?;
        let verify = t.elapsed();
        let t = Instant::now();
        load_trainer_state(&dir)?;
        model.load_model(&dir)?;
        model.load_optimizer(&dir)?;
        let load = t.elapsed();
        println!(
            "{model_name} round {r}: {:.2} GB; save {:.2} s, verify {:.2} s, load {:.2} s",
            bytes as f64 / 1e9,
            save.as_secs_f64(),
            verify.as_secs_f64(),
            load.as_secs_f64()
        );
    }
    Ok(())
}
