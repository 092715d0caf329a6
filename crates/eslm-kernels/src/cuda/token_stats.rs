//! Token statistics on the GPU (`kernels/token_stats.cu`): per row `lse = m + ln s`, `loss = lse − z_y`,
//! `entropy = ln s − t/s` with `s = Σ e^{z−m}`, `t = Σ e^{z−m}(z−m)`, in one pass and one `exp` per logit.
//! Same outputs and special-value policy as [`crate::token_stats()`] (f32 accumulation on the GPU, so results agree
//! with the CPU's to f32 rounding, not bit for bit).

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::params::{EslmTokenStatsParams, ESLM_STATUS_TARGET_OUT_OF_RANGE, ESLM_TS_THREADS};
use super::{grid_for, CudaKernels, DeviceElem, DeviceLogits};
use crate::error::{check_len, KernelError, Result};
use crate::layout::{LogitElem, LogitsView};
use crate::token_stats::TokenStats;

/// Threads per block of the statistics kernel (`ESLM_TS_THREADS`, kernels/eslm_kernels.h; the kernel traps on any
/// other block size).
pub(super) const THREADS: u32 = ESLM_TS_THREADS;

/// Device outputs of [`CudaKernels::token_stats`]: `[capacity]` buffers, the first `rows()` entries written.
#[derive(Debug)]
pub struct DeviceTokenStats {
    /// Log-sum-exp per row (NaN for ignored rows).
    pub lse: CudaSlice<f32>,
    /// Cross-entropy per row (NaN for ignored rows).
    pub loss: CudaSlice<f32>,
    /// Predictive entropy per row (NaN for ignored rows).
    pub entropy: CudaSlice<f32>,
    /// 1 for valid rows, 0 for ignored ones (u8, usable as the `valid` input of [`CudaKernels::select`]).
    pub valid: CudaSlice<u8>,
    /// `ESLM_STATUS_*` bits of the last call (see [`DeviceTokenStats::check_status`]).
    pub status: CudaSlice<u32>,
    rows: usize,
}

impl DeviceTokenStats {
    /// Allocates outputs for up to `capacity` rows.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on allocation failure.
    pub fn new(gpu: &CudaKernels, capacity: usize) -> Result<Self> {
        Ok(Self {
            lse: gpu.zeros(capacity)?,
            loss: gpu.zeros(capacity)?,
            entropy: gpu.zeros(capacity)?,
            valid: gpu.zeros(capacity)?,
            status: gpu.zeros(1)?,
            rows: 0,
        })
    }

    /// Number of rows written by the last call.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Maximum number of rows.
    pub fn capacity(&self) -> usize {
        self.lse.len()
    }

    /// Reads the device status of the last call (synchronises the stream).
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if a valid target was outside `[0, V)` (those rows were treated as ignored), or if a
    /// copy fails.
    pub fn check_status(&self, gpu: &CudaKernels) -> Result<()> {
        let status = gpu.download(&self.status.slice(0..1))?[0];
        if status & ESLM_STATUS_TARGET_OUT_OF_RANGE != 0 {
            return Err(KernelError::Cuda(
                "token_stats: a target outside [0, vocab) that is not the ignore value; those rows were treated \
                 as ignored"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Copies the first `rows()` results into `out` (synchronises the stream).
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on copy failure.
    pub fn to_host(&self, gpu: &CudaKernels, out: &mut TokenStats) -> Result<()> {
        let n = self.rows;
        out.lse = gpu.download(&self.lse.slice(0..n))?;
        out.loss = gpu.download(&self.loss.slice(0..n))?;
        out.entropy = gpu.download(&self.entropy.slice(0..n))?;
        out.valid = gpu
            .download(&self.valid.slice(0..n))?
            .into_iter()
            .map(|v| v != 0)
            .collect();
        Ok(())
    }
}

impl CudaKernels {
    /// Queues the statistics of every row of `logits` (asynchronous; nothing is read back).
    ///
    /// `targets` is `[N]` in device memory; rows whose target equals `ignore_index` are skipped. A target outside
    /// `[0, V)` is treated as ignored and flagged in `out.status` (see [`DeviceTokenStats::check_status`]).
    ///
    /// # Errors
    /// [`KernelError::Shape`] if `targets` is not `[N]` or `out` holds fewer than N rows; [`KernelError::Cuda`] if
    /// the launch fails.
    pub fn token_stats<T: DeviceElem>(
        &self,
        logits: &DeviceLogits<'_, T>,
        targets: &CudaView<'_, i32>,
        ignore_index: i32,
        out: &mut DeviceTokenStats,
    ) -> Result<()> {
        let n = logits.rows();
        check_len("targets", targets.len(), n)?;
        if out.capacity() < n {
            return Err(KernelError::Shape {
                what: "token stats outputs",
                expected: format!("capacity for at least {n} rows"),
                got: format!("{} rows", out.capacity()),
            });
        }
        out.rows = n;
        self.stream.memset_zeros(&mut out.status)?;
        if n == 0 {
            return Ok(());
        }
        let params = EslmTokenStatsParams {
            rows: n as u64,
            vocab: logits.vocab() as u64,
            stride: logits.stride() as u64,
            ignore_index,
            _pad: 0,
        };
        let func = if T::NAME == "f32" {
            &self.functions.token_stats_f32
        } else {
            &self.functions.token_stats_bf16
        };
        let cfg = LaunchConfig {
            grid_dim: (grid_for(n), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(func);
        launch
            .arg(&params)
            .arg(logits.data())
            .arg(targets)
            .arg(&mut out.lse)
            .arg(&mut out.loss)
            .arg(&mut out.entropy)
            .arg(&mut out.valid)
            .arg(&mut out.status);
        // SAFETY: the argument list matches `token_stats_{f32,bf16}` in kernels/token_stats.cu; the buffers hold
        // at least the rows the kernel touches (checked above and in DeviceLogits::new).
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::token_stats()`] on the GPU: same signature, checks and errors (upload, run, download).
    ///
    /// # Errors
    /// As [`crate::token_stats()`], plus [`KernelError::Cuda`] on device failures.
    pub fn token_stats_host<T: LogitElem + DeviceElem>(
        &self,
        logits: &LogitsView<'_, T>,
        targets: &[i32],
        ignore_index: i32,
        out: &mut TokenStats,
    ) -> Result<()> {
        let n = logits.rows();
        let vocab = logits.vocab();
        check_len("targets", targets.len(), n)?;
        for (row, &target) in targets.iter().enumerate() {
            if target != ignore_index && (target < 0 || target as usize >= vocab) {
                return Err(KernelError::TargetOutOfRange {
                    row,
                    target: target as i64,
                    vocab,
                });
            }
        }
        let used = super::logits_len(n, vocab, logits.stride())?;
        let d_logits = self.upload(&logits.data()[..used])?;
        let d_targets = self.upload(targets)?;
        let view = DeviceLogits::new(d_logits.slice(0..used), n, vocab, logits.stride())?;
        let mut stats = DeviceTokenStats::new(self, n)?;
        self.token_stats(&view, &d_targets.slice(0..n), ignore_index, &mut stats)?;
        stats.to_host(self, out)
    }
}
