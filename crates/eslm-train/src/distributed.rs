//! Data-parallel training: one `eslm-train` process per rank, started by `mpirun -np R` or `srun` (build with
//! `--features mpi`; without an MPI launcher, or without the feature, the same binary runs as one process).
//! `docs/distributed.md` is the user's guide; this module is the glue between the launcher and the trainer.
//!
//! What each rank does, and what the ranks agree on through the [`Collective`]:
//!
//! - **Data**: the training loader is sharded by rank (`LoaderConfig::with_rank`: rank `r` reads positions
//!   `r, r+R, …` of each epoch's shuffled window order). `--batch-size` is per rank: a step consumes
//!   R × B × T × grad_accum tokens (the global batch is R × B), and `--token-budget` and the logged token
//!   counts are global. So R ranks × B/R rows see the same windows per step as 1 rank × B rows.
//! - **Model**: every rank initialises the same weights from `--seed`; gradients are summed over ranks (the
//!   per-rank losses are already divided by the global normaliser) before clipping and AdamW, so the
//!   parameters stay identical on every rank.
//! - **Selection**: `--quantile-scope global` selects with the exact VaR over the tokens of every rank (per-pass
//!   radix histograms all-reduced; the kept count K summed for the 1/K normaliser); `micro` selects per rank and
//!   per micro-batch. Ada-ESLM's statistics, hierarchical's instance threshold and the logged counters are
//!   summed over ranks. The random policy is seeded with `seed ⊕ rank` (rank 0 draws the single-process stream).
//! - **Evaluation** is shared: rank `r` evaluates validation batches `r, r+R, …` and the loss sums and token
//!   counts are summed over ranks (`trainer::evaluate_on`), so every rank gets the same result for `1/R` of the
//!   work; rank 0 logs it.
//! - **Outputs**: rank 0 writes `metrics.jsonl`, `config.toml` and the checkpoints; the others wait at a barrier
//!   after each checkpoint. The checkpoint stores the world size and every rank's policy state; a resume needs
//!   the same world size (it is refused otherwise: the data order depends on it).
//! - **Stopping**: the stop flag (Ctrl-C, or any signal handler that sets it) of any rank is summed over ranks
//!   once per step, so every rank stops after the same step and rank 0 checkpoints.
//! - **Failures**: a rank whose training returns an error (or panics) prints it and calls `MPI_Abort`, which
//!   ends every rank; a rank that dies is detected by the launcher (Open MPI's `mpirun` kills the job). No rank
//!   waits forever in a collective.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use eslm_collective::Collective;

use crate::config::{RunConfig, TrainArgs};
use crate::error::{Result, TrainError};
use crate::trainer::TrainSummary;

/// Every rank's `value`, by rank, on every rank (one broadcast per rank: for small states such as a policy's
/// RNG, not for tensors).
pub fn all_gather_json(
    c: &dyn Collective,
    value: &serde_json::Value,
) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::with_capacity(c.world_size());
    for root in 0..c.world_size() {
        let mut bytes = if root == c.rank() {
            serde_json::to_vec(value)?
        } else {
            Vec::new()
        };
        c.broadcast_bytes(&mut bytes, root)?;
        out.push(serde_json::from_slice(&bytes)?);
    }
    Ok(out)
}

/// The config rank `rank` builds its selection policy from: the seed is `seed ⊕ rank`, so the random policy
/// draws an independent stream on each rank (rank 0's is the single-process stream). The run's own config, the
/// model initialisation and the data order keep `seed`.
pub fn policy_config(cfg: &RunConfig, rank: usize) -> RunConfig {
    let mut c = cfg.clone();
    c.seed ^= rank as u64;
    c
}

/// The collective of this process: MPI when built with `--features mpi` and started by an MPI launcher,
/// otherwise a single process.
pub fn collective_from_env() -> Result<Arc<dyn Collective>> {
    eslm_collective::from_env().map_err(TrainError::from)
}

/// `eslm-train train` as one rank of the job this process belongs to (see the module documentation). Returns
/// the summary and whether this is the reporting rank (rank 0). With several ranks a failure never returns:
/// the error is printed with the rank and every rank of the job is aborted (so none waits in a collective); a
/// panic does the same.
pub fn train_from_env(args: &TrainArgs, stop: Arc<AtomicBool>) -> Result<RankOutcome> {
    let collective = collective_from_env()?;
    let (rank, world) = (collective.rank(), collective.world_size());
    if world > 1 {
        abort_on_panic();
    }
    match crate::run::run_training_on(args, stop, collective.clone()) {
        Ok(summary) => Ok(RankOutcome {
            summary,
            root: collective.is_root(),
            collective,
        }),
        Err(e) if world > 1 => {
            eprintln!("eslm-train rank {rank}/{world}: error: {e}; aborting every rank");
            collective.abort(1);
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// What one rank's training returns: its summary (every rank's counters are the same, having been summed), and
/// whether this rank is the one that reports (rank 0). Call [`RankOutcome::finish`] after reporting.
#[derive(Clone)]
pub struct RankOutcome {
    /// The run's summary.
    pub summary: TrainSummary,
    /// Whether this rank prints it.
    pub root: bool,
    collective: Arc<dyn Collective>,
}

impl RankOutcome {
    /// Waits until every rank has reported (flushing this rank's output first). Without it a rank that exits
    /// non-zero (130 after an interrupt) lets the launcher kill rank 0 before rank 0 has printed its summary:
    /// Open MPI's `mpirun` ends the whole job as soon as one rank exits with an error code.
    pub fn finish(&self) -> Result<()> {
        use std::io::Write;
        let _ = std::io::stdout().flush(); // a closed pipe is not a training error
        let _ = std::io::stderr().flush();
        self.collective.barrier().map_err(TrainError::from)
    }
}

/// Makes a panic on this rank abort the whole job (after the usual panic message).
fn abort_on_panic() {
    #[cfg(feature = "mpi")]
    {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            eslm_collective::mpi::abort_world(101);
        }));
    }
}
