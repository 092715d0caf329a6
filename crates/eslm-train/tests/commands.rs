//! The `plot`, `eval` and `sample` commands on small bigram runs (fast), and training from shards on disk.

use eslm_data::synthetic::{write_synthetic_corpus, SyntheticConfig};
use eslm_train::config::{PolicyKind, TrainArgs};
use eslm_train::eval_cmd::{run_eval, EvalArgs};
use eslm_train::plot::plot_runs;
use eslm_train::run::run_training;
use eslm_train::sample::{run_sample, SampleArgs};

mod common;
use common::no_stop;

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
    run_training(&a, no_stop()).unwrap().checkpoint.unwrap()
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
        hellaswag: vec![],
        lambada: vec![],
        arc: vec![],
        winogrande: vec![],
        per_item: None,
        limit: 0,
        json: true,
        device: Default::default(),
    };
    let r = run_eval(&args).unwrap();
    let loss = r["val"]["loss"].as_f64().unwrap();
    assert!(
        loss.is_finite() && loss < (512f64).ln(),
        "trained model beats uniform: {loss}"
    );
    // Text tasks without a tokenizer: a clear error.
    let mut no_tok = args.clone();
    no_tok.hellaswag = vec![dir.path().join("h.txt")];
    assert!(run_eval(&no_tok)
        .unwrap_err()
        .to_string()
        .contains("--tokenizer"));
    // A GPU that is not there (no driver, or a build without CUDA): a clear error before anything runs.
    let mut gpu = args.clone();
    gpu.device = eslm_train::config::Device::Cuda(7);
    let e = run_eval(&gpu).unwrap_err().to_string();
    assert!(e.contains("--device cpu") || e.contains("cuda:7"), "{e}");

    let s = SampleArgs {
        checkpoint: ckpt,
        prompt: None,
        prompt_ids: vec![511, 0],
        tokenizer: None,
        max_new_tokens: 6,
        temperature: 0.8,
        top_k: 10,
        seed: 1,
        device: Default::default(),
    };
    let text = run_sample(&s).unwrap();
    assert_eq!(text.split(" | ").nth(1).unwrap().split(' ').count(), 6);
    let mut bad = s.clone();
    bad.prompt_ids = vec![9999];
    assert!(run_sample(&bad).is_err());
}

fn eval_args(ckpt: std::path::PathBuf) -> EvalArgs {
    EvalArgs {
        checkpoint: ckpt,
        val: None,
        seq_len: None,
        batch_size: 2,
        tokenizer: None,
        hellaswag: vec![],
        lambada: vec![],
        arc: vec![],
        winogrande: vec![],
        per_item: None,
        limit: 0,
        json: true,
        device: Default::default(),
    }
}

fn shared_tokenizer() -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/gpt2/tokenizer.json");
    if p.is_file() {
        Some(p)
    } else {
        println!("skipping: {} not found", p.display());
        None
    }
}

/// Issue 12: `eval --per-item FILE`, several files per task reported under their file names, Winogrande
/// files, and `eval --seq-len` beyond the model's context refused.
#[test]
fn eval_per_item_several_files_and_seq_len_check() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny GPT-2 with GPT-2's vocabulary (the synthetic ids are all below it), context 16.
    let out = dir.path().join("gpt");
    let a = TrainArgs {
        model: Some("tiny".into()),
        synthetic_documents: Some(64),
        vocab_size: Some(50257),
        steps: Some(1),
        batch_size: Some(2),
        seq_len: Some(16),
        eval_batches: Some(1),
        out: Some(out.clone()),
        no_progress: true,
        ..Default::default()
    };
    let ckpt = run_training(&a, no_stop()).unwrap().checkpoint.unwrap();
    let data = dir.path().join("data");
    write_synthetic_corpus(
        &data,
        &SyntheticConfig {
            train_documents: 16,
            val_documents: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let mut e = eval_args(ckpt.clone());
    e.val = Some(data.join("val_*.bin").display().to_string());
    e.seq_len = Some(64);
    let err = run_eval(&e).unwrap_err().to_string();
    assert!(err.contains("--seq-len 64") && err.contains("16"), "{err}");

    let Some(tok) = shared_tokenizer() else {
        return;
    };
    let arc_a = dir.path().join("arc_easy_small.jsonl");
    let arc_b = dir.path().join("arc_challenge_small.jsonl");
    let wino = dir.path().join("wino_small.jsonl");
    std::fs::write(
        &arc_a,
        "{\"query\": \"The sky is\", \"choices\": [\"blue\", \"green\"], \"gold\": \"A\"}\n",
    )
    .unwrap();
    std::fs::write(&arc_b, "{\"query\": \"Fire is\", \"choices\": [\"cold\", \"hot\", \"wet\"], \"gold\": 1}\n{\"query\": \"Ice is\", \"choices\": [\"cold\", \"hot\"], \"gold\": 0}\n").unwrap();
    std::fs::write(&wino, "{\"context_options\": [\"Anna gave Bo a gift because Anna\", \"Anna gave Bo a gift because Bo\"], \"continuation\": \"was generous.\", \"gold\": 0}\n").unwrap();
    let per_item = dir.path().join("items.jsonl");
    let mut e = eval_args(ckpt);
    e.tokenizer = Some(tok);
    e.arc = vec![arc_a, arc_b];
    e.winogrande = vec![wino];
    e.per_item = Some(per_item.clone());
    let r = run_eval(&e).unwrap();
    assert_eq!(r["arc_easy_small.jsonl"]["items"], 1);
    assert_eq!(r["arc_challenge_small.jsonl"]["items"], 2);
    assert_eq!(r["arc_challenge_small.jsonl"]["task"], "arc");
    assert_eq!(r["wino_small.jsonl"]["task"], "winogrande");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&per_item)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let second = &lines[2];
    assert!(second["file"]
        .as_str()
        .unwrap()
        .ends_with("arc_challenge_small.jsonl"));
    assert_eq!(second["line"], 2);
    assert_eq!(second["gold"], 0);
    assert_eq!(second["logprobs"].as_array().unwrap().len(), 2);
    // The reported accuracy is the mean of the per-item predictions.
    let hits = lines[1..3]
        .iter()
        .filter(|l| l["pred"] == l["gold"])
        .count() as f64;
    assert_eq!(
        r["arc_challenge_small.jsonl"]["acc"].as_f64().unwrap(),
        hits / 2.0
    );
}

/// Issue 12: sampling refuses a negative / NaN temperature and a model with non-finite logits.
#[test]
fn sample_refuses_bad_temperatures_and_broken_models() {
    use eslm_train::bigram::BigramModel;
    use eslm_train::sample::{generate, non_negative_f32};
    let mut m = BigramModel::new(8);
    for t in [-1.0f32, f32::NAN, f32::INFINITY] {
        let err = generate(&mut m, &[1], 3, t, 0, 0).unwrap_err().to_string();
        assert!(err.contains("--temperature"), "{t}: {err}");
    }
    assert!(non_negative_f32("-0.5").is_err() && non_negative_f32("nan").is_err());
    assert_eq!(non_negative_f32("0").unwrap(), 0.0);
    let mut w = vec![0.0f32; 8 * 8];
    w[8 + 3] = f32::NAN;
    let mut broken = BigramModel::from_weights(8, w).unwrap();
    let err = generate(&mut broken, &[1], 3, 0.8, 0, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not finite"), "{err}");
}

/// Issue 12: `plot` draws what is valid in the trainer's own output (null val_ppl of a diverged run, null loss
/// of a skipped step, a partial last line) and says what it skipped; the strict reader names file and line.
#[test]
fn plot_tolerates_nulls_and_a_partial_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("good-run");
    train(&a, PolicyKind::Clm, None, None);
    let metrics = a.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"kind\":\"eval\",\"step\":13,\"tokens\":1,\"flops_paper_total\":1.0,\"flops_realized_total\":1.0,\"wall_s\":1.0,\"val_loss\":null,\"val_ppl\":null,\"val_tokens\":4}\n");
    text.push_str("{\"kind\":\"step\",\"step\":14,\"lr\":0.1,\"loss\":null,\"loss_kept\":null,\"kept_fraction\":0.0,\"kept_tokens\":0,\"threshold\":null,\"alpha\":null,\"sequence_fraction\":1.0,\"grad_norm\":null,\"step_time_s\":0.1,\"tokens_per_s\":1.0,\"tokens\":1,\"flops_paper\":1.0,\"flops_realized\":1.0,\"flops_paper_total\":1.0,\"flops_realized_total\":1.0,\"wall_s\":1.0,\"skipped\":true}\n");
    text.push_str("{\"kind\":\"eval\",\"step\":15,\"tok");
    std::fs::write(&metrics, &text).unwrap();
    let svg = dir.path().join("p.svg");
    let notes = plot_runs(std::slice::from_ref(&a), &svg).unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().contains("good-run"));
    let all = notes.join("\n");
    let last = text.lines().count();
    assert!(all.contains(&format!("skipped line {last}")), "{all}");
    assert!(all.contains("non-finite val loss"), "{all}");
    let err = eslm_train::metrics::read_metrics(&metrics)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metrics.jsonl") && err.contains(&format!("line {last}")),
        "{err}"
    );
    let (steps, _) = eslm_train::metrics::read_metrics_lenient(&metrics)
        .map(|r| (r.steps, r.evals))
        .unwrap();
    assert!(steps.last().unwrap().loss.is_nan());
}

#[test]
fn bare_command_trains_the_policy_and_a_clm_baseline_in_a_fresh_directory() {
    use eslm_train::baseline::{format_comparison, fresh_dir, run_with_baseline};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("default");
    assert_eq!(fresh_dir(&base), base);
    std::fs::create_dir_all(&base).unwrap();
    assert_eq!(
        fresh_dir(&base),
        dir.path().join("default-2"),
        "an existing run is never reused"
    );
    let args = TrainArgs {
        model: Some("bigram".into()),
        synthetic_documents: Some(64),
        vocab_size: Some(512),
        steps: Some(6),
        batch_size: Some(4),
        seq_len: Some(16),
        eval_every: Some(0),
        eval_batches: Some(2),
        no_progress: true,
        ..Default::default()
    };
    let root = fresh_dir(&base);
    let c = run_with_baseline(&args, &root, no_stop()).unwrap();
    assert_eq!(c.policy.policy, "eslm");
    assert_eq!(c.clm.as_ref().unwrap().policy, "clm");
    assert!(root.join("eslm/metrics.jsonl").is_file() && root.join("clm/metrics.jsonl").is_file());
    let table = format_comparison(&c);
    assert!(
        table.contains("eslm") && table.contains("clm") && table.contains("nats"),
        "{table}"
    );
}
