//! `eslm-train compare` on two tiny bigram runs: trains each (run, seed) once, writes done.json and a report with
//! a row per run, skips finished runs when run again, and refuses specs the runner cannot honour.

use eslm_train::compare::{read_spec, run_compare, CompareArgs};

mod common;
use common::no_stop;

const SPEC: &str = r#"
name = "tiny"
seeds = [1, 2]
[base]
model = "bigram"
synthetic_documents = 64
vocab_size = 512
steps = 6
batch_size = 4
seq_len = 16
lr = 0.05
eval_every = 2
eval_batches = 2
[[run]]
name = "clm"
select = "clm"
[[run]]
name = "eslm"
select = "eslm"
alpha = 0.5
"#;

fn args(dir: &std::path::Path, spec: &std::path::Path) -> CompareArgs {
    CompareArgs {
        spec: spec.to_path_buf(),
        out: Some(dir.join("out")),
        only: Vec::new(),
        report_only: false,
    }
}

#[test]
fn compare_trains_every_run_and_seed_once_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let report = run_compare(&args(dir.path(), &spec), no_stop()).unwrap();
    let md = std::fs::read_to_string(&report).unwrap();
    for run in ["clm", "eslm"] {
        for seed in [1, 2] {
            assert!(dir
                .path()
                .join(format!("out/{run}/seed{seed}/done.json"))
                .is_file());
        }
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {run} |")))
            .unwrap();
        assert!(row.contains("| 2 |"), "two seeds in {row}");
    }
    let clm_row = md.lines().find(|l| l.starts_with("| clm |")).unwrap();
    assert!(
        clm_row.contains("1.00"),
        "the baseline's step-time ratio is 1: {clm_row}"
    );
    assert!(dir.path().join("out/compare.svg").is_file());
    // A second invocation trains nothing: the metrics files are untouched.
    let metrics = dir.path().join("out/eslm/seed1/metrics.jsonl");
    let before = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    run_compare(&args(dir.path(), &spec), no_stop()).unwrap();
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        before
    );
}

#[test]
fn specs_the_runner_cannot_honour_are_refused_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.toml");
    for (text, needle) in [
        (
            SPEC.replace("name = \"clm\"", "name = \"eslm\""),
            "repeated",
        ),
        (
            SPEC.replace("seeds = [1, 2]", "seeds = [1, 2]\nbaseline = \"nope\""),
            "baseline",
        ),
        (SPEC.replace("steps = 6", "steps = 6\nout = \"x\""), "`out`"),
        (SPEC.replace("seeds = [1, 2]", "seeds = []"), "seed"),
    ] {
        std::fs::write(&spec, text).unwrap();
        let err = read_spec(&spec).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains(needle), "{err}");
    }
}
