//! Sparse-gradient cross-entropy on the GPU (`kernels/sparse_ce.cu`): for kept row `r = kept[i]`,
//! `dlogits[i, j] = (e^{z_j − lse_r} − [j = y_r])·g` into a compact `[K, out_stride]` buffer (padding zeroed), and
//! the mean loss `(1/K) Σ (lse_r − z_{y_r})`. K is read on the device (e.g. [`DeviceSelection::count`]), so the
//! call needs no host round trip; rows not kept are never read. Same math as [`crate::sparse_ce()`].
//!
//! **Rows past K.** The output has room for `capacity` rows and only the device knows K, so rows `[K, capacity)`
//! are written with zeros on every call: a consumer that works on all `capacity` rows (a GEMM whose shape is fixed
//! on the host) gets exact zeros there, never the previous call's gradients.
//!
//! **K over capacity.** VaR keeps every tie, so K can exceed ⌈(1 − α)·M⌉. If K is larger than the capacity, the
//! kernel computes nothing (every output row zeroed, loss NaN) and flags it; [`DeviceSparseCe::read_loss`] and
//! [`DeviceSparseCe::check_status`] return [`KernelError::KeptOverCapacity`] naming K and the capacity.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::params::{
    EslmSparseCeParams, ESLM_CE_REDUCE_THREADS, ESLM_CE_THREADS, ESLM_STATUS_BAD_KEPT_ROW,
    ESLM_STATUS_KEPT_OVER_CAPACITY,
};
use super::{grid_for, CudaKernels, DeviceElem, DeviceLogits, DeviceSelection};
use crate::error::{check_len, KernelError, Result};
use crate::layout::{LogitElem, LogitsView};
use crate::sparse_ce::check_sparse_ce_args;

/// Threads per block of the gradient kernel (`ESLM_CE_THREADS`, kernels/eslm_kernels.h; the kernel traps on any
/// other block size).
pub(super) const THREADS: u32 = ESLM_CE_THREADS;
/// Threads of the loss reduction (`ESLM_CE_REDUCE_THREADS`).
const REDUCE_THREADS: u32 = ESLM_CE_REDUCE_THREADS;

/// The gradient scale `g`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradScale {
    /// `g` as given (e.g. `1/K` computed by the caller).
    Constant(f32),
    /// `g / K` with K the kept count read on the device: `OverCount(1.0)` is the mean over kept rows (the CVaR
    /// estimator) without a host round trip.
    OverCount(f32),
}

/// Scratch and outputs of [`CudaKernels::sparse_ce`]: per-row losses, the mean loss and a status word.
#[derive(Debug)]
pub struct DeviceSparseCe {
    /// `[capacity]` loss of each kept row (scratch for the deterministic mean).
    row_loss: CudaSlice<f32>,
    /// The mean loss over kept rows (one f32; 0 when K = 0).
    pub loss: CudaSlice<f32>,
    /// `[2]`: the `ESLM_STATUS_*` bits of the last call (`BAD_KEPT_ROW`, `KEPT_OVER_CAPACITY`), then the K the
    /// kernel read.
    pub status: CudaSlice<u32>,
    /// The capacity (rows) of the last call.
    last_capacity: usize,
}

/// Turns the status words of a call (`[bits, K read]`) with its capacity into the host error, if any.
///
/// # Errors
/// [`KernelError::KeptOverCapacity`] (checked first: then nothing was computed) or [`KernelError::Cuda`] for a bad
/// kept entry.
pub fn sparse_ce_status(status: [u32; 2], capacity: usize) -> Result<()> {
    let [bits, count] = status;
    if bits & ESLM_STATUS_KEPT_OVER_CAPACITY != 0 {
        return Err(KernelError::KeptOverCapacity {
            count: count as usize,
            capacity,
        });
    }
    if bits & ESLM_STATUS_BAD_KEPT_ROW != 0 {
        return Err(KernelError::Cuda(
            "sparse_ce: a kept index is not a row, or a kept row's target is outside [0, vocab) (its gradient row \
             was zeroed)"
                .into(),
        ));
    }
    Ok(())
}

impl DeviceSparseCe {
    /// Allocates scratch for up to `capacity` kept rows.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on allocation failure.
    pub fn new(gpu: &CudaKernels, capacity: usize) -> Result<Self> {
        Ok(Self {
            row_loss: gpu.zeros(capacity)?,
            loss: gpu.zeros(1)?,
            status: gpu.zeros(2)?,
            last_capacity: 0,
        })
    }

    /// Maximum number of kept rows.
    pub fn capacity(&self) -> usize {
        self.row_loss.len()
    }

    /// Reads the status of the last call (synchronises the stream).
    ///
    /// # Errors
    /// As [`sparse_ce_status`], or [`KernelError::Cuda`] if a copy fails.
    pub fn check_status(&self, gpu: &CudaKernels) -> Result<()> {
        let s = gpu.download(&self.status.slice(0..2))?;
        sparse_ce_status([s[0], s[1]], self.last_capacity)
    }

    /// Reads the status and the mean loss (synchronises the stream).
    ///
    /// # Errors
    /// As [`DeviceSparseCe::check_status`].
    pub fn read_loss(&self, gpu: &CudaKernels) -> Result<f32> {
        self.check_status(gpu)?;
        Ok(gpu.download(&self.loss.slice(0..1))?[0])
    }
}

/// The buffers of one [`CudaKernels::sparse_ce`] call.
#[derive(Debug)]
pub struct SparseCeArgs<'a, 'b, 'c, T, O> {
    /// `[N, stride]` logits.
    pub logits: &'b DeviceLogits<'a, T>,
    /// `[N]` targets.
    pub targets: &'b CudaView<'a, i32>,
    /// `[N]` log-sum-exp (e.g. [`DeviceTokenStats::lse`](super::DeviceTokenStats)).
    pub lse: &'b CudaView<'a, f32>,
    /// `[capacity]` kept row indices; the first K are used.
    pub kept: &'b CudaView<'a, u32>,
    /// K, one u32 in device memory; K larger than the capacity (the rows `kept`, `dlogits` and the scratch all
    /// hold) is reported as [`KernelError::KeptOverCapacity`] by [`DeviceSparseCe::check_status`].
    pub count: &'b CudaView<'a, u32>,
    /// `[capacity, out_stride]` output, f32 or bf16: rows `[0, K)` the gradients, rows `[K, capacity)` zeros.
    pub dlogits: &'b mut CudaViewMut<'c, O>,
    /// Output row stride (elements), `≥ V`.
    pub out_stride: usize,
    /// The gradient scale.
    pub scale: GradScale,
}

impl CudaKernels {
    /// Queues the sparse cross-entropy gradient and the mean loss (asynchronous; read the loss with
    /// [`DeviceSparseCe::read_loss`] when needed).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `targets` or `lse` is not `[N]`, `out_stride < V`, or `dlogits` cannot hold the
    /// capacity; [`KernelError::Cuda`] if a launch fails.
    pub fn sparse_ce<T: DeviceElem, O: DeviceElem>(
        &self,
        args: SparseCeArgs<'_, '_, '_, T, O>,
        work: &mut DeviceSparseCe,
    ) -> Result<()> {
        let logits = args.logits;
        let n = logits.rows();
        let vocab = logits.vocab();
        check_len("targets", args.targets.len(), n)?;
        check_len("lse", args.lse.len(), n)?;
        check_len("count", args.count.len(), 1)?;
        if args.out_stride < vocab {
            return Err(KernelError::Shape {
                what: "out_stride",
                expected: format!("at least vocab = {vocab}"),
                got: format!("{}", args.out_stride),
            });
        }
        let capacity = args
            .kept
            .len()
            .min(work.capacity())
            .min(args.dlogits.len() / args.out_stride);
        let (scale, divide) = match args.scale {
            GradScale::Constant(g) => (g, 0),
            GradScale::OverCount(g) => (g, 1),
        };
        let params = EslmSparseCeParams {
            rows: n as u64,
            vocab: vocab as u64,
            stride: logits.stride() as u64,
            out_stride: args.out_stride as u64,
            max_kept: capacity as u64,
            scale,
            divide_by_count: divide,
        };
        work.last_capacity = capacity;
        self.stream.memset_zeros(&mut work.status)?;
        let func =
            &self.functions.sparse_ce[(T::NAME == "bf16") as usize][(O::NAME == "bf16") as usize];
        let cfg = LaunchConfig {
            grid_dim: (grid_for(capacity), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(func);
        launch
            .arg(&params)
            .arg(logits.data())
            .arg(args.targets)
            .arg(args.lse)
            .arg(args.kept)
            .arg(args.count)
            .arg(args.dlogits)
            .arg(&mut work.row_loss)
            .arg(&mut work.status);
        // SAFETY: matches `sparse_ce_<in>_<out>` in kernels/sparse_ce.cu; the kernel touches at most `capacity`
        // kept entries, output rows and scratch entries, all within the buffers (checked above), and two status
        // words.
        unsafe { launch.launch(cfg) }?;
        let max_kept = capacity as u64;
        let mut reduce = self.stream.launch_builder(&self.functions.sparse_ce_loss);
        reduce
            .arg(&max_kept)
            .arg(args.count)
            .arg(&work.row_loss)
            .arg(&mut work.loss);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `sparse_ce_loss`; it reads K ≤ capacity row losses (none when K > capacity).
        unsafe { reduce.launch(one) }?;
        Ok(())
    }

    /// [`CudaKernels::sparse_ce`] over a [`DeviceSelection`]'s indices and count.
    ///
    /// # Errors
    /// As [`CudaKernels::sparse_ce`].
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_ce_selected<T: DeviceElem, O: DeviceElem>(
        &self,
        logits: &DeviceLogits<'_, T>,
        targets: &CudaView<'_, i32>,
        lse: &CudaView<'_, f32>,
        selection: &DeviceSelection,
        scale: GradScale,
        dlogits: &mut CudaViewMut<'_, O>,
        out_stride: usize,
        work: &mut DeviceSparseCe,
    ) -> Result<()> {
        let kept = selection.indices.slice(0..selection.capacity());
        let count = selection.count();
        self.sparse_ce(
            SparseCeArgs {
                logits,
                targets,
                lse,
                kept: &kept,
                count: &count,
                dlogits,
                out_stride,
                scale,
            },
            work,
        )
    }

    /// [`crate::sparse_ce()`] on the GPU: same signature, checks and errors, with f32 or bf16 gradients. `dlogits`
    /// is uploaded as given and downloaded after the call (K = 0 returns 0 without a launch, like the CPU).
    ///
    /// # Errors
    /// As [`crate::sparse_ce()`], plus [`KernelError::Cuda`] on device failures.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_ce_host<T: LogitElem + DeviceElem, O: DeviceElem>(
        &self,
        logits: &LogitsView<'_, T>,
        targets: &[i32],
        lse: &[f32],
        kept: &[u32],
        scale: f32,
        dlogits: &mut [O],
        out_stride: usize,
    ) -> Result<f32> {
        let n = logits.rows();
        let vocab = logits.vocab();
        let needed = check_sparse_ce_args(n, vocab, targets, lse, kept, out_stride, dlogits.len())?;
        let k = kept.len();
        if k == 0 {
            return Ok(0.0);
        }
        let used = super::logits_len(n, vocab, logits.stride())?;
        let d_logits = self.upload(&logits.data()[..used])?;
        let view = DeviceLogits::new(d_logits.slice(0..used), n, vocab, logits.stride())?;
        let d_targets = self.upload(targets)?;
        let d_lse = self.upload(lse)?;
        let d_kept = self.upload(kept)?;
        let d_count = self.upload(&[k as u32])?;
        // The caller's buffer goes up as it is, so every element the kernel should write is seen to be written.
        let mut d_out = self.upload(&dlogits[..needed])?;
        let mut work = DeviceSparseCe::new(self, k)?;
        {
            let mut out_view = d_out.slice_mut(0..needed);
            self.sparse_ce(
                SparseCeArgs {
                    logits: &view,
                    targets: &d_targets.slice(0..n),
                    lse: &d_lse.slice(0..n),
                    kept: &d_kept.slice(0..k),
                    count: &d_count.slice(0..1),
                    dlogits: &mut out_view,
                    out_stride,
                    scale: GradScale::Constant(scale),
                },
                &mut work,
            )?;
        }
        let loss = work.read_loss(self)?;
        let host = self.download(&d_out.slice(0..needed))?;
        dlogits[..needed].copy_from_slice(&host);
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_capacity_is_a_typed_error_naming_both_counts() {
        assert_eq!(
            sparse_ce_status([ESLM_STATUS_KEPT_OVER_CAPACITY, 4100], 4096),
            Err(KernelError::KeptOverCapacity {
                count: 4100,
                capacity: 4096
            })
        );
        // Over capacity wins over a bad row (nothing was computed, so no row was looked at).
        assert!(matches!(
            sparse_ce_status(
                [ESLM_STATUS_KEPT_OVER_CAPACITY | ESLM_STATUS_BAD_KEPT_ROW, 9],
                8
            ),
            Err(KernelError::KeptOverCapacity {
                count: 9,
                capacity: 8
            })
        ));
        assert!(matches!(
            sparse_ce_status([ESLM_STATUS_BAD_KEPT_ROW, 3], 8),
            Err(KernelError::Cuda(_))
        ));
        assert_eq!(sparse_ce_status([0, 8], 8), Ok(()));
        assert_eq!(sparse_ce_status([0, 0], 0), Ok(()));
        let message = KernelError::KeptOverCapacity {
            count: 4100,
            capacity: 4096,
        }
        .to_string();
        assert!(
            message.contains("4100") && message.contains("4096"),
            "{message}"
        );
    }
}
