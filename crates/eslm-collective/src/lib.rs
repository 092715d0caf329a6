//! # eslm-collective
//!
//! The seam through which data-parallel ranks agree: the [`Collective`] trait (llm.c's `multi_gpu_config`, as a
//! trait). A training step touches it in three places only, all after the micro-batches' backward passes:
//!
//! - the flat f32 gradient buffer (sum) — [`Collective::all_reduce_sum_f32`];
//! - the per-pass histograms of the exact global VaR radix select (`eslm_kernels::select::global_threshold`, a
//!   few KB per pass, never a gather of the scores) — [`Collective::all_reduce_sum_u32`];
//! - a few f64 statistics: the kept count `K` (the CVaR normaliser is `1/K` over *all* ranks), Ada-ESLM's mass
//!   statistics, hierarchical's instance scores, metrics — [`Collective::all_reduce_sum_f64`];
//!
//! plus [`Collective::broadcast_bytes`] for start-up agreement (seeds, configs, a NCCL unique id), and for a
//! sharded optimizer (ZeRO-1) [`Collective::reduce_scatter_sum_f32`] (each rank gets the summed gradients of its
//! [`shard_range`]) and [`Collective::all_gather_f32`] (every rank gets every rank's updated shard).
//!
//! [`SingleProcess`] is the world of one rank: every reduction is the identity. Multi-rank implementations live
//! behind cargo features so the default build needs neither: `MpiCollective` (feature `mpi`, CPU ranks over the
//! system MPI; [`from_env`] picks it when `mpirun` / `srun` started the process). NCCL for GPU ranks does not
//! exist yet.

#![warn(missing_docs)]

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "mpi")]
pub use crate::mpi::MpiCollective;

/// The collective of this process: with the `mpi` feature, an MPI collective when an MPI launcher (`mpirun`,
/// `mpiexec`, `srun`) started the process (MPI is initialised here; call this once per process); otherwise — and
/// always without the feature — [`SingleProcess`].
///
/// ```
/// let c = eslm_collective::from_env().unwrap(); // not under mpirun: one process
/// assert_eq!(c.world_size(), 1);
/// ```
pub fn from_env() -> Result<std::sync::Arc<dyn Collective>> {
    #[cfg(feature = "mpi")]
    {
        MpiCollective::from_env()
    }
    #[cfg(not(feature = "mpi"))]
    {
        Ok(std::sync::Arc::new(SingleProcess))
    }
}

/// How a flat buffer of `len` elements is split over `world` ranks: contiguous shards, rank `r` holding
/// `len / world` elements plus one when `r < len % world`. The counts sum to `len`.
///
/// ```
/// assert_eq!(eslm_collective::shard_counts(10, 4), [3, 3, 2, 2]);
/// ```
pub fn shard_counts(len: usize, world: usize) -> Vec<usize> {
    let world = world.max(1);
    (0..world)
        .map(|r| len / world + usize::from(r < len % world))
        .collect()
}

/// The elements of a flat buffer of `len` elements that rank `rank` of `world` owns in a sharded optimizer
/// (the [`shard_counts`] layout).
///
/// ```
/// assert_eq!(eslm_collective::shard_range(10, 4, 2), 6..8);
/// ```
pub fn shard_range(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    let counts = shard_counts(len, world);
    let start: usize = counts[..rank.min(counts.len())].iter().sum();
    start..start + counts.get(rank).copied().unwrap_or(0)
}

/// Errors of a collective operation.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A rank failed, left, or the transport reported an error.
    #[error("collective {op} failed: {message}")]
    Transport {
        /// The operation (`all_reduce_sum_f32`, ...).
        op: &'static str,
        /// What the transport said.
        message: String,
    },
    /// Ranks disagree on a buffer length or a root.
    #[error("collective {op}: {message}")]
    Mismatch {
        /// The operation.
        op: &'static str,
        /// What differs.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CollectiveError>;

/// Collective operations across the ranks of a data-parallel job. Every rank must make the same calls in the same
/// order with buffers of the same length (as with MPI and NCCL); the results are identical on every rank.
pub trait Collective: Send + Sync {
    /// This process's rank, `0 ≤ rank < world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// In-place element-wise sum over ranks.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// In-place element-wise sum over ranks (histograms, counts).
    fn all_reduce_sum_u32(&self, buf: &mut [u32]) -> Result<()>;
    /// In-place element-wise sum over ranks (statistics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Sums `buf` over ranks into this rank's [`shard_range`] of it (ZeRO-1's gradient reduction; a true
    /// reduce-scatter moves half the data of an all-reduce, but an implementation may use its all-reduce where
    /// that is faster, as the MPI collective does). The elements outside this rank's shard are left
    /// unspecified.
    fn reduce_scatter_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Replaces every rank's [`shard_range`] of `buf` on every rank by that rank's values (ZeRO-1's parameter
    /// gather after each rank updated its shard).
    fn all_gather_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Replaces `buf` on every rank by `root`'s bytes (lengths may differ before the call).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Blocks until every rank reaches this call.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job after an unrecoverable error on this one (MPI: `MPI_Abort`, then the process
    /// exits with `code`), so that no peer waits forever in a collective. A single process has no peers: the
    /// default returns and the caller exits as usual.
    fn abort(&self, code: i32) {
        let _ = code;
    }

    /// Whether this rank writes shared outputs (metrics, checkpoints): rank 0.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// Sum of one f64 over ranks.
    fn sum_f64(&self, x: f64) -> Result<f64> {
        let mut b = [x];
        self.all_reduce_sum_f64(&mut b)?;
        Ok(b[0])
    }
}

/// The world of one process: reductions are the identity, broadcast keeps the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_u32(&self, _buf: &mut [u32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root != 0 {
            return Err(CollectiveError::Mismatch {
                op: "broadcast_bytes",
                message: format!("root {root} outside a world of 1 rank"),
            });
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_is_the_identity_and_rejects_other_roots() {
        let c = SingleProcess;
        let mut f = [1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut f).unwrap();
        assert_eq!(f, [1.5, -2.0]);
        assert_eq!(c.sum_f64(3.25).unwrap(), 3.25);
        let mut b = vec![1u8, 2];
        c.broadcast_bytes(&mut b, 0).unwrap();
        assert_eq!(b, [1, 2]);
        assert!(c.broadcast_bytes(&mut b, 1).is_err());
        assert!(c.is_root() && c.world_size() == 1);
        c.reduce_scatter_sum_f32(&mut f).unwrap();
        c.all_gather_f32(&mut f).unwrap();
        assert_eq!(f, [1.5, -2.0]);
    }

    #[test]
    fn shards_cover_the_buffer_once_in_order() {
        for len in [0, 1, 2, 7, 10, 124_439_808] {
            for world in 1..=5 {
                let counts = shard_counts(len, world);
                assert_eq!(counts.iter().sum::<usize>(), len);
                assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
                let mut next = 0;
                for (rank, &count) in counts.iter().enumerate() {
                    let r = shard_range(len, world, rank);
                    assert_eq!((r.start, r.len()), (next, count));
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
