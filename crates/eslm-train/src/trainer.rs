//! The training loop: one optimizer step = `grad_accum` micro-batches, each scored, selected and back-propagated
//! on its kept rows only (all inside the engine: the trainer sees per-row statistics and kept indices), then the
//! gradient reduction over ranks, clipping + AdamW; metrics, evaluation, checkpoints, exact resume, Ctrl-C and
//! non-finite handling.
//!
//! Loss normalisation. With the micro scope every micro-batch `j` of every rank selects its own kept set `K_j`
//! (VaR over its `M_j` valid rows) and contributes `(1/(A·R))·(1/n_j)·Σ_{i∈K_j} ℓ_i` with
//! `n_j = policy.normaliser(|K_j|, M_j)` (`|K_j|` for all but Rho-1's budget normalisation), `A` micro-batches
//! per step and `R` ranks. With the global scope a first pass forwards every micro-batch (no backward), the
//! threshold is the exact VaR over the scores of the whole step on every rank (a radix select whose histograms
//! are summed through the collective, never a gather of scores), and the second pass back-propagates
//! `(1/n)·Σ_{i∈K} ℓ_i` with `n = policy.normaliser(|K|, M)`, `|K|` and `M` summed over ranks. The global scope is
//! exact (the same kept set as one big batch) and costs one extra forward per micro-batch; the micro scope is
//! free but selects against a noisier, smaller sample. With `grad_accum = 1` on one rank both are identical and
//! no extra pass runs; with `grad_accum = 1` on several ranks the global scope scores with the training forward
//! (no extra pass). See [`crate::distributed`] for what else the ranks share.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use eslm_collective::{Collective, SingleProcess};
use eslm_data::synthetic::TokenKind;
use eslm_data::Batch;
use eslm_kernels::global_select::{global_threshold, ScorePart};
use eslm_kernels::select::SelectRule;
use eslm_kernels::token_stats::TokenStats;
use eslm_kernels::KernelError;

use crate::checkpoint::{
    latest_checkpoint, load_trainer_state, TrainerState, TRAINER_STATE_VERSION,
};
use crate::config::{QuantileScope, RunConfig};
use crate::data::{batch_kinds, RunData, ValData};
use crate::error::{Result, TrainError};
use crate::metrics::{EvalRecord, MetricsWriter, StepRecord};
use crate::model::{Keep, LanguageModel, OptimStep, ScoreSource};
use crate::policy::{Score, SelectionPolicy, StepContext};

/// The result of a validation pass.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// Mean CE over the tokens evaluated.
    pub loss: f64,
    /// Tokens evaluated.
    pub tokens: u64,
    /// Mean loss per kind `[template, learnable, noise]` (synthetic data).
    pub loss_by_kind: Option<[f64; 3]>,
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// The policy's name.
    pub policy: String,
    /// Steps completed (including those of a resumed checkpoint).
    pub steps: u64,
    /// Validation before the first step of this invocation.
    pub val_before: Option<EvalResult>,
    /// Validation at the end.
    pub val_after: Option<EvalResult>,
    /// Mean kept fraction over this invocation's steps.
    pub kept_fraction: f64,
    /// Training tokens per second over this invocation (training time only).
    pub tokens_per_s: f64,
    /// Kept tokens per kind over this invocation `[template, learnable, noise]` (synthetic data).
    pub kind_kept: Option<[u64; 3]>,
    /// Valid tokens per kind over this invocation.
    pub kind_total: Option<[u64; 3]>,
    /// Mean training loss (all tokens) of every step of this invocation, in order.
    pub losses: Vec<f32>,
    /// The final α (ada-eslm: adapted).
    pub final_alpha: Option<f64>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// True when Ctrl-C stopped the run early.
    pub interrupted: bool,
    /// Steps skipped because of a non-finite loss (with --skip-nonfinite).
    pub skipped_steps: u64,
    /// True when `--time-budget` ended the run before its last step.
    pub time_budget_reached: bool,
    /// The checkpoint a `--resume` continued from (set by `run::run_training`).
    pub resumed_from: Option<PathBuf>,
    /// With several ranks: the share of this invocation's training time this rank spent in the gradient
    /// reduction (transfer, and waiting for slower ranks). It bounds what overlapping the reduction with the
    /// backward could save.
    pub reduce_share: Option<f64>,
}

/// Per-step accumulators (this rank's; summed over ranks by [`StepAcc::reduce`] before they are logged).
#[derive(Debug, Default)]
struct StepAcc {
    loss_sum: f64,
    loss_count: u64,
    kept_loss_sum: f64,
    kept: u64,
    valid: u64,
    seqs_kept: u64,
    seqs_total: u64,
    threshold: Option<f32>,
    flops_paper: f64,
    kind_kept: [u64; 3],
    kind_total: [u64; 3],
    all_scores: Vec<f32>,
    all_keep: Vec<bool>,
    all_valid: Vec<bool>,
    nonfinite: Option<f32>,
}

impl StepAcc {
    /// Sums the logged counters over the ranks of `c` (a no-op for one process); a non-finite loss on any rank
    /// marks the step non-finite on every rank, so all ranks skip or stop together.
    fn reduce(&mut self, c: &dyn Collective) -> Result<()> {
        if c.world_size() == 1 {
            return Ok(());
        }
        let mut v = [
            self.loss_sum,
            self.loss_count as f64,
            self.kept_loss_sum,
            self.kept as f64,
            self.valid as f64,
            self.seqs_kept as f64,
            self.seqs_total as f64,
            self.flops_paper,
            self.nonfinite.map_or(0.0, |_| 1.0),
            self.kind_kept[0] as f64,
            self.kind_kept[1] as f64,
            self.kind_kept[2] as f64,
            self.kind_total[0] as f64,
            self.kind_total[1] as f64,
            self.kind_total[2] as f64,
        ];
        c.all_reduce_sum_f64(&mut v)?;
        self.loss_sum = v[0];
        self.loss_count = v[1] as u64;
        self.kept_loss_sum = v[2];
        self.kept = v[3] as u64;
        self.valid = v[4] as u64;
        self.seqs_kept = v[5] as u64;
        self.seqs_total = v[6] as u64;
        self.flops_paper = v[7];
        for i in 0..3 {
            self.kind_kept[i] = v[9 + i] as u64;
            self.kind_total[i] = v[12 + i] as u64;
        }
        if v[8] > 0.0 && self.nonfinite.is_none() {
            self.nonfinite = Some(f32::NAN);
        }
        Ok(())
    }
}

/// A micro-batch after sequence filtering.
#[derive(Debug, Clone, Default)]
struct Micro {
    inputs: Vec<u32>,
    targets: Vec<i32>,
    kinds: Option<Vec<TokenKind>>,
    b: usize,
    t: usize,
    /// The sequences of the loaded batch this micro-batch holds, when a policy filtered them after a shallow
    /// pass (the engine may continue that pass for them: `LanguageModel::forward_sequences`).
    seqs: Option<Vec<usize>>,
}

/// How the kept rows of a micro-batch are chosen.
enum KeepRule<'a> {
    /// VaR over this micro-batch at the policy's α (or all valid rows when α is `None`).
    Micro,
    /// Rows whose pass-1 `scores` are ≥ `threshold` (global scope), loss divided by `divisor`.
    Global {
        scores: &'a [f32],
        threshold: f32,
        divisor: f64,
    },
}

/// A training run.
pub struct Trainer {
    cfg: RunConfig,
    model: Box<dyn LanguageModel>,
    policy: Box<dyn SelectionPolicy>,
    data: RunData,
    stop: Arc<AtomicBool>,
    collective: Arc<dyn Collective>,
    step: u64,
    tokens: u64,
    flops_paper: f64,
    flops_realized: f64,
    wall_s: f64,
    /// Seconds spent in `reduce_grads` by this process (this invocation).
    reduce_s: f64,
    /// Host copy of the current micro-batch's row statistics (per-row vectors only).
    stats: TokenStats,
    /// Scores a policy computed itself ([`Score::Host`]).
    host_scores: Vec<f32>,
    last_checkpoint: Option<PathBuf>,
    /// When the last checkpoint was written by this process (or the trainer was built): `--checkpoint-interval`.
    last_checkpoint_at: std::time::Instant,
    guard: crate::guard::RunGuard,
}

fn to_i32(targets: &[u32]) -> Vec<i32> {
    targets.iter().map(|&x| x as i32).collect()
}

impl Trainer {
    /// A trainer for `cfg` with a built `model`, `policy` and `data`. `stop` is polled after every step
    /// (Ctrl-C): when set the run checkpoints and returns. Runs as a single process until
    /// [`Trainer::with_collective`] says otherwise.
    pub fn new(
        cfg: RunConfig,
        model: Box<dyn LanguageModel>,
        policy: Box<dyn SelectionPolicy>,
        data: RunData,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        if model.vocab_size() != data.vocab_size {
            return Err(TrainError::Config(format!(
                "model vocabulary {} differs from the data's {}; HINT: pass --vocab-size or a matching --init-from",
                model.vocab_size(),
                data.vocab_size
            )));
        }
        if cfg.seq_len > model.max_seq_len() {
            return Err(TrainError::Config(format!(
                "--seq-len {} exceeds the model's maximum sequence length {}",
                cfg.seq_len,
                model.max_seq_len()
            )));
        }
        crate::data::check_vocab(&data, model.vocab_size())?;
        let guard = crate::guard::RunGuard::new(&cfg, model.vocab_size());
        Ok(Trainer {
            cfg,
            model,
            policy,
            data,
            stop,
            collective: Arc::new(SingleProcess),
            step: 0,
            tokens: 0,
            flops_paper: 0.0,
            flops_realized: 0.0,
            wall_s: 0.0,
            reduce_s: 0.0,
            stats: TokenStats::default(),
            host_scores: Vec::new(),
            last_checkpoint: None,
            last_checkpoint_at: std::time::Instant::now(),
            guard,
        })
    }

    /// Trains as one rank of a data-parallel job whose ranks agree through `collective` (gradients, the global
    /// VaR threshold, the kept count, policy statistics and logged counters).
    pub fn with_collective(mut self, collective: Arc<dyn Collective>) -> Self {
        self.collective = collective;
        self
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &dyn LanguageModel {
        self.model.as_ref()
    }

    /// Restores the latest checkpoint of `cfg.out` (weights, optimizer, data position, policy state, counters).
    /// Returns the step resumed from.
    pub fn resume(&mut self) -> Result<u64> {
        let dir = latest_checkpoint(&self.cfg.out)?.ok_or_else(|| {
            TrainError::Checkpoint(format!(
                "--resume: no checkpoint in {}; HINT: run without --resume first",
                self.cfg.out.join("checkpoints").display()
            ))
        })?;
        crate::checkpoint::verify_checkpoint(&dir)?;
        let state = load_trainer_state(&dir)?;
        if state.vocab_size != self.model.vocab_size() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint vocabulary {} differs from the model's {}",
                state.vocab_size,
                self.model.vocab_size()
            )));
        }
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        if state.world_size != world {
            return Err(TrainError::Checkpoint(format!(
                "--resume: {} was written by {} rank(s), this job has {world}; the data order and per-rank \
                 state depend on the world size; HINT: resume with `mpirun -np {}`",
                dir.display(),
                state.world_size,
                state.world_size
            )));
        }
        self.model.load_model(&dir)?;
        self.model.load_optimizer(&dir)?;
        // Every rank shares rank 0's position (ranks take equal shares of each epoch) at its own rank.
        let loader = eslm_data::LoaderState {
            rank,
            ..state.loader.clone()
        };
        self.data.train.loader.restore(&loader)?;
        self.policy
            .restore(state.rank_policies.get(rank).unwrap_or(&state.policy))?;
        self.step = state.step;
        self.tokens = state.tokens;
        self.flops_paper = state.flops_paper;
        self.flops_realized = state.flops_realized;
        self.wall_s = state.wall_s;
        self.guard.saved(state.step);
        self.last_checkpoint = Some(dir);
        Ok(state.step)
    }

    fn trainer_state(
        &self,
        loader: eslm_data::LoaderState,
        policy: serde_json::Value,
    ) -> TrainerState {
        TrainerState {
            version: TRAINER_STATE_VERSION,
            step: self.step,
            tokens: self.tokens,
            flops_paper: self.flops_paper,
            flops_realized: self.flops_realized,
            wall_s: self.wall_s,
            loader,
            policy,
            vocab_size: self.model.vocab_size(),
            config: self.cfg.clone(),
            world_size: self.collective.world_size(),
            rank_policies: Vec::new(),
        }
    }

    /// Writes the checkpoint of `state` (every rank calls it): with several ranks the policy states of all ranks
    /// (and a sharded optimizer's moments) are gathered, rank 0 writes (the parameters and optimizer state are
    /// identical on every rank) and the others wait at a barrier, so no rank runs ahead of a checkpoint that is
    /// not on disk yet.
    fn save_state(&mut self, mut state: TrainerState) -> Result<PathBuf> {
        self.model.gather_for_checkpoint()?;
        let c = self.collective.as_ref();
        if c.world_size() > 1 {
            state.rank_policies = crate::distributed::all_gather_json(c, &state.policy)?;
        }
        let dir = if c.is_root() {
            crate::checkpoint::save_checkpoint_protecting(
                &self.cfg.out,
                self.model.as_ref(),
                &state,
                self.cfg.keep_last,
                self.guard.protected(),
            )?
        } else {
            crate::checkpoint::checkpoints_dir(&self.cfg.out)
                .join(crate::checkpoint::checkpoint_name(state.step))
        };
        c.barrier()?;
        Ok(dir)
    }

    /// Writes a checkpoint of the current state (nothing when the last checkpoint already holds this step; with
    /// several ranks every rank calls it and rank 0 writes).
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        // Rank 0 decides whether this step is already saved (it owns the directory, which other ranks may not
        // see), and every rank follows: the save is collective, so all must take the same branch.
        let c = self.collective.as_ref();
        let same_step = self
            .last_checkpoint
            .clone()
            .filter(|d| d.ends_with(crate::checkpoint::checkpoint_name(self.step)));
        let mut held = [same_step
            .as_ref()
            .is_some_and(|d| c.is_root() && crate::checkpoint::is_complete(d))
            as u8 as f64];
        if c.world_size() > 1 {
            c.all_reduce_sum_f64(&mut held)?;
        }
        if let (true, Some(dir)) = (held[0] > 0.0, same_step) {
            return Ok(dir);
        }
        let state = self.trainer_state(self.data.train.loader.state(), self.policy.state());
        let dir = self.save_state(state)?;
        self.guard.saved(self.step);
        self.last_checkpoint = Some(dir.clone());
        self.last_checkpoint_at = std::time::Instant::now();
        Ok(dir)
    }

    /// Turns a divergence or non-finite failure at step `step` into its final error: quarantines the checkpoints
    /// that may hold broken weights and names the last good one (see [`crate::guard`]).
    fn fail_diverged(&mut self, err: TrainError) -> TrainError {
        let step = match &err {
            TrainError::NonFinite { step, .. } | TrainError::Diverged { step, .. } => *step,
            _ => return err,
        };
        let good = match crate::guard::quarantine_after(&self.cfg.out, step) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let text = crate::guard::divergence_hint(&self.cfg.out, good.as_deref());
        match err {
            TrainError::NonFinite { step, loss, .. } => TrainError::NonFinite {
                step,
                loss,
                checkpoint: good,
                hint: text,
            },
            TrainError::Diverged { step, reason, .. } => TrainError::Diverged {
                step,
                reason,
                checkpoint: good,
                hint: text,
            },
            other => other,
        }
    }

    /// Training tokens per optimizer step over all ranks (ranks × B·T·grad_accum).
    fn tokens_per_step(&self) -> u64 {
        self.cfg.tokens_per_step() * self.collective.world_size() as u64
    }

    /// The run's config as the step count and LR schedule see it: `--token-budget` counts the tokens of all
    /// ranks, so each step consumes ranks × B·T·grad_accum of it.
    fn schedule_config(&self) -> RunConfig {
        let mut c = self.cfg.clone();
        let world = self.collective.world_size() as u64;
        c.token_budget = c.token_budget.map(|b| b.div_ceil(world));
        c
    }

    /// What to do after this step ([`LoopFlags`]: stop on an interrupt or a spent time budget, checkpoint when
    /// `--checkpoint-interval` passed), each true when it is on any rank, agreed by one sum over ranks (every rank
    /// calls this once per step, so all take the same branch after the same step).
    fn stop_flags(&self) -> Result<LoopFlags> {
        let due = self
            .cfg
            .checkpoint_interval_s()
            .is_some_and(|s| self.last_checkpoint_at.elapsed().as_secs_f64() >= s);
        let local = [
            self.stop.load(Ordering::SeqCst),
            self.guard.time_up(self.wall_s),
            due,
        ];
        // Any rank's flag counts on every rank (each measures its own clock; all must take the same branch).
        let agreed = if self.collective.world_size() == 1 {
            local
        } else {
            let mut v = local.map(|b| if b { 1.0 } else { 0.0 });
            self.collective.all_reduce_sum_f64(&mut v)?;
            v.map(|x| x > 0.0)
        };
        Ok(LoopFlags {
            interrupted: agreed[0],
            time_up: agreed[1],
            checkpoint_due: agreed[2],
        })
    }

    /// The LR horizon under `--time-budget`, once estimated: the mean of the ranks' estimates (each rank
    /// measures its own step time; the schedule must be the same on every rank).
    fn agreed_horizon(&self, total: u64) -> Result<Option<u64>> {
        let local = self.guard.estimate_horizon(self.step, self.wall_s, total);
        let world = self.collective.world_size();
        if world == 1 {
            return Ok(local);
        }
        let mut v = [local.map_or(0.0, |h| h as f64), local.map_or(0.0, |_| 1.0)];
        self.collective.all_reduce_sum_f64(&mut v)?;
        Ok((v[1] > 0.0).then(|| (v[0] / v[1]).round() as u64))
    }

    /// Mean CE of the model on the validation set (up to `cfg.eval_batches` batches).
    pub fn evaluate(&mut self) -> Result<Option<EvalResult>> {
        let Some(val) = &self.data.val else {
            return Ok(None);
        };
        evaluate_on(
            self.model.as_mut(),
            val,
            self.cfg.eval_batches,
            self.collective.as_ref(),
        )
        .map(Some)
    }

    /// Filters the sequences of `batch` through the policy and returns the micro-batch to train on.
    fn filter(&mut self, batch: &Batch, acc: &mut StepAcc) -> Result<Micro> {
        let vocab = self.model.vocab_size();
        crate::error::check_tokens(batch.inputs.iter().chain(&batch.targets), vocab)?;
        let targets = to_i32(&batch.targets);
        let kinds = batch_kinds(self.data.train.kinds.as_ref(), batch)?;
        let (b, t) = (batch.b, batch.t);
        acc.valid += targets.iter().filter(|&&y| y >= 0).count() as u64;
        acc.seqs_total += b as u64;
        if let Some(k) = &kinds {
            for &kind in k {
                acc.kind_total[kind as usize] += 1;
            }
        }
        let shallow_flops = (b * t) as f64
            * self
                .model
                .paper_forward_flops_per_token(Some(self.cfg.exit_layer));
        let kept = self.policy.filter_sequences(
            self.model.as_mut(),
            &batch.inputs,
            &targets,
            b,
            t,
            self.collective.as_ref(),
        )?;
        Ok(match kept {
            None => {
                acc.seqs_kept += b as u64;
                Micro {
                    inputs: batch.inputs.clone(),
                    targets,
                    kinds,
                    b,
                    t,
                    seqs: None,
                }
            }
            Some(seqs) => {
                acc.flops_paper += shallow_flops;
                acc.seqs_kept += seqs.len() as u64;
                let mut m = Micro {
                    b: seqs.len(),
                    t,
                    seqs: Some(seqs.clone()),
                    ..Default::default()
                };
                m.kinds = kinds.as_ref().map(|_| Vec::with_capacity(seqs.len() * t));
                for &s in &seqs {
                    m.inputs
                        .extend_from_slice(&batch.inputs[s * t..(s + 1) * t]);
                    m.targets.extend_from_slice(&targets[s * t..(s + 1) * t]);
                    if let (Some(dst), Some(src)) = (m.kinds.as_mut(), kinds.as_ref()) {
                        dst.extend_from_slice(&src[s * t..(s + 1) * t]);
                    }
                }
                m
            }
        })
    }

    /// Pass 1 of the global scope: no-grad forward + statistics + scores of a micro-batch. Returns host copies
    /// of the scores and the valid mask (per-row vectors).
    fn score_micro(&mut self, micro: &Micro, acc: &mut StepAcc) -> Result<(Vec<f32>, Vec<bool>)> {
        if micro.b == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let (b, t, n) = (micro.b, micro.t, micro.b * micro.t);
        acc.flops_paper += n as f64 * self.model.paper_forward_flops_per_token(None);
        self.policy.prepare(&micro.inputs, &micro.targets, b, t)?;
        let stats = self
            .model
            .forward_inference(&micro.inputs, &micro.targets, b, t, None)?;
        self.stats.clone_from(stats);
        if let Some(bad) = nonfinite_mean(&self.stats) {
            acc.nonfinite = Some(bad);
            return Ok((Vec::new(), Vec::new()));
        }
        let scores = self.scores_of_micro(micro)?.to_vec();
        Ok((scores, self.stats.valid.clone()))
    }

    /// The policy's scores of the micro-batch whose statistics are in `self.stats`.
    fn scores_of_micro(&mut self, micro: &Micro) -> Result<&[f32]> {
        Ok(self.scored_micro(micro)?.1)
    }

    /// [`Trainer::scores_of_micro`] with the kind of score the policy chose (the engine's own loss or entropy, or
    /// a host vector).
    fn scored_micro(&mut self, micro: &Micro) -> Result<(Score, &[f32])> {
        let ctx = StepContext {
            targets: &micro.targets,
            stats: &self.stats,
            b: micro.b,
            t: micro.t,
            step: self.step,
        };
        let kind = self.policy.score(&ctx, &mut self.host_scores)?;
        Ok((
            kind,
            match kind {
                Score::Loss => &self.stats.loss,
                Score::Entropy => &self.stats.entropy,
                Score::Host => {
                    if self.host_scores.len() != self.stats.rows() {
                        return Err(TrainError::Model(format!(
                            "policy {} wrote {} scores for {} rows",
                            self.policy.name(),
                            self.host_scores.len(),
                            self.stats.rows()
                        )));
                    }
                    &self.host_scores
                }
            },
        ))
    }

    /// Forward, selection, kept-row loss gradient and sparse backward of one micro-batch, all in the engine.
    fn train_micro(&mut self, micro: &Micro, rule: KeepRule<'_>, acc: &mut StepAcc) -> Result<()> {
        if let (KeepRule::Micro, true) = (&rule, micro.b > 0) {
            if let Some(rows) = self.policy.rows_before_forward(&micro.targets)? {
                return self.train_micro_rows(micro, &rows, acc);
            }
        }
        match self.forward_micro(micro, acc)? {
            Some(valid_here) => self.backward_micro(micro, rule, valid_here, acc),
            None => Ok(()),
        }
    }

    /// The training forward of a micro-batch: its statistics into `self.stats`, its all-token loss into `acc`.
    /// Returns the number of valid rows, or `None` when there is nothing to select (an empty micro-batch, no
    /// valid row, or a non-finite loss, recorded in `acc`).
    fn forward_micro(&mut self, micro: &Micro, acc: &mut StepAcc) -> Result<Option<usize>> {
        if micro.b == 0 {
            return Ok(None);
        }
        let (b, t, n) = (micro.b, micro.t, micro.b * micro.t);
        let fwd_flops = self.model.paper_forward_flops_per_token(None);
        self.policy.prepare(&micro.inputs, &micro.targets, b, t)?;
        let stats = match &micro.seqs {
            Some(seqs) => self
                .model
                .forward_sequences(seqs, &micro.inputs, &micro.targets, t)?,
            None => self.model.forward(&micro.inputs, &micro.targets, b, t)?,
        };
        self.stats.clone_from(stats);
        acc.flops_paper += n as f64 * fwd_flops;
        if let Some(bad) = nonfinite_mean(&self.stats) {
            acc.nonfinite = Some(bad);
            return Ok(None);
        }
        for (l, &v) in self.stats.loss.iter().zip(&self.stats.valid) {
            if v {
                acc.loss_sum += *l as f64;
                acc.loss_count += 1;
            }
        }
        let valid_here = self.stats.num_valid();
        Ok((valid_here > 0).then_some(valid_here))
    }

    /// Selection, kept-row loss gradient and sparse backward of the micro-batch just forwarded by
    /// [`Trainer::forward_micro`] (`valid_here` valid rows).
    fn backward_micro(
        &mut self,
        micro: &Micro,
        rule: KeepRule<'_>,
        valid_here: usize,
        acc: &mut StepAcc,
    ) -> Result<()> {
        // The engine's own loss or entropy is selected where it lies (no upload of a copy); a policy's host vector
        // and the global scope's pass-1 scores are handed over.
        let (kind, scores, keep, divisor) = match rule {
            KeepRule::Micro => {
                let (kind, scores) = self.scored_micro(micro)?;
                (kind, scores.to_vec(), self.policy.keep(), None)
            }
            KeepRule::Global {
                scores,
                threshold,
                divisor,
            } => (
                Score::Host,
                scores.to_vec(),
                Keep::AtLeast(threshold),
                Some(divisor),
            ),
        };
        let source = match kind {
            Score::Loss => ScoreSource::Loss,
            Score::Entropy => ScoreSource::Entropy,
            Score::Host => ScoreSource::Host(&scores),
        };
        let sel = self.model.select(source, keep)?;
        let k = sel.indices.len();
        acc.threshold = (!sel.threshold.is_nan()).then_some(sel.threshold);
        acc.all_scores.extend_from_slice(&scores);
        acc.all_keep.extend_from_slice(&sel.keep);
        acc.all_valid.extend_from_slice(&self.stats.valid);
        if let Some(kinds) = &micro.kinds {
            for &r in &sel.indices {
                acc.kind_kept[kinds[r as usize] as usize] += 1;
            }
        }
        if k == 0 {
            return Ok(());
        }
        // Micro scope: each micro-batch's mean over its kept rows, averaged over micro-batches and ranks.
        let world = self.collective.world_size() as f64;
        let divisor = divisor.unwrap_or_else(|| {
            self.policy.normaliser(k, valid_here) * self.cfg.grad_accum as f64 * world
        });
        self.backward_kept(k, divisor, acc)
    }

    /// The policy's loss gradient of the `k` selected rows divided by `divisor`, then the row-sparse backward;
    /// a non-finite kept loss is recorded in `acc` instead (no backward).
    fn backward_kept(&mut self, k: usize, divisor: f64, acc: &mut StepAcc) -> Result<()> {
        let scale = (1.0 / divisor.max(1e-30)) as f32;
        let kept_loss = self.model.loss_grad(self.policy.loss(), scale)?;
        if !kept_loss.is_finite() {
            acc.nonfinite = Some(kept_loss);
            return Ok(());
        }
        acc.kept_loss_sum += kept_loss as f64 * k as f64;
        acc.kept += k as u64;
        acc.flops_paper += 2.0 * self.model.paper_forward_flops_per_token(None) * k as f64;
        self.model.backward()
    }

    /// A micro-batch whose rows the policy chose before the forward: the engine computes the LM head, the
    /// statistics and the gradient of those rows only. The logged loss is the mean over the kept rows.
    fn train_micro_rows(&mut self, micro: &Micro, rows: &[u32], acc: &mut StepAcc) -> Result<()> {
        let (b, t, n) = (micro.b, micro.t, micro.b * micro.t);
        let fwd_flops = self.model.paper_forward_flops_per_token(None);
        acc.flops_paper += n as f64 * fwd_flops;
        let k = rows.len();
        if k == 0 {
            return Ok(());
        }
        self.policy.prepare(&micro.inputs, &micro.targets, b, t)?;
        let stats = self
            .model
            .forward_rows(&micro.inputs, &micro.targets, b, t, rows)?;
        self.stats.clone_from(stats);
        if let Some(bad) = nonfinite_mean(&self.stats) {
            acc.nonfinite = Some(bad);
            return Ok(());
        }
        for &l in &self.stats.loss {
            acc.loss_sum += l as f64;
            acc.loss_count += 1;
        }
        let valid_here = micro.targets.iter().filter(|&&y| y >= 0).count();
        self.model.select(ScoreSource::Loss, Keep::AllValid)?;
        if let Some(kinds) = &micro.kinds {
            for &r in rows {
                acc.kind_kept[kinds[r as usize] as usize] += 1;
            }
        }
        let world = self.collective.world_size() as f64;
        let divisor = self.policy.normaliser(k, valid_here) * self.cfg.grad_accum as f64 * world;
        self.backward_kept(k, divisor, acc)
    }

    /// Micro scope: each micro-batch selects its own rows. Every micro-batch runs even after a non-finite one
    /// (without its backward), so every rank makes the same collective calls.
    fn micro_scope(&mut self, acc: &mut StepAcc) -> Result<()> {
        for _ in 0..self.cfg.grad_accum {
            let batch = self.data.train.loader.next_batch()?;
            let micro = self.filter(&batch, acc)?;
            if acc.nonfinite.is_none() {
                self.train_micro(&micro, KeepRule::Micro, acc)?;
            }
        }
        Ok(())
    }

    /// Global scope: pass 1 scores every micro-batch (no backward); the exact VaR threshold over every micro-batch
    /// of every rank comes from histograms reduced through the collective; the kept count is summed over ranks
    /// for the `1/K` normaliser; pass 2 back-propagates the kept rows. With one micro-batch per step (several
    /// ranks, no accumulation) the training forward is pass 1: no extra forward.
    fn global_scope(&mut self, alpha: f64, acc: &mut StepAcc) -> Result<()> {
        if self.cfg.grad_accum == 1 {
            let batch = self.data.train.loader.next_batch()?;
            let micro = self.filter(&batch, acc)?;
            let valid_here = self.forward_micro(&micro, acc)?;
            let (scores, valid) = match valid_here {
                Some(_) => (
                    self.scores_of_micro(&micro)?.to_vec(),
                    self.stats.valid.clone(),
                ),
                None => (Vec::new(), Vec::new()),
            };
            let part = [ScorePart {
                scores: &scores,
                valid: Some(&valid),
            }];
            if let (Some((threshold, divisor)), Some(v)) =
                (self.agree_threshold(alpha, &part, acc)?, valid_here)
            {
                let rule = KeepRule::Global {
                    scores: &scores,
                    threshold,
                    divisor,
                };
                self.backward_micro(&micro, rule, v, acc)?;
            }
            return Ok(());
        }
        let mut micros = Vec::with_capacity(self.cfg.grad_accum);
        for _ in 0..self.cfg.grad_accum {
            let batch = self.data.train.loader.next_batch()?;
            let micro = self.filter(&batch, acc)?;
            let (scores, valid) = self.score_micro(&micro, acc)?;
            micros.push((micro, scores, valid));
        }
        let parts: Vec<ScorePart> = micros
            .iter()
            .map(|(_, s, v)| ScorePart {
                scores: s,
                valid: Some(v),
            })
            .collect();
        let Some((threshold, divisor)) = self.agree_threshold(alpha, &parts, acc)? else {
            return Ok(());
        };
        for (micro, scores, _) in &micros {
            let rule = KeepRule::Global {
                scores,
                threshold,
                divisor,
            };
            self.train_micro(micro, rule, acc)?;
        }
        Ok(())
    }

    /// The ranks' agreement of the global scope over this rank's scored `parts`: a non-finite loss anywhere
    /// (then `None`, recorded in `acc`), else the exact VaR threshold at `alpha` over every rank's valid rows and
    /// the loss divisor from the kept count summed over ranks. `None` too when no rank has a valid row.
    fn agree_threshold(
        &self,
        alpha: f64,
        parts: &[ScorePart<'_>],
        acc: &mut StepAcc,
    ) -> Result<Option<(f32, f64)>> {
        let coll = self.collective.as_ref();
        let bad = coll.sum_f64(acc.nonfinite.map_or(0.0, |_| 1.0))?;
        if bad > 0.0 {
            acc.nonfinite.get_or_insert(f32::NAN);
            return Ok(None);
        }
        let mut reduce = |h: &mut [u32]| coll.all_reduce_sum_u32(h).map_err(|e| e.to_string());
        let g = match global_threshold(parts, alpha, &mut reduce) {
            Ok(g) => g,
            Err(KernelError::NoValidRows) => return Ok(None), // every target ignored on every rank
            Err(e) => return Err(e.into()),
        };
        let local_kept = parts
            .iter()
            .flat_map(|p| p.scores.iter().zip(p.valid.unwrap_or(&[])))
            .filter(|(&s, &v)| v && s >= g.threshold)
            .count();
        let kept = coll.sum_f64(local_kept as f64)? as usize;
        Ok(Some((g.threshold, self.policy.normaliser(kept, g.valid))))
    }

    /// One optimizer step: the micro-batches (forward, selection, backward of the kept rows), the gradient
    /// reduction over ranks, then norm, clipping and AdamW. Returns the step's record, or an error (non-finite
    /// loss without --skip-nonfinite, after checkpointing the last good state).
    fn train_step(&mut self) -> Result<StepRecord> {
        let t0 = Instant::now();
        let realized_before = self.model.realized_flops();
        let mut acc = StepAcc::default();
        self.model.zero_grad();
        self.policy.start_step(self.step);
        let alpha = self.policy.alpha();
        let world = self.collective.world_size();
        let global = self.cfg.quantile_scope == QuantileScope::Global
            && (self.cfg.grad_accum > 1 || world > 1);
        match self.policy.keep() {
            Keep::Rule(SelectRule::Var { alpha }) if global => {
                self.global_scope(alpha, &mut acc)?
            }
            _ => self.micro_scope(&mut acc)?,
        }
        acc.reduce(self.collective.as_ref())?;
        let lr = self.schedule_config().lr_at(self.step);
        let mut grad_norm = f32::NAN;
        if acc.nonfinite.is_none() {
            let t_reduce = Instant::now();
            self.model.reduce_grads(self.collective.as_ref())?;
            self.reduce_s += t_reduce.elapsed().as_secs_f64();
            grad_norm = self.model.optimizer_step(&self.optim_step(lr))?;
            if !grad_norm.is_finite() {
                acc.nonfinite = Some(grad_norm);
            }
        }
        let skipped = acc.nonfinite.is_some();
        if let Some(bad) = acc.nonfinite {
            self.model.zero_grad();
            if !self.cfg.skip_nonfinite {
                // No checkpoint: the weights after the previous update produced this, so the last good state is
                // an earlier checkpoint (`Trainer::run` names it; see crate::guard).
                return Err(TrainError::NonFinite {
                    step: self.step + 1,
                    loss: bad,
                    checkpoint: None,
                    hint: String::new(),
                });
            }
        } else {
            self.policy.observe(
                &acc.all_scores,
                &acc.all_keep,
                &acc.all_valid,
                self.collective.as_ref(),
            )?;
        }
        let dt = t0.elapsed().as_secs_f64();
        let mut realized = self.model.realized_flops().saturating_sub(realized_before) as f64;
        if self.collective.world_size() > 1 {
            realized = self.collective.sum_f64(realized)?;
        }
        self.step += 1;
        self.tokens += self.tokens_per_step();
        self.wall_s += dt;
        self.flops_paper += acc.flops_paper;
        self.flops_realized += realized;
        Ok(self.step_record(&acc, lr, alpha, grad_norm, dt, realized, skipped))
    }

    /// The optimizer hyper-parameters at learning rate `lr`.
    fn optim_step(&self, lr: f64) -> OptimStep {
        OptimStep {
            lr: lr as f32,
            weight_decay: self.cfg.weight_decay as f32,
            beta1: self.cfg.beta1 as f32,
            beta2: self.cfg.beta2 as f32,
            eps: self.cfg.eps as f32,
            grad_clip: self.cfg.grad_clip as f32,
        }
    }

    /// The metrics line of the step just taken.
    #[allow(clippy::too_many_arguments)] // the step's scalars, named at the one call site
    fn step_record(
        &self,
        acc: &StepAcc,
        lr: f64,
        alpha: Option<f64>,
        grad_norm: f32,
        dt: f64,
        realized: f64,
        skipped: bool,
    ) -> StepRecord {
        let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
        let has_kinds = self.data.train.kinds.is_some();
        StepRecord {
            kind: "step".into(),
            step: self.step,
            lr,
            loss: if acc.loss_count > 0 {
                (acc.loss_sum / acc.loss_count as f64) as f32
            } else {
                f32::NAN
            },
            loss_kept: if acc.kept > 0 {
                (acc.kept_loss_sum / acc.kept as f64) as f32
            } else {
                f32::NAN
            },
            kept_fraction: ratio(acc.kept as f64, acc.valid as f64),
            kept_tokens: acc.kept,
            threshold: acc.threshold,
            alpha,
            sequence_fraction: ratio(acc.seqs_kept as f64, acc.seqs_total as f64),
            grad_norm,
            step_time_s: dt,
            tokens_per_s: self.tokens_per_step() as f64 / dt.max(1e-12),
            tokens: self.tokens,
            flops_paper: acc.flops_paper,
            flops_realized: realized,
            flops_paper_total: self.flops_paper,
            flops_realized_total: self.flops_realized,
            wall_s: self.wall_s,
            kind_kept: has_kinds.then_some(acc.kind_kept),
            kind_total: has_kinds.then_some(acc.kind_total),
            skipped,
        }
    }

    fn eval_record(&self, r: &EvalResult) -> EvalRecord {
        EvalRecord {
            kind: "eval".into(),
            step: self.step,
            tokens: self.tokens,
            flops_paper_total: self.flops_paper,
            flops_realized_total: self.flops_realized,
            wall_s: self.wall_s,
            val_loss: r.loss,
            val_ppl: r.loss.exp(),
            val_tokens: r.tokens,
            val_loss_by_kind: r.loss_by_kind,
        }
    }

    /// Runs to `cfg.total_steps()` (or until the stop flag is set), writing metrics, evaluations and checkpoints.
    /// With several ranks every rank runs this loop in lockstep (each evaluates the whole validation set, so the
    /// results are identical on every rank); pass rank 0 the real `metrics` and the others
    /// [`MetricsWriter::discard`].
    pub fn run(&mut self, metrics: &mut MetricsWriter) -> Result<TrainSummary> {
        let total = self.schedule_config().total_steps();
        let fresh = self.step == 0;
        let val_before = self.evaluate()?;
        if let (true, Some(r)) = (fresh, &val_before) {
            metrics.write(&self.eval_record(r))?;
        }
        let bar = if self.cfg.progress && self.collective.is_root() {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_position(self.step);
            pb
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut summary = TrainSummary {
            policy: self.policy.name().to_string(),
            steps: self.step,
            val_before,
            val_after: None,
            kept_fraction: 0.0,
            tokens_per_s: 0.0,
            kind_kept: self.data.train.kinds.as_ref().map(|_| [0; 3]),
            kind_total: self.data.train.kinds.as_ref().map(|_| [0; 3]),
            losses: Vec::new(),
            final_alpha: None,
            checkpoint: None,
            interrupted: false,
            skipped_steps: 0,
            time_budget_reached: false,
            resumed_from: None,
            reduce_share: None,
        };
        let reduce_before = self.reduce_s;
        let (mut kept_sum, mut time_sum, mut tokens_sum) = (0.0f64, 0.0f64, 0u64);
        self.guard.start(self.step, self.wall_s);
        while self.step < total {
            let rec = match self.train_step() {
                Ok(rec) => rec,
                Err(e) => return Err(self.fail_diverged(e)),
            };
            metrics.write(&rec)?;
            if !rec.skipped {
                let verdict = self
                    .guard
                    .observe(rec.step, rec.loss as f64, rec.grad_norm as f64);
                if let crate::guard::Verdict::Diverged(reason) = verdict {
                    bar.finish_and_clear();
                    return Err(self.fail_diverged(TrainError::Diverged {
                        step: rec.step,
                        reason,
                        checkpoint: None,
                        hint: String::new(),
                    }));
                }
            }
            if let Some(h) = self.agreed_horizon(total)? {
                self.cfg.lr_horizon = Some(h);
                bar.println(format!(
                    "--time-budget: about {h} steps fit; the LR schedule now ends at step {h}"
                ));
            }
            if rec.skipped {
                summary.skipped_steps += 1;
                bar.println(format!(
                    "step {}: non-finite loss, step skipped (--skip-nonfinite)",
                    rec.step
                ));
            } else {
                summary.losses.push(rec.loss);
                kept_sum += rec.kept_fraction;
            }
            time_sum += rec.step_time_s;
            tokens_sum += self.tokens_per_step();
            if let (Some(acc), Some(k)) = (summary.kind_kept.as_mut(), rec.kind_kept) {
                (0..3).for_each(|i| acc[i] += k[i]);
            }
            if let (Some(acc), Some(k)) = (summary.kind_total.as_mut(), rec.kind_total) {
                (0..3).for_each(|i| acc[i] += k[i]);
            }
            bar.set_position(self.step);
            bar.set_message(format!(
                "loss {:.4} kept {:.2} {:.0} tok/s",
                rec.loss, rec.kept_fraction, rec.tokens_per_s
            ));
            let done = self.step >= total;
            if !done && self.cfg.eval_every > 0 && self.step % self.cfg.eval_every == 0 {
                if let Some(r) = self.evaluate()? {
                    metrics.write(&self.eval_record(&r))?;
                    bar.println(format!(
                        "step {}: val loss {:.4} (ppl {:.2})",
                        self.step,
                        r.loss,
                        r.loss.exp()
                    ));
                }
            }
            if !done {
                let flags = self.stop_flags()?;
                let every = self.cfg.checkpoint_every;
                if (every > 0 && self.step % every == 0) || flags.checkpoint_due {
                    self.checkpoint()?;
                }
                if flags.interrupted {
                    summary.interrupted = true;
                    break;
                }
                if flags.time_up {
                    summary.time_budget_reached = true;
                    break;
                }
            }
        }
        bar.finish_and_clear();
        if !summary.interrupted {
            summary.val_after = self.evaluate()?;
            if let Some(r) = &summary.val_after {
                metrics.write(&self.eval_record(r))?;
            }
        }
        summary.checkpoint = Some(self.checkpoint()?);
        let n = summary.losses.len().max(1) as f64;
        summary.kept_fraction = kept_sum / n;
        summary.tokens_per_s = tokens_sum as f64 / time_sum.max(1e-12);
        if self.collective.world_size() > 1 {
            summary.reduce_share = Some((self.reduce_s - reduce_before) / time_sum.max(1e-12));
        }
        summary.steps = self.step;
        summary.final_alpha = self.policy.alpha();
        Ok(summary)
    }
}

/// What the ranks agreed after a step ([`Trainer::stop_flags`]).
struct LoopFlags {
    /// Ctrl-C / SIGTERM on some rank: stop (the final checkpoint follows).
    interrupted: bool,
    /// `--time-budget` reached: stop.
    time_up: bool,
    /// `--checkpoint-interval` passed since the last checkpoint: write one now.
    checkpoint_due: bool,
}

/// The mean loss over valid rows when it is not finite (`None` when finite).
fn nonfinite_mean(stats: &TokenStats) -> Option<f32> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (l, &v) in stats.loss.iter().zip(&stats.valid) {
        if v {
            sum += *l as f64;
            n += 1;
        }
    }
    let mean = if n > 0 { sum / n as f64 } else { 0.0 };
    (!mean.is_finite()).then_some(mean as f32)
}

/// Mean CE of `model` over the validation set (up to `max_batches` batches, 0: all), in one process.
pub fn evaluate(
    model: &mut dyn LanguageModel,
    val: &ValData,
    max_batches: usize,
) -> Result<EvalResult> {
    evaluate_on(model, val, max_batches, &eslm_collective::SingleProcess)
}

/// [`evaluate`] shared among the ranks of `collective`: rank `r` of `R` evaluates batches `r, r + R, …` of the
/// first `max_batches` and the loss sums and token counts are summed over ranks, so each rank does `1/R` of the
/// work and every rank gets the same result (equal to one process's up to the order of the f64 sums).
pub fn evaluate_on(
    model: &mut dyn LanguageModel,
    val: &ValData,
    max_batches: usize,
    collective: &dyn eslm_collective::Collective,
) -> Result<EvalResult> {
    let vocab = model.vocab_size();
    // [loss sum, tokens, loss sum per kind ×3, tokens per kind ×3]
    let mut acc = [0.0f64; 8];
    let limit = if max_batches == 0 {
        usize::MAX
    } else {
        max_batches
    };
    let (rank, world) = (collective.rank(), collective.world_size());
    for (i, batch) in val.loader.iter().take(limit).enumerate() {
        if i % world != rank {
            continue;
        }
        let batch = batch?;
        crate::error::check_tokens(batch.inputs.iter().chain(&batch.targets), vocab)?;
        let targets = to_i32(&batch.targets);
        let stats = model.forward_inference(&batch.inputs, &targets, batch.b, batch.t, None)?;
        let kinds = batch_kinds(val.kinds.as_ref(), &batch)?;
        for (j, (&l, &v)) in stats.loss.iter().zip(&stats.valid).enumerate() {
            if v {
                acc[0] += l as f64;
                acc[1] += 1.0;
                if let Some(k) = &kinds {
                    acc[2 + k[j] as usize] += l as f64;
                    acc[5 + k[j] as usize] += 1.0;
                }
            }
        }
    }
    collective.all_reduce_sum_f64(&mut acc)?;
    if acc[1] == 0.0 {
        return Err(TrainError::Config(
            "the validation set has no complete window of --seq-len + 1 tokens".into(),
        ));
    }
    let by_kind = val.kinds.as_ref().map(|_| {
        let mut out = [f64::NAN; 3];
        for (i, o) in out.iter_mut().enumerate() {
            if acc[5 + i] > 0.0 {
                *o = acc[2 + i] / acc[5 + i];
            }
        }
        out
    });
    Ok(EvalResult {
        loss: acc[0] / acc[1],
        tokens: acc[1] as u64,
        loss_by_kind: by_kind,
    })
}
