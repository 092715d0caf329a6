//! The `plot`, `eval` and `sample` commands on small bigram runs (fast), and training from shards on disk.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use eslm_data::synthetic::{write_synthetic_corpus, SyntheticConfig};
use eslm_train::config::{PolicyKind, TrainArgs};
use eslm_train::eval_cmd::{run_eval, EvalArgs};
use eslm_train::plot::plot_runs;
use eslm_train::run::run_training;
use eslm_train::sample::{run_sample, SampleArgs};

fn train(
    out: &std::path::Path,
    select: PolicyKind,
    train: Option<String>,
    val: Option<String>,
) -> std::path::PathBuf {
    let a = TrainArgs {
        model: Some("bigram".into()),
        synthetic_documents: Some(128),
        train,
        val,
        vocab_size: Some(512),
        select: Some(select),
        steps: Some(12),
        batch_size: Some(4),
        seq_len: Some(32),
        lr: Some(0.05),
        eval_every: Some(4),
        eval_batches: Some(2),
        out: Some(out.to_path_buf()),
        no_progress: true,
        ..Default::default()
    };
    run_training(&a, Arc::new(AtomicBool::new(false)))
        .unwrap()
        .checkpoint
        .unwrap()
}

#[test]
fn plot_eval_and_sample_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("clm-run"), dir.path().join("eslm-run"));
    train(&a, PolicyKind::Clm, None, None);
    let ckpt = train(&b, PolicyKind::Eslm, None, None);
    let svg = dir.path().join("cmp.svg");
    plot_runs(&[a.clone(), b.clone()], &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("clm-run") && text.contains("eslm-run"));
    assert!(text.contains("val loss vs training tokens"));
    assert!(plot_runs(&[dir.path().join("missing")], &svg).is_err());

    // Shards on disk: train from them, then eval perplexity on the val shards.
    let data = dir.path().join("data");
    let cfg = SyntheticConfig {
        train_documents: 64,
        val_documents: 16,
        ..Default::default()
    };
    write_synthetic_corpus(&data, &cfg).unwrap();
    let train_glob = data.join("train_*.bin").display().to_string();
    let val_glob = data.join("val_*.bin").display().to_string();
    let c = dir.path().join("shards-run");
    let ckpt2 = train(
        &c,
        PolicyKind::Eslm,
        Some(train_glob),
        Some(val_glob.clone()),
    );
    let args = EvalArgs {
        checkpoint: ckpt2,
        val: Some(val_glob),
        seq_len: Some(32),
        batch_size: 4,
        tokenizer: None,
        hellaswag: None,
        lambada: None,
        arc: None,
        limit: 0,
        json: true,
    };
    let r = run_eval(&args).unwrap();
    let loss = r["val"]["loss"].as_f64().unwrap();
    assert!(
        loss.is_finite() && loss < (512f64).ln(),
        "trained model beats uniform: {loss}"
    );
    // Text tasks without a tokenizer: a clear error.
    let mut no_tok = args.clone();
    no_tok.hellaswag = Some(dir.path().join("h.txt"));
    assert!(run_eval(&no_tok)
        .unwrap_err()
        .to_string()
        .contains("--tokenizer"));

    let s = SampleArgs {
        checkpoint: ckpt,
        prompt: None,
        prompt_ids: vec![511, 0],
        tokenizer: None,
        max_new_tokens: 6,
        temperature: 0.8,
        top_k: 10,
        seed: 1,
    };
    let text = run_sample(&s).unwrap();
    assert_eq!(text.split(" | ").nth(1).unwrap().split(' ').count(), 6);
    let mut bad = s.clone();
    bad.prompt_ids = vec![9999];
    assert!(run_sample(&bad).is_err());
}
