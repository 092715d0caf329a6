//! GPU ranks' collectives through NCCL (cudarc's `nccl` bindings, loaded at run time like the driver): one NCCL
//! communicator per rank on the backend's stream, its unique id created by rank 0 and broadcast over the job's
//! host [`Collective`] (MPI). The gradient all-reduce, and ZeRO-1's reduce-scatter and all-gather over the
//! uneven [`eslm_collective::shard_range`] layout (one `ncclReduce` / `ncclBroadcast` per rank's shard inside a
//! group, in place), run on the device buffers and are ordered on the stream like every other op: no host copy,
//! no synchronisation.
//!
//! **Never run**: no GPU (let alone two) has been available; `scripts/gpu-check.sh` runs the single-GPU path.

use std::ffi::c_void;

use eslm_collective::Collective;
use eslm_kernels::cuda::cudarc;
use eslm_kernels::KernelError;

use cudarc::driver::CudaStream;
use cudarc::nccl::{result as nccl, sys};

use crate::backend::CollectiveOp;
use crate::error::{Gpt2Error, Result};

/// One rank's NCCL communicator.
pub(super) struct Nccl {
    comm: sys::ncclComm_t,
    world: usize,
}

// SAFETY: the communicator is used only through `&mut Cuda` (one thread at a time), as NCCL requires.
unsafe impl Send for Nccl {}
// SAFETY: as above; shared references never call NCCL.
unsafe impl Sync for Nccl {}

fn nccl_error(what: &str, e: nccl::NcclError) -> Gpt2Error {
    Gpt2Error::Collective(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// Whether the NCCL library (`libnccl.so.2`) can be loaded.
    pub(super) fn available() -> bool {
        // SAFETY: only tries to dlopen the library.
        unsafe { sys::is_culib_present() }
    }

    /// Creates this rank's communicator over the ranks of `collective` (every rank calls it, with its GPU
    /// current): rank 0 draws the unique id, `collective` broadcasts it.
    ///
    /// # Errors
    /// NCCL missing or failing, or the broadcast failing.
    pub(super) fn connect(collective: &dyn Collective) -> Result<Self> {
        if !Self::available() {
            return Err(KernelError::Cuda(
                "NCCL (libnccl.so.2) not found: install it (e.g. `pip install nvidia-nccl-cu13` and add its lib \
                 directory to LD_LIBRARY_PATH)"
                    .into(),
            )
            .into());
        }
        let (rank, world) = (collective.rank(), collective.world_size());
        // Rank 0 always broadcasts, an empty id when it could not draw one, so no rank waits for it forever.
        let mut drawn = None;
        let mut id_bytes = if rank == 0 {
            match nccl::get_uniqueid() {
                Ok(id) => id.internal.iter().map(|&c| c as u8).collect(),
                Err(e) => {
                    drawn = Some(e);
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        collective
            .broadcast_bytes(&mut id_bytes, 0)
            .map_err(|e| Gpt2Error::Collective(e.to_string()))?;
        if let Some(e) = drawn {
            return Err(nccl_error("unique id", e));
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if id_bytes.len() != id.internal.len() {
            return Err(Gpt2Error::Collective(format!(
                "NCCL unique id of {} bytes from rank 0 (expected {}; rank 0 could not draw one)",
                id_bytes.len(),
                id.internal.len()
            )));
        }
        for (dst, &b) in id.internal.iter_mut().zip(&id_bytes) {
            *dst = b as std::ffi::c_char;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; every rank passes the same id and world size.
        unsafe { nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| nccl_error("communicator", e))?;
        Ok(Nccl { comm, world })
    }

    /// Number of ranks of the communicator.
    pub(super) fn world_size(&self) -> usize {
        self.world
    }

    /// Runs `op` in place on the `len` f32 at device address `ptr`, on `stream`.
    pub(super) fn run(
        &self,
        op: CollectiveOp,
        ptr: u64,
        len: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let s = stream.cu_stream() as sys::cudaStream_t;
        let buf = ptr as *mut c_void;
        let f32_ty = sys::ncclDataType_t::ncclFloat32;
        let sum = sys::ncclRedOp_t::ncclSum;
        // SAFETY (every call): `ptr` holds `len` f32 on this rank's GPU for as long as the stream uses it (the
        // caller's view borrows the buffer); in-place operations are allowed by NCCL; the shard pieces lie inside
        // `[ptr, ptr + len)`.
        match op {
            CollectiveOp::AllReduceSum => {
                unsafe { nccl::all_reduce(buf, buf, len, f32_ty, sum, self.comm, s) }
                    .map(|_| ())
                    .map_err(|e| nccl_error("all-reduce", e))
            }
            CollectiveOp::ReduceScatterSum => {
                self.per_shard("reduce-scatter", len, |off, n, root| unsafe {
                    let p = buf.cast::<f32>().add(off).cast::<c_void>();
                    nccl::reduce(p, p, n, f32_ty, sum, root, self.comm, s)
                })
            }
            CollectiveOp::AllGather => self.per_shard("all-gather", len, |off, n, root| unsafe {
                let p = buf.cast::<f32>().add(off).cast::<c_void>();
                nccl::broadcast(p, p, n, f32_ty, root, self.comm, s)
            }),
        }
    }

    /// One call per rank's shard `(offset, length, owner)` inside an NCCL group (so they run as one collective).
    fn per_shard(
        &self,
        what: &str,
        len: usize,
        mut call: impl FnMut(
            usize,
            usize,
            i32,
        ) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        nccl::group_start().map_err(|e| nccl_error(what, e))?;
        let mut first_error = None;
        for owner in 0..self.world {
            let r = eslm_collective::shard_range(len, self.world, owner);
            if r.is_empty() {
                continue;
            }
            if let Err(e) = call(r.start, r.len(), owner as i32) {
                first_error.get_or_insert(e);
            }
        }
        // The group is always closed, even after a failed call.
        let end = nccl::group_end();
        match (first_error, end) {
            (Some(e), _) | (None, Err(e)) => Err(nccl_error(what, e)),
            (None, Ok(_)) => Ok(()),
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by `connect` and is destroyed once.
        let _ = unsafe { nccl::comm_destroy(self.comm) };
    }
}
