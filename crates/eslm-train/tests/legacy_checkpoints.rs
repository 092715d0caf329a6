//! Runs written by eslm 0.1 (checkpoints without `COMPLETE` manifests, `tests/fixtures/run-0.1`) resume under this
//! build: `--resume` adopts their checkpoints (writes a manifest of the files as they are) and continues exactly
//! where that build would have, and a `step_N` directory that is not a checkpoint is left alone.

use std::fs;
use std::path::Path;

use eslm_train::checkpoint::{is_complete, list_checkpoints, verify_checkpoint};
use eslm_train::config::TrainArgs;
use eslm_train::metrics::read_metrics;
use eslm_train::run::run_training;

mod common;
use common::no_stop;

/// A copy of `src` (files and folders) at `dst`.
fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &to);
        } else {
            fs::copy(entry.path(), &to).unwrap();
        }
    }
}

fn fixture_copy(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("run");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/run-0.1"),
        &out,
    );
    out
}

fn resume_to(out: &Path, steps: u64) -> eslm_train::Result<eslm_train::TrainSummary> {
    let args = TrainArgs {
        out: Some(out.to_path_buf()),
        resume: true,
        steps: Some(steps),
        no_progress: true,
        ..Default::default()
    };
    run_training(&args, no_stop())
}

#[test]
fn a_run_of_eslm_0_1_resumes_where_that_build_would_have_continued() {
    let dir = tempfile::tempdir().unwrap();
    let out = fixture_copy(dir.path());
    let ckpt = out.join("checkpoints/step_00000004");
    assert!(
        !is_complete(&ckpt),
        "the fixture must be a pre-manifest checkpoint"
    );

    resume_to(&out, 6).unwrap();

    // Adopted: a manifest now covers the old checkpoint's files, and the resumed run wrote its own.
    assert!(is_complete(&ckpt));
    verify_checkpoint(&ckpt).unwrap();
    let steps: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert!(steps.contains(&6), "{steps:?}");
    // The same losses as eslm 0.1 logged running the same command straight to step 6 (fixture README).
    let (records, _) = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let loss = |s: u64| {
        records
            .iter()
            .rfind(|r| r.step == s)
            .unwrap_or_else(|| panic!("no record of step {s}"))
            .loss
    };
    for (step, want) in [(5, 6.225058f32), (6, 6.267706)] {
        assert!(
            (loss(step) - want).abs() < 1e-4,
            "step {step}: loss {} but eslm 0.1 logged {want}",
            loss(step)
        );
    }
}

#[test]
fn a_step_directory_that_is_no_checkpoint_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = fixture_copy(dir.path());
    let ckpt = out.join("checkpoints/step_00000004");
    // trainer.json of another step: not adopted, and --resume finds nothing to resume from.
    let state = fs::read_to_string(ckpt.join("trainer.json")).unwrap();
    fs::write(
        ckpt.join("trainer.json"),
        state.replacen("\"step\": 4", "\"step\": 3", 1),
    )
    .unwrap();
    let err = resume_to(&out, 6).unwrap_err().to_string();
    assert!(err.contains("no complete checkpoint"), "{err}");
    assert!(!is_complete(&ckpt));
    assert!(ckpt.join("model.safetensors").is_file());
}

/// A checkpoint of this build that lost its manifest is not mistaken for an eslm 0.1 one: `--resume` warns and
/// continues from the newest complete checkpoint before it.
#[test]
fn a_new_checkpoint_without_its_manifest_is_not_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let out = fixture_copy(dir.path());
    resume_to(&out, 6).unwrap();
    let newest = out.join("checkpoints/step_00000006");
    fs::remove_file(newest.join("COMPLETE")).unwrap();
    let summary = resume_to(&out, 7).unwrap();
    assert_eq!(
        summary.resumed_from.as_deref(),
        Some(out.join("checkpoints/step_00000004").as_path()),
        "resumed from the newest complete checkpoint"
    );
    // Step 5 again, with 0.1's loss (metrics rewound to step 4).
    let (records, _) = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let fives: Vec<f32> = records
        .iter()
        .filter(|r| r.step == 5)
        .map(|r| r.loss)
        .collect();
    assert_eq!(fives.len(), 1, "{fives:?}");
    assert!((fives[0] - 6.225058).abs() < 1e-4, "{fives:?}");
}

/// eslm 0.1 killed between finishing `.step_N.tmp` and renaming it: that copy is the step's only one, and the
/// next trainer recovers it (before this build, temporaries without a manifest were deleted).
#[test]
fn an_eslm_0_1_checkpoint_left_in_its_temporary_directory_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let out = fixture_copy(dir.path());
    let root = out.join("checkpoints");
    fs::rename(root.join("step_00000004"), root.join(".step_00000004.tmp")).unwrap();
    let summary = resume_to(&out, 6).unwrap();
    assert_eq!(
        summary.resumed_from.as_deref(),
        Some(root.join("step_00000004").as_path())
    );
    assert!(!root.join(".step_00000004.tmp").exists());
}
