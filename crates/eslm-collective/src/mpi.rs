//! [`MpiCollective`]: the [`Collective`] of CPU ranks launched by `mpirun` / `mpiexec` / `srun`, over the system
//! MPI (Open MPI or MPICH) through the rsmpi `mpi` crate.
//!
//! - **Initialisation**: [`MpiCollective::from_env`] initialises MPI once per process (`MPI_Init_thread` asking
//!   for `MPI_THREAD_SERIALIZED`: rayon's worker threads never call MPI, and every call here is made under one
//!   mutex) only when a launcher's environment variables say the process is one rank of a job; otherwise it
//!   returns [`SingleProcess`], so the same binary runs as one process without touching MPI. MPI is finalised
//!   when the last handle is dropped.
//! - **Errors**: the collectives run on a duplicate of `MPI_COMM_WORLD` whose error handler is
//!   `MPI_ERRORS_RETURN`, and every return code is checked: an MPI error is a [`CollectiveError`], never a
//!   panic. (A rank that *dies* is handled by the launcher: Open MPI's `mpirun` kills the whole job when a rank
//!   exits abnormally or without `MPI_Finalize`. A rank whose training fails calls [`Collective::abort`] so it
//!   does not wait in `MPI_Finalize` for peers that wait in a collective.)
//! - **Reductions**: sums of f32 / u32 / f64 through `MPI_Allreduce`, in buckets of [`BUCKET_BYTES`] (the send
//!   side is a scratch copy of the bucket: the generated bindings have no `MPI_IN_PLACE`). The gradient
//!   all-reduce runs after the backward; overlapping it with the backward (per-layer buckets as in llm.c) is not
//!   done.
//!
//! - **Sharded optimizer (ZeRO-1)**: the gradients' reduce-scatter is the bucketed all-reduce (it sums every
//!   shard, so it is a valid reduce-scatter, and Open MPI 4's `MPI_Reduce_scatter` measured ≈ 3× slower than its
//!   all-reduce on one node: `examples/mpi_bench.rs`); the parameters' all-gather is `MPI_Allgatherv` over the
//!   [`crate::shard_range`] layout in buckets: bucket `j` carries elements `[j·b, (j+1)·b)` of every rank's
//!   shard, unpacked from a scratch buffer of `world × b` elements (`b` = [`BUCKET_BYTES`] / 4), so no call moves
//!   more than a bucket per rank and no scratch copy of a whole shard is needed.
//!
//! For two ranks the sum `a + b` is commutative, so every rank gets the same bits; for more ranks Open MPI and
//! MPICH reduce in one order and send the result, so the ranks agree as well (the trainer relies on identical
//! parameters on every rank).

use std::ffi::{c_int, c_void};
use std::sync::Mutex;

use mpi::ffi;

use crate::{shard_counts, Collective, CollectiveError, Result, SingleProcess};

/// Bytes per `MPI_Allreduce` call of a long buffer (4 MiB: a million f32 gradients).
pub const BUCKET_BYTES: usize = 4 << 20;

/// Environment variables set by MPI launchers for each rank: Open MPI's `mpirun`, PMI (MPICH's Hydra, Slurm's
/// `srun --mpi=pmi2`) and PMIx (`srun --mpi=pmix`, Open MPI 5).
pub const LAUNCHER_VARIABLES: [&str; 4] =
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"];

/// Whether this process was started by an MPI launcher (any of [`LAUNCHER_VARIABLES`] is set).
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// A communicator handle that may move between threads: MPI was initialised with `MPI_THREAD_SERIALIZED` and
/// every use goes through [`MpiCollective`]'s mutex, so calls are never concurrent.
struct Comm(ffi::MPI_Comm);

// SAFETY: see the type's documentation (serialised use under a mutex at a thread level that allows it).
unsafe impl Send for Comm {}

/// The collective of one rank of an MPI job. See the module documentation.
pub struct MpiCollective {
    comm: Mutex<Comm>,
    rank: usize,
    world_size: usize,
    /// Finalises MPI when dropped (after `comm` is freed in [`Drop`]).
    _universe: mpi::environment::Universe,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// The text of an MPI error code.
fn error_text(code: c_int) -> String {
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: `buf` holds MPI_MAX_ERROR_STRING + 1 bytes as MPI_Error_string requires; `len` is a valid out-pointer.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return format!("MPI error code {code}");
    }
    buf.truncate(len.clamp(0, buf.len() as c_int) as usize);
    format!("{} (MPI error code {code})", String::from_utf8_lossy(&buf))
}

/// `Ok` when `rc` is `MPI_SUCCESS` (0), else a transport error of `op`.
fn check(op: &'static str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(CollectiveError::Transport {
            op,
            message: error_text(rc),
        })
    }
}

/// An element type MPI can sum.
trait SumElement: Copy + Default {
    /// The MPI datatype of the element.
    fn datatype() -> ffi::MPI_Datatype;
}

impl SumElement for f32 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant initialised by the MPI library (rsmpi's C shim); read after MPI_Init.
        unsafe { ffi::RSMPI_FLOAT }
    }
}

impl SumElement for u32 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as for f32.
        unsafe { ffi::RSMPI_UINT32_T }
    }
}

impl SumElement for f64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as for f32.
        unsafe { ffi::RSMPI_DOUBLE }
    }
}

impl MpiCollective {
    /// The collective of this process: an [`MpiCollective`] when an MPI launcher started it (see
    /// [`launched_by_mpi`]), otherwise [`SingleProcess`] (MPI is not initialised). Call it once per process: MPI
    /// can be initialised only once, so a second call while MPI is running returns an error.
    pub fn from_env() -> Result<std::sync::Arc<dyn Collective>> {
        if !launched_by_mpi() {
            return Ok(std::sync::Arc::new(SingleProcess));
        }
        Ok(std::sync::Arc::new(Self::init()?))
    }

    /// Initialises MPI (`MPI_THREAD_SERIALIZED`) and duplicates `MPI_COMM_WORLD` with `MPI_ERRORS_RETURN`.
    pub fn init() -> Result<Self> {
        let err = |message: String| CollectiveError::Transport {
            op: "init",
            message,
        };
        let (universe, provided) =
            mpi::initialize_with_threading(mpi::Threading::Serialized).ok_or_else(|| {
                err("MPI is already initialised (or finalised) in this process; create one MpiCollective and share it".into())
            })?;
        if provided < mpi::Threading::Serialized {
            return Err(err(format!(
                "the MPI library provides thread level {provided:?}; eslm needs Serialized (HINT: use an MPI built with thread support, e.g. Debian's Open MPI)"
            )));
        }
        // SAFETY: a constant initialised by the MPI library; read after MPI_Init.
        let mut comm: ffi::MPI_Comm = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: MPI is initialised; RSMPI_COMM_WORLD is a valid communicator and `comm` a valid out-pointer.
        check("init (MPI_Comm_dup)", unsafe {
            ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut comm)
        })?;
        // SAFETY: `comm` was just created by MPI_Comm_dup.
        check("init (MPI_Comm_set_errhandler)", unsafe {
            ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN)
        })?;
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: valid communicator and out-pointers.
        check("init (MPI_Comm_rank)", unsafe {
            ffi::MPI_Comm_rank(comm, &mut rank)
        })?;
        // SAFETY: as above.
        check("init (MPI_Comm_size)", unsafe {
            ffi::MPI_Comm_size(comm, &mut size)
        })?;
        Ok(MpiCollective {
            comm: Mutex::new(Comm(comm)),
            rank: rank.max(0) as usize,
            world_size: size.max(1) as usize,
            _universe: universe,
        })
    }

    /// Runs `f` with the communicator (under the mutex; a poisoned mutex is still usable: MPI holds no Rust state).
    fn with_comm<R>(&self, f: impl FnOnce(ffi::MPI_Comm) -> R) -> R {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.0)
    }

    /// Sums `buf` over ranks in buckets of [`BUCKET_BYTES`].
    fn all_reduce_sum<T: SumElement>(&self, op: &'static str, buf: &mut [T]) -> Result<()> {
        if self.world_size == 1 || buf.is_empty() {
            return Ok(());
        }
        let bucket = (BUCKET_BYTES / std::mem::size_of::<T>()).max(1);
        let mut send = vec![T::default(); bucket.min(buf.len())];
        self.with_comm(|comm| {
            for chunk in buf.chunks_mut(bucket) {
                let send = &mut send[..chunk.len()];
                send.copy_from_slice(chunk);
                // SAFETY: `send` and `chunk` are disjoint buffers of `chunk.len()` (< 2^31, a bucket) elements of
                // the datatype's type; the communicator is valid; calls are serialised by the mutex.
                let rc = unsafe {
                    ffi::MPI_Allreduce(
                        send.as_ptr().cast::<c_void>(),
                        chunk.as_mut_ptr().cast::<c_void>(),
                        chunk.len() as c_int,
                        T::datatype(),
                        ffi::RSMPI_SUM,
                        comm,
                    )
                };
                check(op, rc)?;
            }
            Ok(())
        })
    }
}

/// The bucket `j` (elements `[j·b, j·b + b)` of every rank's shard) of the sharded layout of a buffer: per
/// rank, the start of its piece in the flat buffer and its length, plus the packed displacements (by rank).
struct ShardBucket {
    starts: Vec<usize>,
    lens: Vec<c_int>,
    displs: Vec<c_int>,
}

impl ShardBucket {
    fn new(shard_starts: &[usize], counts: &[usize], offset: usize, bucket: usize) -> Self {
        let lens: Vec<c_int> = counts
            .iter()
            .map(|&c| c.saturating_sub(offset).min(bucket) as c_int)
            .collect();
        let displs = lens
            .iter()
            .scan(0, |acc, &l| {
                let d = *acc;
                *acc += l;
                Some(d)
            })
            .collect();
        ShardBucket {
            starts: shard_starts.iter().map(|s| s + offset).collect(),
            lens,
            displs,
        }
    }
    /// The flat range and the packed range of rank `r`'s piece.
    fn piece(&self, r: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (len, d) = (self.lens[r] as usize, self.displs[r] as usize);
        (self.starts[r]..self.starts[r] + len, d..d + len)
    }
}

impl MpiCollective {
    /// Calls `f(bucket)` for each bucket of the sharded layout of a buffer of `len` f32 (see the module
    /// documentation).
    fn for_each_shard_bucket(
        &self,
        len: usize,
        mut f: impl FnMut(&ShardBucket) -> Result<()>,
    ) -> Result<()> {
        let counts = shard_counts(len, self.world_size);
        let starts: Vec<usize> = counts
            .iter()
            .scan(0, |acc, &c| {
                let s = *acc;
                *acc += c;
                Some(s)
            })
            .collect();
        let bucket = BUCKET_BYTES / std::mem::size_of::<f32>();
        let largest = counts.iter().copied().max().unwrap_or(0);
        for offset in (0..largest).step_by(bucket) {
            f(&ShardBucket::new(&starts, &counts, offset, bucket))?;
        }
        Ok(())
    }
}

impl Drop for MpiCollective {
    fn drop(&mut self) {
        let comm = self.comm.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `comm` is the communicator duplicated in `init`, freed once, before MPI_Finalize (the universe
        // field drops after this).
        unsafe {
            ffi::MPI_Comm_free(&mut comm.0);
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum("all_reduce_sum_f32", buf)
    }
    fn all_reduce_sum_u32(&self, buf: &mut [u32]) -> Result<()> {
        self.all_reduce_sum("all_reduce_sum_u32", buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_sum("all_reduce_sum_f64", buf)
    }
    fn reduce_scatter_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        // The bucketed all-reduce: a valid reduce-scatter (every shard is summed, this rank's included), and the
        // faster one with Open MPI 4 over shared memory, whose MPI_Reduce_scatter took 16–29 ms against the
        // all-reduce's 6 ms for 6.5 M floats at 2 ranks (examples/mpi_bench.rs, docs/perf.md).
        self.all_reduce_sum("reduce_scatter_sum_f32", buf)
    }
    fn all_gather_f32(&self, buf: &mut [f32]) -> Result<()> {
        const OP: &str = "all_gather_f32";
        if self.world_size == 1 {
            return Ok(());
        }
        let bucket = BUCKET_BYTES / std::mem::size_of::<f32>();
        let mut send = vec![0f32; bucket];
        let mut recv = vec![0f32; self.world_size * bucket];
        self.with_comm(|comm| {
            self.for_each_shard_bucket(buf.len(), |b| {
                let (own, _) = b.piece(self.rank);
                let n = own.len();
                send[..n].copy_from_slice(&buf[own]);
                // SAFETY: `send` holds lens[rank] f32, `recv` Σ lens at the packed displacements; `lens` and
                // `displs` have one entry per rank and agree on every rank; valid communicator, serialised calls.
                check(OP, unsafe {
                    ffi::MPI_Allgatherv(
                        send.as_ptr().cast::<c_void>(),
                        n as c_int,
                        ffi::RSMPI_FLOAT,
                        recv.as_mut_ptr().cast::<c_void>(),
                        b.lens.as_ptr(),
                        b.displs.as_ptr(),
                        ffi::RSMPI_FLOAT,
                        comm,
                    )
                })?;
                for r in 0..self.world_size {
                    let (flat, packed) = b.piece(r);
                    buf[flat].copy_from_slice(&recv[packed]);
                }
                Ok(())
            })
        })
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        const OP: &str = "broadcast_bytes";
        if root >= self.world_size {
            return Err(CollectiveError::Mismatch {
                op: OP,
                message: format!("root {root} outside a world of {} ranks", self.world_size),
            });
        }
        if self.world_size == 1 {
            return Ok(());
        }
        self.with_comm(|comm| {
            let mut len = [buf.len() as u64];
            // SAFETY: one u64 on every rank; valid communicator; root < world size.
            check(OP, unsafe {
                ffi::MPI_Bcast(
                    len.as_mut_ptr().cast::<c_void>(),
                    1,
                    ffi::RSMPI_UINT64_T,
                    root as c_int,
                    comm,
                )
            })?;
            let n = usize::try_from(len[0]).map_err(|_| CollectiveError::Mismatch {
                op: OP,
                message: format!("{} bytes do not fit in memory", len[0]),
            })?;
            buf.resize(n, 0);
            for chunk in buf.chunks_mut(BUCKET_BYTES) {
                // SAFETY: `chunk` holds `chunk.len()` bytes on every rank (the length was broadcast first).
                check(OP, unsafe {
                    ffi::MPI_Bcast(
                        chunk.as_mut_ptr().cast::<c_void>(),
                        chunk.len() as c_int,
                        ffi::RSMPI_UINT8_T,
                        root as c_int,
                        comm,
                    )
                })?;
            }
            Ok(())
        })
    }
    fn barrier(&self) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        // SAFETY: valid communicator.
        self.with_comm(|comm| check("barrier", unsafe { ffi::MPI_Barrier(comm) }))
    }
    fn abort(&self, code: i32) {
        abort_world(code)
    }
}

/// Ends every rank of the job (`MPI_Abort` on `MPI_COMM_WORLD`) if MPI is running; then exits this process with
/// `code`. For panic hooks and fatal errors: a rank must not wait in `MPI_Finalize` while its peers wait in a
/// collective.
pub fn abort_world(code: i32) -> ! {
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        // SAFETY: MPI is initialised and not finalised; MPI_Abort may be called from any thread.
        unsafe {
            ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code);
        }
    }
    std::process::exit(code)
}
