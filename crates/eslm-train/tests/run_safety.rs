//! Issue 12, "runs lost or mixed" and "results that look fine but are wrong" (training side): the run directory
//! is claimed and locked, checkpoints are complete (marker written last, checksummed) and never deleted before
//! their replacement is in place, a failed write leaves no temporary directory, divergence and non-finite
//! losses stop the run and keep the state from before the bad update, and reference / teacher models are
//! checked against the run. Bigram test double and tiny GPT-2s: each test takes well under a second or two.

use std::path::{Path, PathBuf};

use eslm_train::bigram::BigramModel;
use eslm_train::checkpoint::{
    latest_checkpoint, list_checkpoints, recover_checkpoints, save_checkpoint, verify_checkpoint,
    TrainerState, TRAINER_STATE_VERSION,
};
use eslm_train::config::{PolicyKind, RunConfig, TrainArgs};
use eslm_train::metrics::read_metrics;
use eslm_train::model::{
    Keep, LanguageModel, LossSpec, OptimStep, ScoreSource, Selection, TokenStats,
};
use eslm_train::outdir::RunDirLock;
use eslm_train::run::run_training;
use eslm_train::{Result, TrainError};

mod common;
use common::no_stop;

fn args(out: &Path, steps: u64) -> TrainArgs {
    TrainArgs {
        synthetic_documents: Some(128),
        seq_len: Some(16),
        eval_batches: Some(2),
        ..common::small_bigram(out, PolicyKind::Clm, steps)
    }
}

fn gpt(out: &Path, steps: u64) -> TrainArgs {
    TrainArgs {
        model: Some("tiny".into()),
        n_embd: Some(16),
        ..args(out, steps)
    }
}

fn loader_state() -> eslm_data::LoaderState {
    serde_json::from_value(serde_json::json!({
        "seed": 0, "epoch": 0, "cursor": 0, "shard": 0, "offset": 0, "seq_len": 4, "shuffle": false,
        "rank": 0, "world_size": 1, "total_windows": 1
    }))
    .unwrap()
}

fn steps_of(out: &Path) -> Vec<u64> {
    list_checkpoints(out)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[test]
fn a_fresh_run_into_a_used_out_is_refused_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut a = args(&out, 6);
    a.checkpoint_every = Some(2);
    a.keep_last = Some(5);
    run_training(&a, no_stop()).unwrap();
    assert_eq!(steps_of(&out), vec![2, 4, 6]);

    // The same command again: refused, and the old run is untouched.
    let mut b = args(&out, 3);
    b.keep_last = Some(1);
    let err = run_training(&b, no_stop()).unwrap_err().to_string();
    assert!(
        err.contains("not empty") && err.contains("--overwrite") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(steps_of(&out), vec![2, 4, 6]);
    assert_eq!(read_metrics(&out.join("metrics.jsonl")).unwrap().0.len(), 6);

    // --overwrite replaces the whole run: no checkpoint of the old run survives.
    b.overwrite = true;
    run_training(&b, no_stop()).unwrap();
    assert_eq!(steps_of(&out), vec![3]);
    assert_eq!(read_metrics(&out.join("metrics.jsonl")).unwrap().0.len(), 3);
    // A directory holding an unrelated file is not a place for a fresh run either.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    assert!(run_training(&args(&other, 2), no_stop()).is_err());
}

#[test]
fn a_second_trainer_on_the_same_out_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let held = RunDirLock::acquire(&out).unwrap();
    let err = run_training(&args(&out, 2), no_stop())
        .unwrap_err()
        .to_string();
    assert!(err.contains("another eslm-train process"), "{err}");
    assert!(list_checkpoints(&out).unwrap().is_empty());
    drop(held);
    // Released: the run goes ahead (the lock file alone does not make --out "used").
    run_training(&args(&out, 2), no_stop()).unwrap();
    assert_eq!(steps_of(&out), vec![2]);
}

#[test]
fn resume_picks_the_newest_complete_checkpoint_and_recovers_interrupted_resaves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut a = args(&out, 4);
    a.checkpoint_every = Some(2);
    a.keep_last = Some(5);
    run_training(&a, no_stop()).unwrap();
    let ck = out.join("checkpoints");
    // A half-deleted "latest" checkpoint (no COMPLETE marker) is not a checkpoint.
    let four = ck.join("step_00000004");
    std::fs::remove_file(four.join("COMPLETE")).unwrap();
    assert_eq!(
        latest_checkpoint(&out).unwrap().unwrap(),
        ck.join("step_00000002")
    );
    // A crash between the two renames of a re-save: the complete copy sits in `.step_N.old`, the final name is
    // missing; the next trainer puts it back.
    std::fs::remove_dir_all(&four).unwrap();
    let two = ck.join("step_00000002");
    std::fs::rename(&two, ck.join(".step_00000002.old")).unwrap();
    std::fs::create_dir_all(ck.join(".step_00000003.tmp")).unwrap(); // an incomplete temporary
    assert!(latest_checkpoint(&out).unwrap().is_none());
    let actions = recover_checkpoints(&out).unwrap();
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert_eq!(steps_of(&out), vec![2]);
    assert!(!ck.join(".step_00000003.tmp").exists());

    let mut r = args(&out, 6);
    r.resume = true;
    let s = run_training(&r, no_stop()).unwrap();
    assert_eq!(s.resumed_from.unwrap(), two);
    assert_eq!(s.steps, 6);
}

#[test]
fn resaving_a_step_keeps_a_complete_copy_at_every_moment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let model = BigramModel::new(16);
    let state = TrainerState {
        version: TRAINER_STATE_VERSION,
        step: 7,
        tokens: 0,
        flops_paper: 0.0,
        flops_realized: 0.0,
        wall_s: 0.0,
        loader: loader_state(),
        policy: serde_json::Value::Null,
        vocab_size: 16,
        config: RunConfig::default(),
        world_size: 1,
        rank_policies: Vec::new(),
    };
    let first = save_checkpoint(out, &model, &state, 2).unwrap();
    let again = save_checkpoint(out, &model, &state, 2).unwrap();
    assert_eq!(first, again);
    verify_checkpoint(&again).unwrap();
    let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step_00000007".to_string()], "no leftovers");
}

/// A bigram whose optimizer files cannot be written (a full disk, say).
struct FailingSave(BigramModel);

impl LanguageModel for FailingSave {
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn max_seq_len(&self) -> usize {
        self.0.max_seq_len()
    }
    fn num_layers(&self) -> usize {
        self.0.num_layers()
    }
    fn num_params(&self) -> usize {
        self.0.num_params()
    }
    fn forward(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
    ) -> Result<&TokenStats> {
        self.0.forward(inputs, targets, b, t)
    }
    fn forward_rows(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        rows: &[u32],
    ) -> Result<&TokenStats> {
        self.0.forward_rows(inputs, targets, b, t, rows)
    }
    fn forward_inference(
        &mut self,
        inputs: &[u32],
        targets: &[i32],
        b: usize,
        t: usize,
        exit_layer: Option<usize>,
    ) -> Result<&TokenStats> {
        self.0.forward_inference(inputs, targets, b, t, exit_layer)
    }
    fn row_logits(&self, row: usize) -> Result<Vec<f32>> {
        self.0.row_logits(row)
    }
    fn select(&mut self, score: ScoreSource<'_>, keep: Keep) -> Result<&Selection> {
        self.0.select(score, keep)
    }
    fn loss_grad(&mut self, loss: LossSpec<'_>, scale: f32) -> Result<f32> {
        self.0.loss_grad(loss, scale)
    }
    fn backward(&mut self) -> Result<()> {
        self.0.backward()
    }
    fn reduce_grads(&mut self, collective: &dyn eslm_collective::Collective) -> Result<()> {
        self.0.reduce_grads(collective)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn zero_grad(&mut self) {
        self.0.zero_grad()
    }
    fn optimizer_step(&mut self, step: &OptimStep) -> Result<f32> {
        self.0.optimizer_step(step)
    }
    fn realized_flops(&self) -> u64 {
        self.0.realized_flops()
    }
    fn save_model(&self, dir: &Path) -> Result<()> {
        self.0.save_model(dir)
    }
    fn load_model(&mut self, dir: &Path) -> Result<()> {
        self.0.load_model(dir)
    }
    fn save_optimizer(&self, dir: &Path) -> Result<()> {
        Err(TrainError::io(
            dir.join("optimizer_m.bin"),
            std::io::Error::other("No space left on device"),
        ))
    }
    fn load_optimizer(&mut self, dir: &Path) -> Result<()> {
        self.0.load_optimizer(dir)
    }
}

#[test]
fn a_failed_checkpoint_write_leaves_no_temporary_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut state = TrainerState {
        version: TRAINER_STATE_VERSION,
        step: 3,
        tokens: 0,
        flops_paper: 0.0,
        flops_realized: 0.0,
        wall_s: 0.0,
        loader: loader_state(),
        policy: serde_json::Value::Null,
        vocab_size: 16,
        config: RunConfig::default(),
        world_size: 1,
        rank_policies: Vec::new(),
    };
    save_checkpoint(out, &BigramModel::new(16), &state, 1).unwrap();
    for step in [3, 4] {
        state.step = step;
        let err = save_checkpoint(out, &FailingSave(BigramModel::new(16)), &state, 1).unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["step_00000003".to_string()], "step {step}");
        verify_checkpoint(&out.join("checkpoints/step_00000003")).unwrap();
    }
}

#[test]
fn divergence_stops_with_an_error_and_keeps_the_checkpoint_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // 4 good steps with checkpoints, then a resume at an absurd learning rate.
    let mut a = args(&out, 4);
    a.checkpoint_every = Some(1);
    a.keep_last = Some(2);
    run_training(&a, no_stop()).unwrap();
    let mut bad = args(&out, 12);
    bad.resume = true;
    bad.lr = Some(1e3);
    bad.warmup_steps = Some(0);
    bad.checkpoint_every = Some(1);
    bad.keep_last = Some(1);
    let err = run_training(&bad, no_stop()).unwrap_err();
    let (step, ckpt) = match &err {
        TrainError::Diverged {
            step, checkpoint, ..
        }
        | TrainError::NonFinite {
            step, checkpoint, ..
        } => (*step, checkpoint.clone()),
        other => panic!("expected a divergence, got {other}"),
    };
    let text = err.to_string();
    assert!(text.contains("--resume") && text.contains("--lr"), "{text}");
    // The last good state is from before the update that broke the model (step ≤ N − 2), and it is what
    // --resume now picks.
    let good = ckpt.expect("a checkpoint precedes the divergence");
    let good_step: u64 = good.file_name().unwrap().to_str().unwrap()[5..]
        .parse()
        .unwrap();
    assert!(
        good_step + 2 <= step,
        "good {good_step}, diverged at {step}"
    );
    assert_eq!(latest_checkpoint(&out).unwrap().unwrap(), good);
    // The run continues from there with a sane learning rate.
    let mut fix = args(&out, 8);
    fix.resume = true;
    let s = run_training(&fix, no_stop()).unwrap();
    assert_eq!(s.resumed_from.unwrap(), good);
    assert!(s.losses.iter().all(|l| l.is_finite() && *l < 7.0));
}

#[test]
fn non_finite_loss_keeps_the_state_from_before_the_bad_update() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut a = args(&out, 4);
    a.checkpoint_every = Some(1);
    a.keep_last = Some(3);
    run_training(&a, no_stop()).unwrap();
    let mut bad = args(&out, 10);
    bad.resume = true;
    bad.lr = Some(3.3e38);
    bad.warmup_steps = Some(0);
    bad.grad_clip = Some(0.0);
    bad.divergence_factor = Some(0.0); // only the non-finite check
    bad.grad_spike_factor = Some(0.0);
    bad.checkpoint_every = Some(1);
    let err = run_training(&bad, no_stop()).unwrap_err();
    let TrainError::NonFinite {
        step, checkpoint, ..
    } = &err
    else {
        panic!("expected a non-finite loss, got {err}");
    };
    let good = checkpoint.clone().expect("an earlier checkpoint");
    assert!(
        good.ends_with(format!("step_{:08}", step - 2)),
        "{good:?} at {step}"
    );
    // The checkpoint holding the broken weights is renamed, not resumable.
    assert!(out
        .join("checkpoints")
        .join(format!("step_{:08}.diverged", step - 1))
        .is_dir());
    // Resuming with a normal --lr no longer hits the same NaN.
    let mut fix = args(&out, 8);
    fix.resume = true;
    let s = run_training(&fix, no_stop()).unwrap();
    assert!(s.losses.iter().all(|l| l.is_finite()));
    assert_eq!(s.steps, 8);
}

#[test]
fn a_weight_file_altered_on_disk_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run_training(&gpt(&out, 2), no_stop()).unwrap();
    let ck = latest_checkpoint(&out).unwrap().unwrap();
    let w = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40; // one weight, still a valid safetensors file
    std::fs::write(&w, bytes).unwrap();
    let mut r = gpt(&out, 4);
    r.resume = true;
    let err = run_training(&r, no_stop()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("checksum"),
        "{err}"
    );
    // A corrupt optimizer.json is named too.
    let dir2 = tempfile::tempdir().unwrap();
    let out2 = dir2.path().join("run");
    run_training(&gpt(&out2, 2), no_stop()).unwrap();
    let ck2 = latest_checkpoint(&out2).unwrap().unwrap();
    std::fs::write(ck2.join("optimizer.json"), "{\"step\": ").unwrap();
    let mut r2 = gpt(&out2, 4);
    r2.resume = true;
    let err = run_training(&r2, no_stop()).unwrap_err().to_string();
    assert!(err.contains("optimizer.json"), "{err}");
}

fn ckpt_of(out: &Path) -> PathBuf {
    latest_checkpoint(out).unwrap().unwrap()
}

#[test]
fn reference_and_teacher_are_checked_against_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // A bigram reference with another vocabulary.
    let other = dir.path().join("other-vocab");
    let mut o = args(&other, 2);
    o.vocab_size = Some(600);
    run_training(&o, no_stop()).unwrap();
    for select in [PolicyKind::Rho1, PolicyKind::EslmKd] {
        let mut r = args(&dir.path().join(format!("{select:?}")), 2);
        r.select = Some(select);
        r.reference = Some(ckpt_of(&other));
        r.teacher = Some(ckpt_of(&other));
        let err = run_training(&r, no_stop()).unwrap_err().to_string();
        let flag = if select == PolicyKind::Rho1 {
            "--reference"
        } else {
            "--teacher"
        };
        assert!(err.contains(flag) && err.contains("vocabulary"), "{err}");
    }
    // A GPT-2 reference with a shorter context than --seq-len.
    let short = dir.path().join("short");
    let mut s = gpt(&short, 1);
    s.seq_len = Some(8);
    run_training(&s, no_stop()).unwrap();
    let mut r = gpt(&dir.path().join("rho1-long"), 1);
    r.select = Some(PolicyKind::Rho1);
    r.reference = Some(ckpt_of(&short));
    let err = run_training(&r, no_stop()).unwrap_err().to_string();
    assert!(
        err.contains("--reference") && err.contains("context is 8") && err.contains("--seq-len 8"),
        "{err}"
    );
}
