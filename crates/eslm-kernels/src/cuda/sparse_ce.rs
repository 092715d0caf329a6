//! Sparse-gradient cross-entropy on the GPU (`kernels/sparse_ce.cu`): for kept row `r = kept[i]`,
//! `dlogits[i, j] = (e^{z_j − lse_r} − [j = y_r])·g` into a compact `[K, out_stride]` buffer (padding zeroed), and
//! the mean loss `(1/K) Σ (lse_r − z_{y_r})`. K is read on the device (e.g. [`DeviceSelection::count`]), so the
//! call needs no host round trip; rows not kept are never touched. Same math as [`crate::sparse_ce()`].

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::params::{EslmSparseCeParams, ESLM_STATUS_BAD_KEPT_ROW};
use super::{grid_for, CudaKernels, DeviceElem, DeviceLogits, DeviceSelection};
use crate::error::{check_len, KernelError, Result};
use crate::layout::{LogitElem, LogitsView};
use crate::sparse_ce::check_sparse_ce_args;

/// Threads per block of the gradient kernel (`CE_THREADS`).
const THREADS: u32 = 512;
/// Threads of the loss reduction (`CE_REDUCE_THREADS`).
const REDUCE_THREADS: u32 = 256;

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
    /// `ESLM_STATUS_BAD_KEPT_ROW` if a kept entry was not a row or had an out-of-range target.
    pub status: CudaSlice<u32>,
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
            status: gpu.zeros(1)?,
        })
    }

    /// Maximum number of kept rows.
    pub fn capacity(&self) -> usize {
        self.row_loss.len()
    }

    /// Reads the mean loss and the status (synchronises the stream).
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if a kept entry was bad (its output row was zeroed) or a copy fails.
    pub fn read_loss(&self, gpu: &CudaKernels) -> Result<f32> {
        let status = gpu.download(&self.status.slice(0..1))?[0];
        if status & ESLM_STATUS_BAD_KEPT_ROW != 0 {
            return Err(KernelError::Cuda(
                "sparse_ce: a kept index is not a row, or a kept row's target is outside [0, vocab)".into(),
            ));
        }
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
    /// K, one u32 in device memory (clamped to the capacity of `kept`, `dlogits` and the scratch).
    pub count: &'b CudaView<'a, u32>,
    /// `[capacity, out_stride]` output, f32 or bf16.
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
        // kept entries, output rows and scratch entries, all within the buffers (checked above).
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
        // SAFETY: matches `sparse_ce_loss`; it reads min(K, capacity) row losses.
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

    /// [`crate::sparse_ce()`] on the GPU: same signature, checks and errors, with f32 or bf16 gradients.
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
        let mut d_out = self.zeros::<O>(needed)?;
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
