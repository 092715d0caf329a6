//! The CUDA backend (feature `cuda`): [`Cuda`] implements [`Backend`] on one GPU stream.
//!
//! **Status: written and compiled, never run on a GPU.** The host-side logic (row maps, buckets, GEMM shapes) is
//! unit-tested below; `tests/cuda_backend.rs` compares every op and a whole training step with the CPU backend and
//! skips with a message where no CUDA driver loads.
//!
//! - **Buffers** ([`CudaBuf`]) hold f32, or bf16 for the activations of a backend with bf16 storage
//!   ([`Cuda::set_activation_dtype`]: llm.c's recipe, f32 master weights, gradients and AdamW state); views are
//!   `(device pointer, length, type)` ([`DevView`], [`DevViewMut`]) cut without the stream, so the model's flat
//!   parameter buffer is split into per-tensor views as on the CPU. Token ids and targets keep a host copy next to
//!   the device copy (the encoder backward groups rows by token on the host; the loss head checks targets there).
//! - **Products** are cuBLAS GEMMs (`cublasSgemmStridedBatched` in f32 or TF32 after
//!   [`Backend::set_matmul_precision`]; `cublasGemmStridedBatchedEx` with bf16 operands, f32 ones converted), row-major
//!   through the usual swap (`C = A·B` row-major is `Cᵀ = Bᵀ·Aᵀ` column-major); the forward linear layers run on
//!   cuBLASLt with the bias and GELU in the epilogue where it applies (`epilogue.rs`). Attention is llm.c's: `S = Q·Kᵀ`
//!   and `Y = P·V` batched over the heads of each sequence, a fused causal softmax kernel in between; the
//!   probabilities `P [B, H, T, T]` are stored for the backward, like the CPU backend.
//! - **Hand-written kernels** (`kernels/*.cu`, one family per file, each naming its CPU counterpart): encoder,
//!   layernorm, gelu, residual, rows (gather / scatter-add), attention (softmax forward / backward), adamw,
//!   global_norm, scale, linear (bias); every row-wise one with a bf16-activation twin. The loss head reuses
//!   eslm-kernels' token_stats, select and sparse_ce launchers on the same stream ([`CudaKernels`]), keeping the
//!   statistics and the selection of the model's own scores on the device.
//! - **Layout of this module**: this file holds the backend's state, its error discipline and buffer ops, and the
//!   [`Backend`] impl, which hands each op family to a file of its own — `encoder`, `layernorm`, `linear` (with
//!   the LM head), `gemm` (cuBLAS), `epilogue` (cuBLASLt), `attention`, `gelu`, `residual`, `rows`, `loss_head`,
//!   `optim` — that launches
//!   through the `launch!` macro (one checked, recorded launch). `launch` holds the pure launch arithmetic (unit
//!   tested), `memory` the buffers and views, `functions` the loaded kernels, `nccl` the device collectives.
//! - **Row sparsity** is the CPU backend's: compact `[K, width]` gradients for `RowSet::Rows`, the row list
//!   uploaded once per op; the attention backward scatters the kept rows' `dY` into a dense zeroed buffer and runs
//!   the dense backward (zero rows contribute exact zeros, so `dqkv` equals the CPU's; the FLOPs returned are the
//!   dense ones that ran).
//! - **Errors.** Ops without a `Result` (allocation, upload, launches) record the first failure (sticky, like CUDA's
//!   own errors) and skip every later launch; [`Backend::status`] and every op that returns a `Result` (the loss
//!   head, the all-reduce) report it. `download` fills NaN and `sum_squares` returns NaN after a failure, so
//!   `clip_and_update` skips the update. View lengths are checked before each launch (a mismatch is a recorded
//!   shape error, never an out-of-bounds kernel). Without a driver, [`Cuda::new`] returns
//!   [`KernelError::NoCudaDriver`] ("no CUDA driver found; use --device cpu"): no op can be reached.
//!
//! Not done (see `docs/engine.md`): one read-back per optimizer step (a micro-batch reads back its statistics and
//! kept list), backward epilogues, a flash-attention kernel. Collectives of a multi-rank job use NCCL on the device buffers (`nccl.rs`) when the
//! library loads, else the host.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use eslm_collective::Collective;
use eslm_kernels::cuda::cudarc;
use eslm_kernels::cuda::engine_block_sizes::{
    ESLM_ADAMW_THREADS, ESLM_ATT_THREADS, ESLM_COLSUM_ROWS, ESLM_ENC_THREADS, ESLM_EW_THREADS,
    ESLM_KD_THREADS, ESLM_LN_THREADS, ESLM_NORM_BLOCKS, ESLM_NORM_THREADS,
};
use eslm_kernels::cuda::{
    alloc_len, CudaKernels, DeviceLogits, DeviceSelection, DeviceSparseCe, DeviceTokenStats,
    GradScale, SparseCeArgs, ENGINE_FATBINS,
};
use eslm_kernels::kd::KdParams;
use eslm_kernels::select::{SelectRule, Selection};
use eslm_kernels::token_stats::{TokenStats, DEFAULT_IGNORE_INDEX};
use eslm_kernels::KernelError;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    result as drv, CudaFunction, CudaModule, CudaSlice, CudaStream, PushKernelArg,
};

use super::{
    AdamWSlices, Affine, Backend, CollectiveOp, Embeddings, HeadDims, KeptTargets, LinearDims,
    LnSaved, LnStats, Logits, MatmulPrecision, OwnStat, RowGrad, RowScores,
};
use crate::error::{Gpt2Error, Result};
use crate::ops::attention::AttnDims;
use crate::ops::RowSet;
use crate::optim::AdamWStep;

/// Queues the engine kernel `$func` (a field of [`Functions`]) with `args` in the kernel's parameter order on
/// the backend's stream; records a failed launch and evaluates to whether it was queued. Expands to an unsafe
/// launch: the caller's `unsafe` block states why the arguments match the kernel and the buffers are large enough.
macro_rules! launch {
    // A kernel with a bf16-activation twin (a [`functions::Twin`]): the one of activation type `$dtype`.
    ($cuda:expr, $func:ident [$dtype:expr], $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let cuda: &Cuda = $cuda;
        let mut builder = cuda.stream().launch_builder(cuda.f.$func.get($dtype));
        $(builder.arg($arg);)+
        cuda.check(builder.launch($cfg))
    }};
    ($cuda:expr, $func:ident, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let cuda: &Cuda = $cuda;
        let mut builder = cuda.stream().launch_builder(&cuda.f.$func);
        $(builder.arg($arg);)+
        cuda.check(builder.launch($cfg))
    }};
}

/// Calls the generic `$f::<T>(args)` with `T` the host type of the element type `$dtype` (`f32` or
/// `half::bf16`): eslm-kernels' launchers are generic over the logits' element type.
macro_rules! with_elem {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            Dtype::F32 => $f::<f32>($($arg),*),
            Dtype::Bf16 => $f::<half::bf16>($($arg),*),
        }
    };
}

mod attention;
mod encoder;
mod epilogue;
mod functions;
mod gelu;
mod gemm;
mod launch;
mod layernorm;
mod linear;
mod loss_head;
mod memory;
mod nccl;
mod optim;
mod residual;
mod rows;
mod shadow;

use functions::Functions;
use launch::*;
use memory::*;
pub use memory::{CudaBuf, DevView, DevViewMut, DeviceInts, Dtype};

/// Most blocks a grid-stride kernel is launched with.
const MAX_GRID: usize = 1 << 16;

/// The CUDA backend: one GPU, one stream, f32 (or bf16 activation) buffers, cuBLAS / cuBLASLt products and the
/// `kernels/` families. See the module docs (**never run on a GPU yet**).
///
/// ```no_run
/// use eslm_gpt2::{Cuda, Gpt2, GptConfig};
/// let gpu = Cuda::new(0)?; // "no CUDA driver found; use --device cpu" without a driver
/// let model = Gpt2::new_on(gpu, GptConfig::tiny(), 4, 64, 1)?;
/// # Ok::<(), eslm_gpt2::Gpt2Error>(())
/// ```
pub struct Cuda {
    /// The NCCL communicator of a multi-rank job ([`Backend::connect`]); `None`: collectives through the host.
    /// First, so that it is destroyed before the stream and the context it uses.
    nccl: Option<nccl::Nccl>,
    /// cuBLASLt for the forward linear layers with fused epilogues (`epilogue.rs`).
    lt: epilogue::LtState,
    kernels: CudaKernels,
    blas: CudaBlas,
    f: Functions,
    _modules: Vec<Arc<CudaModule>>,
    /// The first failure of an op without a `Result` (sticky).
    error: Mutex<Option<Gpt2Error>>,
    /// `[ESLM_NORM_BLOCKS + 1]` f64: the partial sums of squares, then the total. Used under `norm_lock`.
    norm: CudaSlice<f64>,
    norm_lock: Mutex<()>,
    /// Uploaded row lists, bucket tables, merge maps, kept rows (u32).
    idx: Grow<u32>,
    /// Gathered rows (`x_R`, `h_R`) and the dense `dY` of the attention backward.
    gather: Grow<f32>,
    /// Column-sum partials (bias and layer-norm parameter gradients); importance weights.
    partial: Grow<f32>,
    /// `dP` / `dS` `[B, H, T, T]` of the attention backward.
    datt: Grow<f32>,
    /// Per-row loss-head scratch: an uploaded `lse` (only when the device statistics are not this forward's),
    /// KD's per-row losses.
    lse: Grow<f32>,
    /// The loss head's device state: the statistics of the last `token_stats` call (`stats_fresh` after it
    /// succeeded), the last selection over them (`sel_fresh` after it succeeded: its kept rows are the host
    /// copy the loss head passes back with `own_selection`), the sparse CE's workspace.
    stats: Option<DeviceTokenStats>,
    stats_fresh: bool,
    /// The host copy of the last statistics' per-row loss (the sparse CE's mean loss is taken from it).
    stats_loss: Vec<f32>,
    sel: Option<DeviceSelection>,
    sel_fresh: bool,
    ce: Option<DeviceSparseCe>,
    /// A sparse CE ran whose device status word has not been read yet ([`Backend::status`] reads it).
    ce_unchecked: std::sync::atomic::AtomicBool,
    /// The precision of the matrix products ([`Backend::set_matmul_precision`]).
    precision: MatmulPrecision,
    /// The element type of the buffers [`Backend::alloc_act`] makes ([`Cuda::set_activation_dtype`]).
    act_dtype: Dtype,
    /// The model's parameter buffer and its bf16 copy for bf16 products (`shadow.rs`), stale after any write into
    /// the parameters.
    shadow: Mutex<Option<shadow::Shadow>>,
    shadow_stale: std::sync::atomic::AtomicBool,
    /// bf16 copies of the two operands of the current product ([`MatmulPrecision::Bf16`]); a lock because the
    /// GEMM helper takes `&self` (all use is on the one stream, so reuse is ordered).
    bf16_operands: Mutex<(Grow<u16>, Grow<u16>)>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.kernels.context().ordinal())
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Cuda {
    /// Opens GPU `ordinal`: its primary context, one stream, cuBLAS on that stream, eslm-kernels' loss-head
    /// kernels and the engine's kernel families.
    ///
    /// # Errors
    /// [`KernelError::NoCudaDriver`] without a driver ("no CUDA driver found; use --device cpu"),
    /// [`KernelError::Cuda`] when the GPU, cuBLAS or a kernel module is missing.
    pub fn new(ordinal: usize) -> Result<Self> {
        let kernels = CudaKernels::new(ordinal)?;
        let stream = kernels.stream().clone();
        // SAFETY: only tries to dlopen cuBLAS; CudaBlas::new would panic without it.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(KernelError::Cuda(
                "cuBLAS (libcublas) not found; install the CUDA runtime libraries or use --device cpu".into(),
            )
            .into());
        }
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| KernelError::Cuda(format!("cuBLAS: {e:?}")))?;
        let ctx = kernels.context().clone();
        let mut modules = Vec::with_capacity(ENGINE_FATBINS.len());
        for (family, image) in ENGINE_FATBINS {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(|e| KernelError::Cuda(format!("loading kernels/{family}.cu: {e}")))?;
            modules.push((family, m));
        }
        let f = Functions::load(&modules)?;
        let norm = stream
            .alloc_zeros::<f64>(ESLM_NORM_BLOCKS as usize + 1)
            .map_err(KernelError::from)?;
        Ok(Self {
            kernels,
            blas,
            f,
            _modules: modules.into_iter().map(|(_, m)| m).collect(),
            error: Mutex::new(None),
            norm,
            norm_lock: Mutex::new(()),
            idx: Grow::new(),
            gather: Grow::new(),
            partial: Grow::new(),
            datt: Grow::new(),
            lse: Grow::new(),
            stats: None,
            stats_fresh: false,
            stats_loss: Vec::new(),
            sel: None,
            sel_fresh: false,
            ce: None,
            ce_unchecked: std::sync::atomic::AtomicBool::new(false),
            nccl: None,
            lt: if std::env::var_os("ESLM_NO_CUBLASLT").is_some_and(|v| v == "1") {
                epilogue::LtState::Off
            } else {
                epilogue::LtState::Untried
            },
            precision: MatmulPrecision::F32,
            act_dtype: Dtype::F32,
            shadow: Mutex::new(None),
            shadow_stale: std::sync::atomic::AtomicBool::new(true),
            bf16_operands: Mutex::new((Grow::new(), Grow::new())),
        })
    }

    /// The eslm-kernels handle (context, stream, loss-head kernels) this backend runs on.
    pub fn kernels(&self) -> &CudaKernels {
        &self.kernels
    }

    /// Storage of the activations, their gradients and the logits ([`Backend::alloc_act`]): f32 (the default),
    /// or bf16 — llm.c's mixed-precision recipe: bf16 activations and products of bf16 operands with f32
    /// accumulation, f32 master weights, gradients and AdamW state. Set it before a model allocates its buffers
    /// on this backend (buffers made earlier keep their type). Bf16 also sets the products to
    /// [`MatmulPrecision::Bf16`].
    ///
    /// # Errors
    /// As [`Backend::set_matmul_precision`].
    pub fn set_activation_dtype(&mut self, dtype: Dtype) -> Result<()> {
        if dtype == Dtype::Bf16 {
            self.set_matmul_precision(MatmulPrecision::Bf16)?;
        }
        self.act_dtype = dtype;
        Ok(())
    }

    /// The activation storage ([`Cuda::set_activation_dtype`]).
    pub fn activation_dtype(&self) -> Dtype {
        self.act_dtype
    }

    /// The element type an op runs on: every `acts` view (activations, their gradients, logits) has one type and
    /// every `f32s` view (parameters, their gradients, statistics) is f32. Records a type error otherwise
    /// (`None`).
    fn op_dtype(
        &self,
        acts: &[(&'static str, Dtype)],
        f32s: &[(&'static str, Dtype)],
    ) -> Option<Dtype> {
        let first = acts.first().map_or(Dtype::F32, |a| a.1);
        let bad = |what: &'static str, want: Dtype, got: Dtype| Gpt2Error::Shape {
            what,
            expected: format!("{want:?} elements"),
            got: format!("{got:?} elements"),
        };
        if let Some(&(what, got)) = acts.iter().find(|a| a.1 != first) {
            self.fail(bad(what, first, got));
            return None;
        }
        if let Some(&(what, got)) = f32s.iter().find(|a| a.1 != Dtype::F32) {
            self.fail(bad(what, Dtype::F32, got));
            return None;
        }
        Some(first)
    }

    /// Opens an NCCL communicator over the ranks of `collective`, even for one rank ([`Backend::connect`] opens
    /// one for several ranks only; `benches/train_step_cuda.rs` times the one-rank path on a single GPU).
    ///
    /// # Errors
    /// NCCL missing (the message says how to install it) or failing.
    pub fn connect_nccl(&mut self, collective: &dyn Collective) -> Result<()> {
        self.kernels
            .context()
            .bind_to_thread()
            .map_err(KernelError::from)?;
        self.nccl = Some(nccl::Nccl::connect(collective)?);
        Ok(())
    }

    /// `(free, total)` bytes of device memory (`cuMemGetInfo`), for the benchmarks' memory figures.
    ///
    /// # Errors
    /// The driver's error.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.kernels
            .context()
            .bind_to_thread()
            .map_err(KernelError::from)?;
        Ok(drv::mem_get_info().map_err(KernelError::from)?)
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.kernels.stream()
    }

    fn lock_error(&self) -> MutexGuard<'_, Option<Gpt2Error>> {
        self.error.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `e` unless an earlier error is recorded.
    fn fail(&self, e: impl Into<Gpt2Error>) {
        let mut slot = self.lock_error();
        if slot.is_none() {
            *slot = Some(e.into());
        }
    }

    /// Whether no error is recorded (launches go ahead).
    fn healthy(&self) -> bool {
        self.lock_error().is_none()
    }

    /// The recorded error, if any (without waiting for the stream).
    fn recorded(&self) -> Result<()> {
        match &*self.lock_error() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Makes this backend's context current on the calling thread (the raw driver copies and cuBLAS use the
    /// current context; only cudarc's safe calls bind it themselves). Records a failure.
    fn bind(&self) -> bool {
        self.check(self.kernels.context().bind_to_thread())
    }

    /// Records a failed call's error; returns whether it succeeded.
    fn check<T, E: Into<KernelError>>(&self, r: std::result::Result<T, E>) -> bool {
        match r {
            Ok(_) => true,
            Err(e) => {
                self.fail(Gpt2Error::Kernel(e.into()));
                false
            }
        }
    }

    /// Checks that every `(what, view length, needed, pointer)` has memory and room; records a shape error for
    /// the first that does not. Returns whether the op may launch (also false after an earlier error).
    fn ready(&self, views: &[(&'static str, usize, usize, u64)]) -> bool {
        if !self.healthy() || !self.bind() {
            return false;
        }
        for &(what, len, need, ptr) in views {
            if len < need || (need > 0 && ptr == 0) {
                self.fail(Gpt2Error::Shape {
                    what,
                    expected: format!("a device buffer of at least {need} elements"),
                    got: if ptr == 0 {
                        format!(
                            "{len} elements without device memory (failed allocation or bad range)"
                        )
                    } else {
                        format!("{len} elements")
                    },
                });
                return false;
            }
        }
        true
    }

    /// Uploads `data` into the index scratch; its device pointer.
    fn upload_idx(&mut self, data: &[u32]) -> Option<u64> {
        if !self.bind() {
            return None;
        }
        let stream = self.stream().clone();
        let slot = match self.idx.ensure(&stream, data.len()) {
            Ok(s) => s,
            Err(e) => {
                self.fail(e);
                return None;
            }
        };
        let ptr = raw_ptr(slot);
        if !data.is_empty() {
            // SAFETY: the scratch holds at least data.len() u32; the copy is ordered on the stream after every
            // earlier use of the scratch, and staged before this call returns (pageable host memory).
            let r = unsafe { drv::memcpy_htod_async(ptr, data, stream.cu_stream()) };
            if !self.check(r) {
                return None;
            }
        }
        Some(ptr)
    }

    /// Uploads a row set's list (`0`, the kernels' "every row", for `All`).
    fn upload_rows(&mut self, rows: &RowSet) -> Option<u64> {
        match rows {
            RowSet::All => Some(0),
            RowSet::Rows(r) => self.upload_idx(r),
        }
    }

    /// A scratch pointer for `len` elements of `dtype` from `which` (see [`Cuda::scratch`]).
    fn scratch_of(&mut self, which: u8, len: usize, dtype: Dtype) -> Option<u64> {
        self.scratch(which, (len * dtype.size()).div_ceil(4))
    }

    /// A scratch pointer of at least `len` floats from `which` (0 gather, 1 partial, 2 datt, 3 lse).
    fn scratch(&mut self, which: u8, len: usize) -> Option<u64> {
        let stream = self.stream().clone();
        let grow = match which {
            0 => &mut self.gather,
            1 => &mut self.partial,
            2 => &mut self.datt,
            _ => &mut self.lse,
        };
        match grow.ensure(&stream, len) {
            Ok(s) => Some(raw_ptr(s)),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;
    type Tokens = DeviceInts<u32>;
    type Targets = DeviceInts<i32>;

    fn alloc(&mut self, len: usize) -> CudaBuf {
        self.alloc_typed(len, Dtype::F32)
    }
    fn alloc_act(&mut self, len: usize) -> CudaBuf {
        self.alloc_typed(len, self.act_dtype)
    }
    fn alloc_tokens(&mut self, len: usize) -> DeviceInts<u32> {
        let dev = self.stream().alloc_zeros::<u32>(alloc_len(len));
        let dev = dev.map_err(|e| self.fail(KernelError::from(e))).ok();
        DeviceInts {
            dev,
            capacity: len,
            host: Vec::with_capacity(len),
        }
    }
    fn alloc_targets(&mut self, len: usize) -> DeviceInts<i32> {
        let dev = self.stream().alloc_zeros::<i32>(alloc_len(len));
        let dev = dev.map_err(|e| self.fail(KernelError::from(e))).ok();
        DeviceInts {
            dev,
            capacity: len,
            host: Vec::with_capacity(len),
        }
    }
    fn upload(&mut self, dst: DevViewMut<'_>, src: &[f32]) {
        if src.is_empty() || !self.ready(&[("upload", dst.len, src.len(), dst.ptr)]) {
            return;
        }
        self.touched(dst.ptr, src.len(), dst.dtype);
        let stream = self.stream().cu_stream();
        let r = match dst.dtype {
            // SAFETY: dst holds at least src.len() floats (checked); pageable source: staged before return.
            Dtype::F32 => unsafe { drv::memcpy_htod_async(dst.ptr, src, stream) },
            Dtype::Bf16 => {
                let bits: Vec<u16> = src
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                // SAFETY: dst holds at least src.len() bf16 (checked); staged before return.
                unsafe { drv::memcpy_htod_async(dst.ptr, &bits[..], stream) }
            }
        };
        self.check(r);
    }
    fn download(&self, src: DevView<'_>, dst: &mut [f32]) {
        let stream = self.stream().cu_stream();
        let ok = dst.is_empty()
            || (self.ready(&[("download", src.len, dst.len(), src.ptr)])
                && match src.dtype {
                    Dtype::F32 => {
                        // SAFETY: src holds at least dst.len() floats (checked); the stream is synchronised below
                        // before dst is read.
                        let r = unsafe { drv::memcpy_dtoh_async(dst, src.ptr, stream) };
                        self.check(r) && self.check(self.stream().synchronize())
                    }
                    Dtype::Bf16 => {
                        let mut bits = vec![0u16; dst.len()];
                        // SAFETY: src holds at least dst.len() bf16 (checked); synchronised before bits is read.
                        let r = unsafe { drv::memcpy_dtoh_async(&mut bits[..], src.ptr, stream) };
                        let done = self.check(r) && self.check(self.stream().synchronize());
                        for (d, b) in dst.iter_mut().zip(&bits) {
                            *d = half::bf16::from_bits(*b).to_f32();
                        }
                        done
                    }
                });
        if !ok {
            dst.iter_mut().for_each(|x| *x = f32::NAN);
        }
    }
    fn upload_tokens(&mut self, dst: &mut DeviceInts<u32>, src: &[u32]) {
        dst.host.clear();
        dst.host.extend_from_slice(src);
        let ptr = dst.ptr();
        if src.is_empty() || !self.ready(&[("tokens", dst.capacity, src.len(), ptr)]) {
            return;
        }
        // SAFETY: the token buffer holds `capacity` ≥ src.len() ids (checked).
        let r = unsafe { drv::memcpy_htod_async(ptr, src, self.stream().cu_stream()) };
        self.check(r);
    }
    fn upload_targets(&mut self, dst: &mut DeviceInts<i32>, src: &[i32]) {
        dst.host.clear();
        dst.host.extend_from_slice(src);
        let ptr = dst.ptr();
        if src.is_empty() || !self.ready(&[("targets", dst.capacity, src.len(), ptr)]) {
            return;
        }
        // SAFETY: the target buffer holds `capacity` ≥ src.len() values (checked).
        let r = unsafe { drv::memcpy_htod_async(ptr, src, self.stream().cu_stream()) };
        self.check(r);
    }
    fn len(buf: &CudaBuf) -> usize {
        buf.len
    }
    fn view(buf: &CudaBuf) -> DevView<'_> {
        DevView {
            ptr: buf.ptr,
            len: buf.len,
            dtype: buf.dtype,
            _buf: PhantomData,
        }
    }
    fn view_mut(buf: &mut CudaBuf) -> DevViewMut<'_> {
        DevViewMut {
            ptr: buf.ptr,
            len: buf.len,
            dtype: buf.dtype,
            _buf: PhantomData,
        }
    }
    fn slice<'a>(v: DevView<'a>, range: Range<usize>) -> DevView<'a>
    where
        Self: 'a,
    {
        let (ptr, len) = sub(v.ptr, v.len, range, v.dtype);
        DevView {
            ptr,
            len,
            dtype: v.dtype,
            _buf: PhantomData,
        }
    }
    fn slice_mut<'a>(v: DevViewMut<'a>, range: Range<usize>) -> DevViewMut<'a>
    where
        Self: 'a,
    {
        let (ptr, len) = sub(v.ptr, v.len, range, v.dtype);
        DevViewMut {
            ptr,
            len,
            dtype: v.dtype,
            _buf: PhantomData,
        }
    }
    fn split<'a>(v: DevView<'a>, at: usize) -> (DevView<'a>, DevView<'a>)
    where
        Self: 'a,
    {
        let end = v.len.max(at);
        (Self::slice(v, 0..at), Self::slice(v, at..end))
    }
    fn split_mut<'a>(v: DevViewMut<'a>, at: usize) -> (DevViewMut<'a>, DevViewMut<'a>)
    where
        Self: 'a,
    {
        let end = v.len.max(at);
        let dtype = v.dtype;
        let (a, b) = (
            sub(v.ptr, v.len, 0..at, dtype),
            sub(v.ptr, v.len, at..end, dtype),
        );
        (
            DevViewMut {
                ptr: a.0,
                len: a.1,
                dtype,
                _buf: PhantomData,
            },
            DevViewMut {
                ptr: b.0,
                len: b.1,
                dtype,
                _buf: PhantomData,
            },
        )
    }
    fn reborrow<'b>(v: &'b mut DevViewMut<'_>) -> DevViewMut<'b> {
        DevViewMut {
            ptr: v.ptr,
            len: v.len,
            dtype: v.dtype,
            _buf: PhantomData,
        }
    }
    fn freeze<'b>(v: &'b DevViewMut<'_>) -> DevView<'b> {
        DevView {
            ptr: v.ptr,
            len: v.len,
            dtype: v.dtype,
            _buf: PhantomData,
        }
    }
    fn fill_zero(&mut self, v: DevViewMut<'_>) {
        if v.len == 0 || !self.ready(&[("fill_zero", v.len, v.len, v.ptr)]) {
            return;
        }
        self.touched(v.ptr, v.len, v.dtype);
        // SAFETY: v is a live range of v.len elements of v.dtype.
        let bytes = v.len * v.dtype.size();
        let r = unsafe { drv::memset_d8_async(v.ptr, 0, bytes, self.stream().cu_stream()) };
        self.check(r);
    }

    fn encoder_forward(
        &mut self,
        out: DevViewMut<'_>,
        tokens: &DeviceInts<u32>,
        emb: Embeddings<DevView<'_>>,
        n: usize,
        t: usize,
        c: usize,
    ) {
        encoder::forward(self, out, tokens, emb, n, t, c)
    }
    fn encoder_backward(
        &mut self,
        demb: Embeddings<DevViewMut<'_>>,
        dout: RowGrad<'_, DevView<'_>>,
        tokens: &DeviceInts<u32>,
        t: usize,
        c: usize,
    ) {
        encoder::backward(self, demb, dout, tokens, t, c)
    }
    fn layernorm_forward(
        &mut self,
        y: DevViewMut<'_>,
        stats: LnStats<DevViewMut<'_>>,
        x: DevView<'_>,
        p: Affine<DevView<'_>>,
        n: usize,
        c: usize,
    ) {
        layernorm::forward(self, y, stats, x, p, n, c)
    }
    fn layernorm_backward(
        &mut self,
        dx: DevViewMut<'_>,
        dp: Affine<DevViewMut<'_>>,
        dy: RowGrad<'_, DevView<'_>>,
        saved: LnSaved<DevView<'_>>,
        c: usize,
    ) {
        layernorm::backward(self, dx, dp, dy, saved, c)
    }
    fn linear_forward(
        &mut self,
        y: DevViewMut<'_>,
        x: DevView<'_>,
        p: Affine<DevView<'_>>,
        n: usize,
        d: LinearDims,
    ) -> f64 {
        linear::forward(self, y, x, p, n, d)
    }
    fn linear_gelu_forward(
        &mut self,
        pre: DevViewMut<'_>,
        post: DevViewMut<'_>,
        x: DevView<'_>,
        p: Affine<DevView<'_>>,
        n: usize,
        d: LinearDims,
    ) -> f64 {
        linear::forward_gelu(self, pre, post, x, p, n, d)
    }
    fn linear_backward(
        &mut self,
        dx: Option<DevViewMut<'_>>,
        dp: Affine<DevViewMut<'_>>,
        dy: RowGrad<'_, DevView<'_>>,
        x: DevView<'_>,
        w: DevView<'_>,
        d: LinearDims,
    ) -> f64 {
        linear::backward(self, dx, dp, dy, x, w, d)
    }
    fn lm_head_forward(
        &mut self,
        z: DevViewMut<'_>,
        h: DevView<'_>,
        wte: DevView<'_>,
        n: usize,
        d: HeadDims,
    ) -> f64 {
        linear::lm_head_forward(self, z, h, wte, n, d)
    }
    fn lm_head_backward(
        &mut self,
        dh: DevViewMut<'_>,
        dwte: DevViewMut<'_>,
        dz: RowGrad<'_, DevView<'_>>,
        h: DevView<'_>,
        wte: DevView<'_>,
        d: HeadDims,
    ) -> f64 {
        linear::lm_head_backward(self, dh, dwte, dz, h, wte, d)
    }
    fn gelu_forward(&mut self, y: DevViewMut<'_>, x: DevView<'_>) {
        gelu::forward(self, y, x)
    }
    fn gelu_backward(
        &mut self,
        dx: DevViewMut<'_>,
        dy: RowGrad<'_, DevView<'_>>,
        x: DevView<'_>,
        width: usize,
    ) {
        gelu::backward(self, dx, dy, x, width)
    }
    fn attention_forward(
        &mut self,
        y: DevViewMut<'_>,
        att: DevViewMut<'_>,
        qkv: DevView<'_>,
        d: AttnDims,
    ) -> f64 {
        attention::forward(self, y, att, qkv, d)
    }
    fn attention_backward(
        &mut self,
        dqkv: DevViewMut<'_>,
        dy: RowGrad<'_, DevView<'_>>,
        qkv: DevView<'_>,
        att: DevView<'_>,
        d: AttnDims,
    ) -> f64 {
        attention::backward(self, dqkv, dy, qkv, att, d)
    }
    fn residual_forward(&mut self, out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>) {
        residual::forward(self, out, a, b)
    }
    fn residual_merge(
        &mut self,
        out: DevViewMut<'_>,
        a: RowGrad<'_, DevView<'_>>,
        b: RowGrad<'_, DevView<'_>>,
        width: usize,
    ) -> RowSet {
        residual::merge(self, out, a, b, width)
    }
    fn compact_blocks(&mut self, x: DevViewMut<'_>, block: usize, seqs: &[usize]) {
        rows::compact_blocks(self, x, block, seqs)
    }
    fn gather_rows(&mut self, dst: DevViewMut<'_>, src: DevView<'_>, rows: &RowSet, width: usize) {
        rows::gather_rows(self, dst, src, rows, width)
    }
    fn scatter_add_rows(&mut self, dst: DevViewMut<'_>, g: RowGrad<'_, DevView<'_>>, width: usize) {
        rows::scatter_add_rows(self, dst, g, width)
    }

    fn token_stats(
        &mut self,
        logits: Logits<DevView<'_>>,
        targets: &DeviceInts<i32>,
        out: &mut TokenStats,
    ) -> Result<()> {
        loss_head::token_stats(self, logits, targets, out)
    }
    fn select(
        &mut self,
        scores: RowScores<'_>,
        valid: &[bool],
        rule: SelectRule,
        out: &mut Selection,
    ) -> Result<()> {
        loss_head::select(self, scores, valid, rule, out)
    }
    fn sparse_ce(
        &mut self,
        logits: Logits<DevView<'_>>,
        rows: KeptTargets<'_, DeviceInts<i32>>,
        lse: &[f32],
        scale: f32,
        dlogits: DevViewMut<'_>,
    ) -> Result<f32> {
        loss_head::sparse_ce(self, logits, rows, lse, scale, dlogits)
    }
    fn kd_grad(
        &mut self,
        student: Logits<DevView<'_>>,
        teacher: Logits<DevView<'_>>,
        rows: KeptTargets<'_, DeviceInts<i32>>,
        kd: KdParams,
        scale: f32,
        dlogits: DevViewMut<'_>,
    ) -> Result<f32> {
        loss_head::kd_grad(self, student, teacher, rows, kd, scale, dlogits)
    }

    fn adamw(
        &mut self,
        t: AdamWSlices<DevViewMut<'_>, DevView<'_>>,
        decays: bool,
        step: &AdamWStep,
    ) {
        optim::adamw(self, t, decays, step)
    }
    fn sum_squares(&self, x: DevView<'_>) -> f64 {
        optim::sum_squares(self, x)
    }
    fn scale_rows(&mut self, x: DevViewMut<'_>, width: usize, weights: &[f32]) {
        loss_head::scale_rows(self, x, width, weights)
    }
    fn register_params(&mut self, params: DevView<'_>) {
        if params.dtype == Dtype::F32 && params.ptr != 0 {
            *self.shadow.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(shadow::Shadow::new(params.ptr, params.len));
            self.shadow_stale
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
        if self.act_dtype == Dtype::Bf16 && precision != MatmulPrecision::Bf16 {
            return Err(Gpt2Error::Unsupported(format!(
                "{precision:?} products on bf16 activations: bf16 storage multiplies bf16 operands \
                 (--matmul bf16)"
            )));
        }
        let mode = match precision {
            // bf16 products go through cublasGemmStridedBatchedEx, whose compute type sets their precision.
            MatmulPrecision::F32 | MatmulPrecision::Bf16 => {
                blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
            }
            MatmulPrecision::Tf32 => blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        // SAFETY: the handle is this backend's, used on this thread only (`&mut self`).
        let status = unsafe { blas_sys::cublasSetMathMode(*self.blas.handle(), mode) };
        if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(
                KernelError::Cuda(format!("cublasSetMathMode({mode:?}): {status:?}")).into(),
            );
        }
        self.precision = precision;
        Ok(())
    }
    fn connect(&mut self, collective: &dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        // Every rank must take the same path (a rank waiting in NCCL's set-up for one that went through the host
        // would wait forever): NCCL only where it loads on every rank.
        let have = collective
            .sum_f64(if nccl::Nccl::available() { 1.0 } else { 0.0 })
            .map_err(|e| Gpt2Error::Collective(e.to_string()))?;
        if have < collective.world_size() as f64 {
            if collective.is_root() {
                eprintln!(
                    "warning: NCCL (libnccl.so.2) not found on {} of {} ranks: gradients are summed through the \
                     host (slower); install NCCL for device-side collectives",
                    collective.world_size() as f64 - have,
                    collective.world_size()
                );
            }
            return Ok(());
        }
        self.connect_nccl(collective)
    }

    fn collective(
        &mut self,
        op: CollectiveOp,
        x: DevViewMut<'_>,
        collective: &dyn Collective,
    ) -> Result<()> {
        self.recorded()?;
        if let Some(comm) = &self.nccl {
            if comm.world_size() != collective.world_size() {
                return Err(Gpt2Error::Collective(format!(
                    "NCCL communicator of {} ranks used for a collective over {}",
                    comm.world_size(),
                    collective.world_size()
                )));
            }
            if !self.ready(&[("collective buffer", x.len, x.len, x.ptr)])
                || self
                    .op_dtype(&[], &[("collective buffer", x.dtype)])
                    .is_none()
            {
                return self.recorded();
            }
            self.touched(x.ptr, x.len, x.dtype);
            return comm.run(op, x.ptr, x.len, self.stream());
        }
        // Without NCCL: through the host.
        let mut host = vec![0.0f32; x.len];
        let view = DevView {
            ptr: x.ptr,
            len: x.len,
            dtype: x.dtype,
            _buf: PhantomData,
        };
        self.download(view, &mut host);
        self.recorded()?;
        op.run_on_host(collective, &mut host)?;
        self.upload(x, &host);
        self.recorded()
    }

    fn status(&self) -> Result<()> {
        self.recorded()?;
        if let Err(e) = self.stream().synchronize() {
            self.fail(KernelError::from(e));
        }
        if self
            .ce_unchecked
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            if let Some(Err(e)) = self.ce.as_ref().map(|w| w.check_status(&self.kernels)) {
                self.fail(e);
            }
        }
        self.recorded()
    }
}

impl Cuda {
    /// A zeroed buffer of `len` elements of `dtype`; records a failed allocation (the buffer then has no memory).
    fn alloc_typed(&mut self, len: usize, dtype: Dtype) -> CudaBuf {
        match self
            .stream()
            .alloc_zeros::<u8>(alloc_len(len) * dtype.size())
        {
            Ok(s) => CudaBuf {
                ptr: raw_ptr(&s),
                slice: Some(s),
                len,
                dtype,
            },
            Err(e) => {
                self.fail(KernelError::from(e));
                CudaBuf {
                    slice: None,
                    ptr: 0,
                    len,
                    dtype,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_new_is_the_no_driver_error() {
        if eslm_kernels::cuda::cuda_available() {
            eprintln!("a CUDA driver is present; the no-driver path is not exercised here");
            return;
        }
        match Cuda::new(0) {
            Err(Gpt2Error::Kernel(KernelError::NoCudaDriver)) => {}
            Err(Gpt2Error::Kernel(KernelError::Cuda(msg))) => {
                assert!(msg.contains("--device cpu"), "{msg}")
            }
            other => panic!("expected the no-driver error, got {other:?}"),
        }
        let message = KernelError::NoCudaDriver.to_string();
        assert!(
            message.contains("no CUDA driver found; use --device cpu"),
            "{message}"
        );
    }
}
