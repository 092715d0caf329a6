//! The data-parallel checks of `scripts/test-mpi.sh`, run under `mpirun -np 2` (built with `--features mpi`):
//!
//! - `mpi_check threshold`: the exact global VaR threshold computed across ranks (histograms all-reduced over
//!   MPI) equals, bitwise, the single-process one over the concatenation of every rank's scores and the
//!   single-buffer `select`, with ties, `±0`, `±inf`, NaN in masked rows, NaN in a valid row on one rank (the
//!   same `NanScores` error on every rank), empty ranks, and no valid row anywhere.
//! - `mpi_check parity DIR`: 2 ranks × B/2 against 1 rank × B (each rank trains the single-process reference
//!   itself): per-step losses within 1e-5, identical kept counts, for clm, eslm (loss, entropy; global scope;
//!   also with 2 micro-batches per step), ada-eslm (global) on the bigram model and eslm and clm on a tiny GPT-2; for random, what is meaningful with per-rank
//!   streams: the first step's loss (before any update) equal to the reference, exactly ⌈keep·M⌉ tokens kept
//!   every step, two 2-rank runs bitwise identical, and the ranks' RNG streams different.
//! - `mpi_check resume DIR`: at 2 ranks, a run resumed from its step-4 checkpoint repeats the uninterrupted
//!   run's steps 5–8 bitwise (losses, kept counts, grad norms), for random (per-rank policy state), ada-eslm and
//!   eslm on a tiny GPT-2.
//! - `mpi_check zero DIR`: ZeRO-1 (`--shard-optimizer`) against the unsharded optimizer at 2 ranks, resume of a
//!   sharded run (bitwise) and of a sharded checkpoint without sharding, the refusal for the bigram model.
//!
//! Every rank checks; the ranks agree on the verdict (a failure anywhere fails every rank) and exit non-zero
//! on failure.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use eslm_collective::{Collective, SingleProcess};
use eslm_kernels::global_select::{global_threshold, GlobalThreshold, ScorePart};
use eslm_kernels::select::{select, SelectRule, Selection};
use eslm_kernels::KernelError;
use eslm_train::checkpoint::{list_checkpoints, load_trainer_state};
use eslm_train::config::{PolicyKind, QuantileScope, TrainArgs};
use eslm_train::metrics::{read_metrics, StepRecord};
use eslm_train::policy::ScoreKind;
use eslm_train::run::run_training_on;
use eslm_train::trainer::TrainSummary;

/// Collects failures instead of stopping at the first, so every rank reaches the final agreement.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
    checks: usize,
}

impl Report {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            self.failures.push(what());
        }
    }
}

/// A small deterministic generator (every rank draws the same numbers).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn unit(&mut self) -> f32 {
        (self.next() % (1 << 24)) as f32 / (1u32 << 24) as f32
    }
}

/// One threshold case: the parts of every rank (`parts[rank]` = that rank's buffers of (scores, valid)).
type Parts = Vec<Vec<(Vec<f32>, Vec<bool>)>>;

fn threshold_cases(world: usize) -> Vec<(&'static str, Parts)> {
    let mut rng = Lcg(42);
    let mut cases: Vec<(&'static str, Parts)> = Vec::new();
    let gen =
        |rng: &mut Lcg, n: usize, f: &dyn Fn(&mut Lcg, usize) -> f32, invalid_every: usize| {
            let scores: Vec<f32> = (0..n).map(|i| f(rng, i)).collect();
            let valid: Vec<bool> = (0..n)
                .map(|i| invalid_every == 0 || i % invalid_every != 0)
                .collect();
            (scores, valid)
        };
    // Ties: few distinct values (including -0.0 and +0.0), uneven sizes, two parts per rank.
    cases.push((
        "ties",
        (0..world)
            .map(|r| {
                (0..2)
                    .map(|p| {
                        gen(
                            &mut rng,
                            300 + 37 * r + 11 * p,
                            &|g, _| {
                                [0.0f32, -0.0, 1.0, 1.0, 2.5, 2.5, 2.5, 7.0]
                                    [(g.next() % 8) as usize]
                            },
                            5,
                        )
                    })
                    .collect()
            })
            .collect(),
    ));
    // ±inf among ordinary values.
    cases.push((
        "infinities",
        (0..world)
            .map(|r| {
                vec![gen(
                    &mut rng,
                    257 + r,
                    &|g, i| match i % 9 {
                        0 => f32::INFINITY,
                        1 => f32::NEG_INFINITY,
                        _ => g.unit() * 10.0 - 5.0,
                    },
                    7,
                )]
            })
            .collect(),
    ));
    // NaN only in masked rows: ignored.
    cases.push((
        "nan-masked",
        (0..world)
            .map(|_| {
                let (mut s, mut v) = gen(&mut rng, 200, &|g, _| g.unit(), 0);
                for i in (0..200).step_by(13) {
                    s[i] = f32::NAN;
                    v[i] = false;
                }
                vec![(s, v)]
            })
            .collect(),
    ));
    // NaN in a valid row of the last rank only: the same error on every rank.
    cases.push((
        "nan-valid-one-rank",
        (0..world)
            .map(|r| {
                let (mut s, v) = gen(&mut rng, 100, &|g, _| g.unit(), 0);
                if r + 1 == world {
                    s[17] = f32::NAN;
                    s[18] = f32::NAN;
                }
                vec![(s, v)]
            })
            .collect(),
    ));
    // Rank 0 has no rows at all, the others uniform scores.
    cases.push((
        "empty-rank",
        (0..world)
            .map(|r| {
                if r == 0 {
                    vec![(Vec::new(), Vec::new())]
                } else {
                    vec![gen(&mut rng, 500, &|g, _| g.unit(), 3)]
                }
            })
            .collect(),
    ));
    // No valid row anywhere.
    cases.push((
        "no-valid-rows",
        (0..world)
            .map(|_| vec![(vec![1.0f32; 10], vec![false; 10])])
            .collect(),
    ));
    cases
}

fn as_parts(bufs: &[(Vec<f32>, Vec<bool>)]) -> Vec<ScorePart<'_>> {
    bufs.iter()
        .map(|(s, v)| ScorePart {
            scores: s,
            valid: Some(v),
        })
        .collect()
}

/// A comparable summary of a threshold result (bits, k, M) or its error.
fn outcome(r: &std::result::Result<GlobalThreshold, KernelError>) -> String {
    match r {
        Ok(g) => format!("{:08x} k={} M={}", g.threshold.to_bits(), g.k, g.valid),
        Err(e) => format!("error: {e}"),
    }
}

fn check_threshold(c: &dyn Collective, report: &mut Report) -> Result<()> {
    let (rank, world) = (c.rank(), c.world_size());
    for (name, parts) in threshold_cases(world) {
        for alpha in [0.001, 0.3, 0.5, 0.77, 0.999] {
            let mine = as_parts(&parts[rank]);
            let mut reduce = |h: &mut [u32]| c.all_reduce_sum_u32(h).map_err(|e| e.to_string());
            let dist = global_threshold(&mine, alpha, &mut reduce);
            let all: Vec<(Vec<f32>, Vec<bool>)> = parts.iter().flatten().cloned().collect();
            let single = global_threshold(&as_parts(&all), alpha, &mut |_| Ok(()));
            report.check(outcome(&dist) == outcome(&single), || {
                format!(
                    "threshold {name} α={alpha}: distributed {} vs single {}",
                    outcome(&dist),
                    outcome(&single)
                )
            });
            // Every rank got the same bits as rank 0.
            let mut root = outcome(&dist).into_bytes();
            c.broadcast_bytes(&mut root, 0)?;
            report.check(root == outcome(&dist).into_bytes(), || {
                format!("threshold {name} α={alpha}: rank {rank} differs from rank 0")
            });
            // The single-buffer select over the concatenation: same threshold, same kept count.
            let scores: Vec<f32> = all.iter().flat_map(|(s, _)| s.iter().copied()).collect();
            let valid: Vec<bool> = all.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let mut sel = Selection::default();
            let flat = select(&scores, Some(&valid), SelectRule::Var { alpha }, &mut sel);
            if let Ok(g) = &dist {
                let local = mine
                    .iter()
                    .flat_map(|p| p.scores.iter().zip(p.valid.unwrap_or(&[])))
                    .filter(|(&s, &v)| v && s >= g.threshold)
                    .count();
                let kept = c.sum_f64(local as f64)? as usize;
                report.check(
                    flat.is_ok()
                        && sel.threshold.to_bits() == g.threshold.to_bits()
                        && sel.indices.len() == kept,
                    || {
                        format!(
                            "threshold {name} α={alpha}: select gives {:08x} keeping {} ({flat:?}); distributed {:08x} keeping {kept}",
                            sel.threshold.to_bits(),
                            sel.indices.len(),
                            g.threshold.to_bits()
                        )
                    },
                );
            } else {
                report.check(flat.is_err(), || {
                    format!("threshold {name} α={alpha}: distributed failed but select did not")
                });
            }
        }
    }
    Ok(())
}

/// The flags of a small run (bigram unless `gpt`), `batch` rows per rank.
fn run_args(out: &Path, select: PolicyKind, batch: usize, steps: u64, gpt: bool) -> TrainArgs {
    let mut a = TrainArgs {
        model: Some(if gpt { "tiny" } else { "bigram" }.into()),
        synthetic_documents: Some(256),
        select: Some(select),
        steps: Some(steps),
        batch_size: Some(batch),
        seq_len: Some(32),
        lr: Some(if gpt { 3e-3 } else { 0.05 }),
        warmup_steps: Some(2),
        eval_every: Some(0),
        eval_batches: Some(0),
        out: Some(out.to_path_buf()),
        no_progress: true,
        ..Default::default()
    };
    if gpt {
        a.seq_len = Some(16);
    }
    a
}

fn steps_of(out: &Path) -> Result<Vec<StepRecord>> {
    Ok(read_metrics(&out.join("metrics.jsonl"))
        .with_context(|| format!("reading {}", out.display()))?
        .0)
}

fn train(args: &TrainArgs, c: Arc<dyn Collective>) -> Result<TrainSummary> {
    run_training_on(args, Arc::new(AtomicBool::new(false)), c).with_context(|| {
        format!(
            "training {}",
            args.out
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        )
    })
}

struct ParityCase {
    name: &'static str,
    select: PolicyKind,
    score: ScoreKind,
    scope: QuantileScope,
    gpt: bool,
    /// Micro-batches per step (the global scope then takes two passes).
    accum: usize,
}

fn check_parity(c: Arc<dyn Collective>, dir: &Path, report: &mut Report) -> Result<()> {
    let (rank, world) = (c.rank(), c.world_size());
    let global_b = 8;
    if global_b % world != 0 {
        bail!("parity needs a world size dividing {global_b}");
    }
    let cases = [
        ParityCase {
            name: "clm",
            select: PolicyKind::Clm,
            score: ScoreKind::Loss,
            scope: QuantileScope::Micro,
            gpt: false,
            accum: 1,
        },
        ParityCase {
            name: "eslm-loss",
            select: PolicyKind::Eslm,
            score: ScoreKind::Loss,
            scope: QuantileScope::Global,
            gpt: false,
            accum: 1,
        },
        ParityCase {
            name: "eslm-entropy",
            select: PolicyKind::Eslm,
            score: ScoreKind::Entropy,
            scope: QuantileScope::Global,
            gpt: false,
            accum: 1,
        },
        ParityCase {
            name: "ada-eslm",
            select: PolicyKind::AdaEslm,
            score: ScoreKind::Loss,
            scope: QuantileScope::Global,
            gpt: false,
            accum: 1,
        },
        ParityCase {
            name: "gpt2-eslm-loss",
            select: PolicyKind::Eslm,
            score: ScoreKind::Loss,
            scope: QuantileScope::Global,
            gpt: true,
            accum: 1,
        },
        ParityCase {
            name: "gpt2-clm",
            select: PolicyKind::Clm,
            score: ScoreKind::Loss,
            scope: QuantileScope::Micro,
            gpt: true,
            accum: 1,
        },
        ParityCase {
            name: "eslm-loss-accum2",
            select: PolicyKind::Eslm,
            score: ScoreKind::Loss,
            scope: QuantileScope::Global,
            gpt: false,
            accum: 2,
        },
    ];
    let steps = 8;
    for case in &cases {
        let name = case.name;
        let b = if case.gpt { 4 } else { global_b };
        let mut reference = run_args(
            &dir.join(name).join(format!("ref-rank{rank}")),
            case.select,
            b,
            steps,
            case.gpt,
        );
        reference.score = Some(case.score);
        reference.quantile_scope = Some(case.scope);
        reference.grad_accum = Some(case.accum);
        reference.batch_size = Some(b / case.accum);
        let mut dist = reference.clone();
        dist.out = Some(dir.join(name).join("dist"));
        dist.batch_size = Some(b / case.accum / world);
        let r = train(&reference, Arc::new(SingleProcess))?;
        let d = train(&dist, c.clone())?;
        let (rs, ds) = (
            steps_of(reference.out.as_ref().unwrap())?,
            steps_of(dist.out.as_ref().unwrap())?,
        );
        report.check(rs.len() == steps as usize && ds.len() == rs.len(), || {
            format!("{name}: {} vs {} step records", rs.len(), ds.len())
        });
        for (x, y) in rs.iter().zip(&ds) {
            report.check((x.loss - y.loss).abs() <= 1e-5, || {
                format!(
                    "{name} step {}: loss {} (1 rank) vs {} (2 ranks)",
                    x.step, x.loss, y.loss
                )
            });
            report.check(x.kept_tokens == y.kept_tokens, || {
                format!(
                    "{name} step {}: kept {} vs {}",
                    x.step, x.kept_tokens, y.kept_tokens
                )
            });
            report.check(x.tokens == y.tokens, || {
                format!(
                    "{name} step {}: tokens {} vs {}",
                    x.step, x.tokens, y.tokens
                )
            });
        }
        if let (Some(a), Some(b)) = (&r.val_after, &d.val_after) {
            report.check(
                (a.loss - b.loss).abs() <= 1e-5 && a.tokens == b.tokens,
                || {
                    format!(
                        "{name}: val loss {} ({} tokens) vs {} ({} tokens)",
                        a.loss, a.tokens, b.loss, b.tokens
                    )
                },
            );
        } else {
            report.check(false, || format!("{name}: no final validation"));
        }
        report.check(
            r.final_alpha
                .zip(d.final_alpha)
                .is_none_or(|(a, b)| (a - b).abs() <= 1e-6),
            || format!("{name}: final α {:?} vs {:?}", r.final_alpha, d.final_alpha),
        );
    }

    // random: per-rank streams, so only what holds with different draws.
    let keep = 0.5;
    let mut reference = run_args(
        &dir.join("random").join(format!("ref-rank{rank}")),
        PolicyKind::Random,
        global_b,
        steps,
        false,
    );
    reference.keep = Some(keep);
    reference.quantile_scope = Some(QuantileScope::Global);
    let mut dist = reference.clone();
    dist.batch_size = Some(global_b / world);
    dist.out = Some(dir.join("random").join("dist-a"));
    train(&reference, Arc::new(SingleProcess))?;
    train(&dist, c.clone())?;
    let mut again = dist.clone();
    again.out = Some(dir.join("random").join("dist-b"));
    train(&again, c.clone())?;
    let rs = steps_of(reference.out.as_ref().unwrap())?;
    let (da, db) = (
        steps_of(dist.out.as_ref().unwrap())?,
        steps_of(again.out.as_ref().unwrap())?,
    );
    report.check(
        !rs.is_empty() && !da.is_empty() && rs[0].loss.to_bits() == da[0].loss.to_bits(),
        || {
            format!(
                "random: first-step loss {:?} vs {:?}",
                rs.first().map(|s| s.loss),
                da.first().map(|s| s.loss)
            )
        },
    );
    for (x, y) in da.iter().zip(&db) {
        report.check(
            x.loss.to_bits() == y.loss.to_bits() && x.kept_tokens == y.kept_tokens,
            || {
                format!(
                    "random step {}: two 2-rank runs differ ({} vs {})",
                    x.step, x.loss, y.loss
                )
            },
        );
    }
    for s in rs.iter().chain(&da) {
        let valid = s.kind_total.map_or(0, |k| k.iter().sum::<u64>());
        let want = eslm_kernels::var_keep_count(1.0 - keep, valid as usize).unwrap_or(0) as u64;
        report.check(valid > 0 && s.kept_tokens == want, || {
            format!(
                "random step {}: kept {} of {valid}, want ⌈{keep}·M⌉ = {want}",
                s.step, s.kept_tokens
            )
        });
    }
    let ckpt = list_checkpoints(dist.out.as_ref().unwrap())?
        .pop()
        .context("random: no checkpoint")?
        .1;
    let state = load_trainer_state(&ckpt)?;
    report.check(
        state.world_size == world
            && state.rank_policies.len() == world
            && state.rank_policies[0] == state.policy
            && (world == 1 || state.rank_policies[0] != state.rank_policies[1]),
        || {
            format!(
                "random: per-rank policy states in the checkpoint: world {} states {}",
                state.world_size,
                state.rank_policies.len()
            )
        },
    );
    Ok(())
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        std::fs::copy(e.path(), dst.join(e.file_name()))?;
    }
    Ok(())
}

/// Trains `a` for 8 steps with a checkpoint at step 4, resumes a copy of that checkpoint with `resume_with`
/// (`a` itself, or `a` changed in what a resume may change), and returns both runs' step records.
fn full_and_resumed(
    c: &Arc<dyn Collective>,
    dir: &Path,
    a: &TrainArgs,
    resume_with: impl FnOnce(&mut TrainArgs),
) -> Result<(Vec<StepRecord>, Vec<StepRecord>)> {
    let full = dir.join("full");
    let mut a = a.clone();
    a.out = Some(full.clone());
    a.steps = Some(8);
    a.checkpoint_every = Some(4);
    a.keep_last = Some(3);
    train(&a, c.clone())?;
    let part = dir.join("part");
    if c.is_root() {
        let four = list_checkpoints(&full)?
            .into_iter()
            .find(|(s, _)| *s == 4)
            .context("no step-4 checkpoint")?
            .1;
        copy_dir(&four, &part.join("checkpoints").join("step_00000004"))?;
    }
    c.barrier()?;
    let mut b = a.clone();
    b.out = Some(part.clone());
    b.resume = true;
    resume_with(&mut b);
    train(&b, c.clone())?;
    Ok((steps_of(&full)?, steps_of(&part)?))
}

/// Whether steps 5–8 of `full` and the resumed run agree: bitwise, or within `tol` (relative) where the runs
/// may differ in rounding only.
fn check_resumed(
    name: &str,
    full: &[StepRecord],
    part: &[StepRecord],
    tol: f32,
    report: &mut Report,
) {
    report.check(full.len() == 8 && part.len() == 4, || {
        format!("resume {name}: {} and {} records", full.len(), part.len())
    });
    let close = |x: f32, y: f32| {
        if tol == 0.0 {
            x.to_bits() == y.to_bits()
        } else {
            (x - y).abs() <= tol * x.abs().max(1.0)
        }
    };
    for (p, q) in full[4.min(full.len())..].iter().zip(part) {
        report.check(
            p.step == q.step
                && close(p.loss, q.loss)
                && close(p.loss_kept, q.loss_kept)
                && p.kept_tokens == q.kept_tokens
                && close(p.grad_norm, q.grad_norm),
            || {
                format!(
                    "resume {name} step {}: loss {} vs {}, kept {} vs {}, grad norm {} vs {}",
                    p.step, p.loss, q.loss, p.kept_tokens, q.kept_tokens, p.grad_norm, q.grad_norm
                )
            },
        );
    }
}

fn check_resume(c: Arc<dyn Collective>, dir: &Path, report: &mut Report) -> Result<()> {
    let cases = [
        ("random", PolicyKind::Random, false),
        ("ada-eslm", PolicyKind::AdaEslm, false),
        ("gpt2-eslm", PolicyKind::Eslm, true),
    ];
    for (name, select, gpt) in cases {
        let mut a = run_args(dir, select, if gpt { 2 } else { 4 }, 8, gpt);
        a.quantile_scope = Some(QuantileScope::Global);
        let (x, y) = full_and_resumed(&c, &dir.join(name), &a, |_| {})?;
        check_resumed(name, &x, &y, 0.0, report);
    }
    Ok(())
}

/// ZeRO-1 (`--shard-optimizer`) on a tiny GPT-2 at 2 ranks: the same run as unsharded up to the norm's summation
/// order (losses, kept counts, grad norms within 1e-6 relative; the same checkpoint format and moments within
/// 1e-6), bitwise resume of a sharded run, a sharded checkpoint resumed unsharded, and a clear refusal for a
/// model without a sharded optimizer.
fn check_zero(c: Arc<dyn Collective>, dir: &Path, report: &mut Report) -> Result<()> {
    for (name, select) in [("clm", PolicyKind::Clm), ("eslm", PolicyKind::Eslm)] {
        let mut plain = run_args(&dir.join(name).join("plain"), select, 2, 8, true);
        plain.quantile_scope = Some(QuantileScope::Global);
        plain.checkpoint_every = Some(8);
        let mut sharded = plain.clone();
        sharded.shard_optimizer = true;
        sharded.out = Some(dir.join(name).join("sharded"));
        train(&plain, c.clone())?;
        train(&sharded, c.clone())?;
        let (x, y) = (
            steps_of(plain.out.as_ref().unwrap())?,
            steps_of(sharded.out.as_ref().unwrap())?,
        );
        report.check(x.len() == 8 && y.len() == 8, || {
            format!("zero {name}: {} and {} records", x.len(), y.len())
        });
        for (p, q) in x.iter().zip(&y) {
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * a.abs().max(1.0);
            report.check(
                close(p.loss, q.loss) && close(p.grad_norm, q.grad_norm) && p.kept_tokens == q.kept_tokens,
                || {
                    format!(
                        "zero {name} step {}: loss {} vs {}, grad norm {} vs {} (unsharded vs sharded)",
                        p.step, p.loss, q.loss, p.grad_norm, q.grad_norm
                    )
                },
            );
        }
        let last = |out: &Path| -> Result<PathBuf> {
            Ok(list_checkpoints(out)?.pop().context("no checkpoint")?.1)
        };
        for moment in ["optimizer_m.bin", "optimizer_v.bin"] {
            let a = eslm_train::tensor_file::read_f32(
                &last(plain.out.as_ref().unwrap())?.join(moment),
            )?;
            let b = eslm_train::tensor_file::read_f32(
                &last(sharded.out.as_ref().unwrap())?.join(moment),
            )?;
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs() / x.abs().max(1e-3))
                .fold(0f32, f32::max);
            report.check(a.len() == b.len() && worst <= 1e-5, || {
                format!(
                    "zero {name}: {moment} {} vs {} values, worst relative difference {worst}",
                    a.len(),
                    b.len()
                )
            });
        }
    }
    // Resume: sharded → sharded is bitwise; sharded → unsharded differs in the norm's rounding only.
    let mut a = run_args(dir, PolicyKind::Eslm, 2, 8, true);
    a.quantile_scope = Some(QuantileScope::Global);
    a.shard_optimizer = true;
    let (x, y) = full_and_resumed(&c, &dir.join("resume-sharded"), &a, |_| {})?;
    check_resumed("zero sharded", &x, &y, 0.0, report);
    let (x, y) = full_and_resumed(&c, &dir.join("resume-unsharded"), &a, |b| {
        b.shard_optimizer = false
    })?;
    check_resumed("zero sharded then unsharded", &x, &y, 1e-6, report);
    // A model without a sharded optimizer: the same clear error on every rank.
    let mut bigram = run_args(&dir.join("bigram"), PolicyKind::Clm, 2, 2, false);
    bigram.shard_optimizer = true;
    let refused = train(&bigram, c.clone()).map_err(|e| format!("{e:#}"));
    report.check(
        matches!(&refused, Err(m) if m.contains("--shard-optimizer")),
        || format!("zero: the bigram model with --shard-optimizer gave {refused:?}"),
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let c = eslm_collective::from_env()?;
    let mut report = Report::default();
    let dir = || -> Result<PathBuf> {
        args.get(1)
            .map(PathBuf::from)
            .context("usage: mpi_check parity|resume|zero DIR")
    };
    let what = args.first().map(String::as_str).unwrap_or("");
    let outcome = match what {
        "threshold" => check_threshold(c.as_ref(), &mut report),
        "parity" => dir().and_then(|d| check_parity(c.clone(), &d, &mut report)),
        "resume" => dir().and_then(|d| check_resume(c.clone(), &d, &mut report)),
        "zero" => dir().and_then(|d| check_zero(c.clone(), &d, &mut report)),
        other => bail!("unknown check `{other}` (threshold, parity DIR, resume DIR, zero DIR)"),
    };
    if let Err(e) = outcome {
        eprintln!("mpi_check {what}: rank {}: error: {e:#}", c.rank());
        c.abort(2);
        return Err(e);
    }
    for f in &report.failures {
        eprintln!("mpi_check {what}: rank {}: FAIL {f}", c.rank());
    }
    let failed = c.sum_f64(report.failures.len() as f64)?;
    if c.is_root() {
        println!(
            "mpi_check {what}: {} checks on rank 0, {failed} failures over {} ranks",
            report.checks,
            c.world_size()
        );
    }
    if failed > 0.0 {
        bail!("mpi_check {what}: {failed} failures");
    }
    Ok(())
}
