//! VaR / top-k selection on the GPU (`kernels/select.cu`): exact radix select over order-preserving u32 keys
//! (digits of 11, 11, 10 bits), then a scan-based compaction that writes the keep mask and the ASCENDING kept
//! indices. The same rule, tie handling, key order and VaR rounding as [`crate::select()`], so the threshold, the
//! count and the indices are identical to the CPU's.
//!
//! Nothing is read back inside [`CudaKernels::select`]: `k`, the threshold, the kept count and the error status
//! stay in a small device-side state ([`DeviceSelection::count`] is what [`CudaKernels::sparse_ce`] reads).
//! Device-side errors (a NaN score in a valid row, no valid row, top-k with k > M) leave the count at 0 and the
//! keep mask all 0; [`DeviceSelection::summary`] reads the state and turns them into the CPU's errors.

use std::mem::offset_of;

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::params::{
    EslmSelectParams, EslmSelectState, ESLM_RULE_TOPK, ESLM_RULE_VAR, ESLM_SELECT_BINS,
    ESLM_SELECT_PASSES, ESLM_SEL_ITEMS, ESLM_SEL_PICK_THREADS, ESLM_SEL_SCAN_THREADS,
    ESLM_SEL_THREADS, ESLM_STATUS_INVALID_K, ESLM_STATUS_NAN_SCORE, ESLM_STATUS_NO_VALID_ROWS,
};
use super::CudaKernels;
use crate::error::{KernelError, Result};
use crate::select::{SelectRule, Selection};

// Block sizes: kernels/eslm_kernels.h is the one definition (each kernel traps on any other block size).
/// Threads of the init, histogram, tile-count and write kernels (`ESLM_SEL_THREADS`).
pub(super) const THREADS: u32 = ESLM_SEL_THREADS;
/// Rows per tile (`ESLM_SEL_THREADS · ESLM_SEL_ITEMS`).
const TILE: usize = (ESLM_SEL_THREADS * ESLM_SEL_ITEMS) as usize;
/// Threads of the pick kernel (`ESLM_SEL_PICK_THREADS`: two bins each).
const PICK_THREADS: u32 = ESLM_SEL_PICK_THREADS;
/// Threads of the tile scan (`ESLM_SEL_SCAN_THREADS`).
const SCAN_THREADS: u32 = ESLM_SEL_SCAN_THREADS;
/// Rows per thread the histogram grid aims for (the grid is capped at 1024 blocks).
const HIST_ROWS_PER_THREAD: usize = 16;
/// The state struct as u32 words.
const STATE_WORDS: usize = std::mem::size_of::<EslmSelectState>() / 4;

/// Word index of a field of [`EslmSelectState`].
const fn word(offset: usize) -> usize {
    offset / 4
}

/// What [`DeviceSelection::summary`] reads back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectionSummary {
    /// The k-th largest valid score (as [`Selection::threshold`]).
    pub threshold: f32,
    /// The target count k.
    pub k: usize,
    /// The kept count (`≥ k` only for VaR with ties at the threshold).
    pub count: usize,
    /// M, the number of valid rows.
    pub valid: usize,
}

/// Device buffers of one selection, reused across calls: the outputs (`keep`, `indices`, the state holding
/// threshold and count) and the scratch (histogram, per-tile counts).
#[derive(Debug)]
pub struct DeviceSelection {
    /// `[capacity]` 1 if the row is kept (u8).
    pub keep: CudaSlice<u8>,
    /// `[capacity]` the kept row indices, ascending, in the first `count` entries; every later entry is
    /// [`NO_ROW`](super::NO_ROW) (rewritten on every call, so nothing stale from an earlier selection remains).
    pub indices: CudaSlice<u32>,
    /// The `EslmSelectState` (kernels/eslm_kernels.h) as u32 words.
    state: CudaSlice<u32>,
    hist: CudaSlice<u32>,
    tiles: CudaSlice<u64>,
    rows: usize,
    requested_k: usize,
}

impl DeviceSelection {
    /// Allocates buffers for selections over up to `capacity` rows.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on allocation failure.
    pub fn new(gpu: &CudaKernels, capacity: usize) -> Result<Self> {
        Ok(Self {
            keep: gpu.zeros(capacity)?,
            indices: gpu.zeros(capacity)?,
            state: gpu.zeros(STATE_WORDS)?,
            hist: gpu.zeros(ESLM_SELECT_BINS as usize)?,
            tiles: gpu.zeros(capacity.div_ceil(TILE))?,
            rows: 0,
            requested_k: 0,
        })
    }

    /// Maximum number of rows.
    pub fn capacity(&self) -> usize {
        self.keep.len()
    }

    /// Number of rows of the last call.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The kept count, in device memory (one u32; 0 after a device-side error). Feed it to
    /// [`CudaKernels::sparse_ce`] together with [`DeviceSelection::indices`].
    pub fn count(&self) -> CudaView<'_, u32> {
        let w = word(offset_of!(EslmSelectState, count));
        self.state.slice(w..w + 1)
    }

    /// The threshold score, in device memory (one f32 bit pattern stored as u32).
    pub fn threshold_bits(&self) -> CudaView<'_, u32> {
        let w = word(offset_of!(EslmSelectState, threshold));
        self.state.slice(w..w + 1)
    }

    /// Reads the state back (synchronises the stream): threshold, k, count, M; device-side errors become the CPU
    /// backend's errors.
    ///
    /// # Errors
    /// [`KernelError::NanScore`] (lowest such row), [`KernelError::NoValidRows`], [`KernelError::InvalidK`], or
    /// [`KernelError::Cuda`] on copy failure.
    pub fn summary(&self, gpu: &CudaKernels) -> Result<SelectionSummary> {
        let s = gpu.download(&self.state.slice(0..STATE_WORDS))?;
        let get = |offset: usize| s[word(offset)];
        let status = get(offset_of!(EslmSelectState, status));
        let valid = get(offset_of!(EslmSelectState, valid_count)) as usize;
        if status & ESLM_STATUS_NAN_SCORE != 0 {
            return Err(KernelError::NanScore {
                row: get(offset_of!(EslmSelectState, nan_row)) as usize,
            });
        }
        if status & ESLM_STATUS_NO_VALID_ROWS != 0 {
            return Err(KernelError::NoValidRows);
        }
        if status & ESLM_STATUS_INVALID_K != 0 {
            return Err(KernelError::InvalidK {
                k: self.requested_k,
                valid,
            });
        }
        Ok(SelectionSummary {
            threshold: f32::from_bits(get(offset_of!(EslmSelectState, threshold))),
            k: get(offset_of!(EslmSelectState, k)) as usize,
            count: get(offset_of!(EslmSelectState, count)) as usize,
            valid,
        })
    }

    /// Copies the last selection into `out` (synchronises the stream).
    ///
    /// # Errors
    /// As [`DeviceSelection::summary`].
    pub fn to_host(&self, gpu: &CudaKernels, out: &mut Selection) -> Result<()> {
        let summary = self.summary(gpu)?;
        out.threshold = summary.threshold;
        out.k = summary.k;
        out.keep = gpu
            .download(&self.keep.slice(0..self.rows))?
            .into_iter()
            .map(|v| v != 0)
            .collect();
        out.indices = gpu.download(&self.indices.slice(0..summary.count))?;
        Ok(())
    }
}

/// Checks α like the CPU backend (NaN rejected).
fn check_alpha(alpha: f64) -> Result<()> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(KernelError::InvalidAlpha(alpha))
    }
}

impl CudaKernels {
    /// Queues a selection over `scores` (`[N]`, device) with optional validity flags (`[N]` u8, e.g.
    /// [`DeviceTokenStats::valid`](super::DeviceTokenStats)). Asynchronous: nothing is read back; see the module
    /// docs for where the results live and how device-side errors are reported.
    ///
    /// # Errors
    /// Checked on the host, before anything is queued: [`KernelError::Shape`] (`valid` length, N ≥ 2³² or more
    /// than `out`'s capacity), [`KernelError::InvalidAlpha`], [`KernelError::NoValidRows`] for N = 0;
    /// [`KernelError::Cuda`] if a launch fails.
    pub fn select(
        &self,
        scores: &CudaView<'_, f32>,
        valid: Option<&CudaView<'_, u8>>,
        rule: SelectRule,
        out: &mut DeviceSelection,
    ) -> Result<()> {
        let n = scores.len();
        if let Some(v) = valid {
            if v.len() != n {
                return Err(KernelError::Shape {
                    what: "valid",
                    expected: format!("length {n} (one flag per score)"),
                    got: format!("length {}", v.len()),
                });
            }
        }
        if n >= u32::MAX as usize {
            return Err(KernelError::Shape {
                what: "scores",
                expected: "fewer than 2^32 - 1 rows on the GPU (indices are u32)".into(),
                got: format!("{n} rows"),
            });
        }
        if n > out.capacity() {
            return Err(KernelError::Shape {
                what: "selection outputs",
                expected: format!("capacity for at least {n} rows"),
                got: format!("{} rows", out.capacity()),
            });
        }
        let (rule_id, alpha, topk) = match rule {
            SelectRule::Var { alpha } => {
                check_alpha(alpha)?;
                (ESLM_RULE_VAR as i32, alpha, 0u64)
            }
            SelectRule::TopK { k } => (ESLM_RULE_TOPK as i32, 0.5, k as u64),
        };
        if n == 0 {
            return Err(KernelError::NoValidRows);
        }
        out.rows = n;
        out.requested_k = match rule {
            SelectRule::TopK { k } => k,
            SelectRule::Var { .. } => 0,
        };
        let params = EslmSelectParams {
            rows: n as u64,
            capacity: out.indices.len() as u64,
            alpha,
            topk,
            rule: rule_id,
            has_valid: valid.is_some() as i32,
        };
        let f = &self.functions;
        let s = &self.stream;
        let one = |threads: u32| LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let hist_blocks = n
            .div_ceil(THREADS as usize * HIST_ROWS_PER_THREAD)
            .clamp(1, 1024) as u32;
        let hist_cfg = LaunchConfig {
            grid_dim: (hist_blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let tiles = n.div_ceil(TILE) as u32;
        let tile_cfg = LaunchConfig {
            grid_dim: (tiles, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let null = 0u64;

        // SAFETY (every launch below): the argument lists match the kernels in kernels/select.cu; `scores` and
        // `valid` hold N entries, `keep`/`indices` at least N (capacity checked), `tiles` ceil(capacity / TILE),
        // `hist` ESLM_SELECT_BINS, `state` one EslmSelectState.
        let mut init = s.launch_builder(&f.select_init);
        init.arg(&mut out.state).arg(&mut out.hist);
        unsafe { init.launch(one(THREADS)) }?;
        for pass in 0..ESLM_SELECT_PASSES {
            let mut hist = s.launch_builder(&f.select_histogram);
            hist.arg(&params).arg(scores);
            match valid {
                Some(v) => hist.arg(v),
                None => hist.arg(&null),
            };
            hist.arg(&mut out.state).arg(&mut out.hist).arg(&pass);
            unsafe { hist.launch(hist_cfg) }?;
            let mut pick = s.launch_builder(&f.select_pick);
            pick.arg(&params)
                .arg(&mut out.state)
                .arg(&mut out.hist)
                .arg(&pass);
            unsafe { pick.launch(one(PICK_THREADS)) }?;
        }
        let mut counts = s.launch_builder(&f.select_tile_counts);
        counts.arg(&params).arg(scores);
        match valid {
            Some(v) => counts.arg(v),
            None => counts.arg(&null),
        };
        counts.arg(&out.state).arg(&mut out.tiles);
        unsafe { counts.launch(tile_cfg) }?;
        let mut scan = s.launch_builder(&f.select_tile_scan);
        scan.arg(&out.state).arg(&mut out.tiles).arg(&tiles);
        unsafe { scan.launch(one(SCAN_THREADS)) }?;
        let mut write = s.launch_builder(&f.select_write);
        write.arg(&params).arg(scores);
        match valid {
            Some(v) => write.arg(v),
            None => write.arg(&null),
        };
        write
            .arg(&out.state)
            .arg(&out.tiles)
            .arg(&mut out.keep)
            .arg(&mut out.indices);
        unsafe { write.launch(tile_cfg) }?;
        Ok(())
    }

    /// [`crate::select()`] on the GPU: same signature, checks, errors (in the same order) and results.
    ///
    /// # Errors
    /// As [`crate::select()`], plus [`KernelError::Cuda`] on device failures.
    pub fn select_host(
        &self,
        scores: &[f32],
        valid: Option<&[bool]>,
        rule: SelectRule,
        out: &mut Selection,
    ) -> Result<()> {
        let n = scores.len();
        if let Some(v) = valid {
            if v.len() != n {
                return Err(KernelError::Shape {
                    what: "valid",
                    expected: format!("length {n} (one flag per score)"),
                    got: format!("length {}", v.len()),
                });
            }
        }
        if let SelectRule::Var { alpha } = rule {
            check_alpha(alpha)?;
        }
        if n == 0 {
            return Err(KernelError::NoValidRows);
        }
        let d_scores = self.upload(scores)?;
        let d_valid = match valid {
            Some(v) => Some(self.upload(&v.iter().map(|&b| b as u8).collect::<Vec<u8>>())?),
            None => None,
        };
        let mut sel = DeviceSelection::new(self, n)?;
        let valid_view = d_valid.as_ref().map(|v| v.slice(0..n));
        self.select(&d_scores.slice(0..n), valid_view.as_ref(), rule, &mut sel)?;
        let mut result = Selection::new();
        sel.to_host(self, &mut result)?;
        *out = result;
        Ok(())
    }
}
