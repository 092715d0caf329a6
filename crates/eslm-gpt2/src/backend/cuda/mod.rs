//! The CUDA backend (feature `cuda`): [`Cuda`] implements [`Backend`] on one GPU stream.
//!
//! **Status: written and compiled, never run on a GPU.** The host-side logic (row maps, buckets, GEMM shapes) is
//! unit-tested below; `tests/cuda_backend.rs` compares every op and a whole training step with the CPU backend and
//! skips with a message where no CUDA driver loads.
//!
//! - **Buffers** are f32 (`CudaSlice<f32>` owned by a [`CudaBuf`]); views are `(device pointer, length)` pairs
//!   ([`DevView`], [`DevViewMut`]) cut without the stream, so the model's flat parameter buffer is split into
//!   per-tensor views as on the CPU. Token ids and targets keep a host copy next to the device copy (the encoder
//!   backward groups rows by token on the host; the loss head checks targets there).
//! - **Products** are f32 cuBLAS SGEMMs (`cublasSgemmStridedBatched`; default math mode, or TF32 tensor cores after
//!   [`Backend::set_matmul_precision`]), row-major
//!   through the usual swap (`C = A·B` row-major is `Cᵀ = Bᵀ·Aᵀ` column-major). Attention is llm.c's: `S = Q·Kᵀ`
//!   and `Y = P·V` batched over the heads of each sequence, a fused causal softmax kernel in between; the
//!   probabilities `P [B, H, T, T]` are stored for the backward, like the CPU backend.
//! - **Hand-written kernels** (`kernels/*.cu`, one family per file, each naming its CPU counterpart): encoder,
//!   layernorm, gelu, residual, rows (gather / scatter-add), attention (softmax forward / backward), adamw,
//!   global_norm, scale, linear (bias). The loss head reuses eslm-kernels' token_stats, select and sparse_ce
//!   launchers on the same stream ([`CudaKernels`]).
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
//! Not done (see `docs/engine.md`): the bf16 mixed-precision recipe (bf16 weights and activations, f32 master
//! weights), cuBLASLt epilogues (bias, GELU), a flash-attention kernel. Collectives of a
//! multi-rank job use NCCL on the device buffers ([`nccl`]) when the library loads, else the host.

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
    alloc_len, CudaKernels, DeviceLogits, DeviceSparseCe, DeviceTokenStats, GradScale,
    SparseCeArgs, ENGINE_FATBINS,
};
use eslm_kernels::kd::KdParams;
use eslm_kernels::select::{SelectRule, Selection};
use eslm_kernels::token_stats::{TokenStats, DEFAULT_IGNORE_INDEX};
use eslm_kernels::KernelError;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    result as drv, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::{
    AdamWSlices, Affine, Backend, CollectiveOp, Embeddings, HeadDims, KeptTargets, LinearDims,
    LnSaved, LnStats, Logits, MatmulPrecision, RowGrad,
};
use crate::error::{Gpt2Error, Result};
use crate::ops::attention::AttnDims;
use crate::ops::RowSet;
use crate::optim::AdamWStep;

mod launch;
mod memory;
mod nccl;

use launch::*;
use memory::*;
pub use memory::{CudaBuf, DevView, DevViewMut, DeviceInts};

/// Most blocks a grid-stride kernel is launched with.
const MAX_GRID: usize = 1 << 16;

/// The engine's kernels (`ENGINE_FATBINS`), loaded once.
#[derive(Debug)]
struct Functions {
    encoder_forward: CudaFunction,
    encoder_backward_buckets: CudaFunction,
    layernorm_forward: CudaFunction,
    layernorm_backward_dx: CudaFunction,
    layernorm_backward_params: CudaFunction,
    layernorm_reduce_params: CudaFunction,
    gelu_forward: CudaFunction,
    gelu_backward: CudaFunction,
    residual_forward: CudaFunction,
    residual_merge: CudaFunction,
    gather_rows: CudaFunction,
    scatter_add_rows: CudaFunction,
    attention_softmax_forward: CudaFunction,
    attention_softmax_backward: CudaFunction,
    adamw_update: CudaFunction,
    sum_squares_partial: CudaFunction,
    sum_squares_final: CudaFunction,
    scale_rows: CudaFunction,
    bias_forward: CudaFunction,
    colsum_partial: CudaFunction,
    colsum_reduce_add: CudaFunction,
    kd_grad_rows: CudaFunction,
    f32_to_bf16: CudaFunction,
}

impl Functions {
    fn load(modules: &[(&str, Arc<CudaModule>)]) -> Result<Self> {
        let f = |family: &str, name: &str| -> Result<CudaFunction> {
            let module = modules
                .iter()
                .find(|(f, _)| *f == family)
                .map(|(_, m)| m)
                .ok_or_else(|| KernelError::Cuda(format!("kernel family {family} not embedded")))?;
            Ok(module.load_function(name).map_err(|e| {
                KernelError::Cuda(format!("loading kernel {family}.cu::{name}: {e}"))
            })?)
        };
        Ok(Self {
            encoder_forward: f("encoder", "encoder_forward")?,
            encoder_backward_buckets: f("encoder", "encoder_backward_buckets")?,
            layernorm_forward: f("layernorm", "layernorm_forward")?,
            layernorm_backward_dx: f("layernorm", "layernorm_backward_dx")?,
            layernorm_backward_params: f("layernorm", "layernorm_backward_params")?,
            layernorm_reduce_params: f("layernorm", "layernorm_reduce_params")?,
            gelu_forward: f("gelu", "gelu_forward")?,
            gelu_backward: f("gelu", "gelu_backward")?,
            residual_forward: f("residual", "residual_forward")?,
            residual_merge: f("residual", "residual_merge")?,
            gather_rows: f("rows", "gather_rows")?,
            scatter_add_rows: f("rows", "scatter_add_rows")?,
            attention_softmax_forward: f("attention", "attention_softmax_forward")?,
            attention_softmax_backward: f("attention", "attention_softmax_backward")?,
            adamw_update: f("adamw", "adamw_update")?,
            sum_squares_partial: f("global_norm", "sum_squares_partial")?,
            sum_squares_final: f("global_norm", "sum_squares_final")?,
            scale_rows: f("scale", "scale_rows")?,
            bias_forward: f("linear", "bias_forward")?,
            colsum_partial: f("linear", "colsum_partial")?,
            colsum_reduce_add: f("linear", "colsum_reduce_add")?,
            kd_grad_rows: f("kd", "kd_grad_rows")?,
            f32_to_bf16: f("convert", "f32_to_bf16")?,
        })
    }
}

/// The CUDA backend: one GPU, one stream, f32 buffers, cuBLAS SGEMMs and the `kernels/` families. See the
/// module docs (**never run on a GPU yet**).
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
    /// The loss head: host `lse` uploaded for the sparse CE.
    lse: Grow<f32>,
    stats: Option<DeviceTokenStats>,
    ce: Option<DeviceSparseCe>,
    /// The precision of the matrix products ([`Backend::set_matmul_precision`]).
    precision: MatmulPrecision,
    /// bf16 copies of the two operands of the current product ([`MatmulPrecision::Bf16`]); a lock because the
    /// GEMM helper takes `&self` (all use is on the one stream, so reuse is ordered).
    bf16_operands: Mutex<(Grow<u16>, Grow<u16>)>,
}

/// The cuBLAS operation of a transpose flag.
fn blas_op(transpose: bool) -> blas_sys::cublasOperation_t {
    if transpose {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// The CPU's check of a loss gradient's kept rows (each needs a target in `[0, V)`), on the targets' host copy:
/// the same typed error before anything is launched.
fn check_kept_targets(kept: &[u32], targets: &[i32], vocab: usize) -> Result<()> {
    match kept
        .iter()
        .find(|&&r| !(0..vocab as i64).contains(&(targets[r as usize] as i64)))
    {
        Some(&r) => Err(KernelError::KeptTargetOutOfRange {
            row: r as usize,
            target: targets[r as usize] as i64,
            vocab,
        }
        .into()),
        None => Ok(()),
    }
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
            ce: None,
            nccl: None,
            precision: MatmulPrecision::F32,
            bf16_operands: Mutex::new((Grow::new(), Grow::new())),
        })
    }

    /// The eslm-kernels handle (context, stream, loss-head kernels) this backend runs on.
    pub fn kernels(&self) -> &CudaKernels {
        &self.kernels
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

    /// Queues a row-major GEMM (see [`Gemm`]); records a failure. Skipped when the output is empty.
    fn gemm(&self, g: Gemm) {
        if g.m == 0 || g.n == 0 || g.batch == 0 || !self.healthy() {
            return;
        }
        if self.precision == MatmulPrecision::Bf16 {
            self.gemm_bf16(g);
            return;
        }
        let Some(c) = self.cublas_args(&g) else {
            return;
        };
        let (alpha, beta) = (1.0f32, g.beta);
        // SAFETY: the pointers are live device buffers of this context whose lengths the callers checked for
        // these shapes and strides; alpha and beta are host scalars that outlive the call (cuBLAS reads them
        // before returning in the default host pointer mode).
        let r = unsafe {
            blas::sgemm_strided_batched(
                *self.blas.handle(),
                blas_op(c.ta),
                blas_op(c.tb),
                c.m,
                c.n,
                c.k,
                &alpha,
                c.a as *const f32,
                c.lda,
                c.sa,
                c.b as *const f32,
                c.ldb,
                c.sb,
                &beta,
                g.c as *mut f32,
                c.ldc,
                c.sc,
                c.batch,
            )
        };
        if let Err(e) = r {
            self.fail(KernelError::Cuda(format!("cuBLAS SGEMM: {e:?}")));
        }
    }

    /// The cuBLAS arguments of `g` with this backend's context current on the calling thread (cuBLAS uses the
    /// current context; a kernel launch binds it, but a GEMM may come first); `None` after recording why not.
    fn cublas_args(&self, g: &Gemm) -> Option<ColumnMajor> {
        let Some(c) = column_major(g) else {
            self.fail(KernelError::Cuda(format!(
                "GEMM {}x{}x{} (ldc {}, batch {}) does not fit cuBLAS's 32-bit dimensions",
                g.m, g.n, g.k, g.ldc, g.batch
            )));
            return None;
        };
        self.bind().then_some(c)
    }

    /// [`Cuda::gemm`] with bf16 operands: both are converted (round to nearest even) into scratch over the extent
    /// the product reads, then multiplied on the tensor cores with f32 accumulation into the f32 result
    /// (`cublasGemmStridedBatchedEx`, compute type 32F).
    fn gemm_bf16(&self, g: Gemm) {
        let mut scratch = self.bf16_operands.lock().unwrap_or_else(|p| p.into_inner());
        let (slot_a, slot_b) = &mut *scratch;
        let (ea, eb) = operand_extents(&g);
        let (Some(a16), Some(b16)) = (self.to_bf16(slot_a, g.a, ea), self.to_bf16(slot_b, g.b, eb))
        else {
            return;
        };
        let Some(c) = self.cublas_args(&Gemm {
            a: a16,
            b: b16,
            ..g
        }) else {
            return;
        };
        let (alpha, beta) = (1.0f32, g.beta);
        let bf16 = blas_sys::cudaDataType::CUDA_R_16BF;
        // SAFETY: `c.a` and `c.b` are the bf16 scratch copies of the operands over their extents (same layout, so
        // the same leading dimensions and strides), `g.c` the caller's checked f32 output; alpha and beta are host
        // f32 scalars read before the call returns; compute type 32F matches their type.
        let r = unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                blas_op(c.ta),
                blas_op(c.tb),
                c.m,
                c.n,
                c.k,
                (&alpha as *const f32).cast(),
                c.a as *const std::ffi::c_void,
                bf16,
                c.lda,
                c.sa,
                c.b as *const std::ffi::c_void,
                bf16,
                c.ldb,
                c.sb,
                (&beta as *const f32).cast(),
                g.c as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                c.ldc,
                c.sc,
                c.batch,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = r {
            self.fail(KernelError::Cuda(format!("cuBLAS bf16 GEMM: {e:?}")));
        }
    }

    /// Converts `len` f32 at `src` to bf16 into `slot` (grown as needed); its device pointer.
    fn to_bf16(&self, slot: &mut Grow<u16>, src: u64, len: usize) -> Option<u64> {
        let out = match slot.ensure(self.stream(), len) {
            Ok(s) => raw_ptr(s),
            Err(e) => {
                self.fail(e);
                return None;
            }
        };
        let len64 = len as u64;
        let mut l = self.stream().launch_builder(&self.f.f32_to_bf16);
        l.arg(&out).arg(&src).arg(&len64);
        // SAFETY: matches f32_to_bf16 (convert.cu): `src` holds the `len` floats the product reads (its extent),
        // `out` at least `len` u16.
        let r = unsafe { l.launch(cfg(grid(len, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r).then_some(out)
    }

    /// Compact `[K, width]` column sums of `dy` added into `dst [width]` (the bias gradient), deterministic.
    fn colsum_add(&mut self, dst: u64, dy: u64, k: usize, width: usize) {
        let chunks = k.div_ceil(ESLM_COLSUM_ROWS as usize);
        if k == 0 || width == 0 || chunks > u16::MAX as usize {
            if chunks > u16::MAX as usize {
                self.fail(KernelError::Cuda(format!(
                    "column sum over {k} rows: too many row chunks"
                )));
            }
            return;
        }
        let Some(partial) = self.scratch(1, chunks * width) else {
            return;
        };
        let (k64, w64, c64) = (k as u64, width as u64, chunks as u64);
        let mut b = self.stream().launch_builder(&self.f.colsum_partial);
        b.arg(&partial).arg(&dy).arg(&k64).arg(&w64);
        let launch = LaunchConfig {
            grid_dim: (
                width.div_ceil(ESLM_EW_THREADS as usize) as u32,
                chunks as u32,
                1,
            ),
            block_dim: (ESLM_EW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches colsum_partial (linear.cu); partial holds chunks·width, dy K·width floats.
        let r = unsafe { b.launch(launch) };
        if !self.check(r) {
            return;
        }
        let mut b = self.stream().launch_builder(&self.f.colsum_reduce_add);
        b.arg(&dst).arg(&partial).arg(&c64).arg(&w64);
        // SAFETY: matches colsum_reduce_add; dst holds width floats.
        let r = unsafe { b.launch(cfg(grid(width, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r);
    }

    /// `dst[rows] += g` (the encoder backward's bucketed add) for one table.
    fn bucket_add(&mut self, dw: u64, g: u64, c: usize, table: (Vec<u32>, Vec<u32>, Vec<u32>)) {
        let (perm, keys, starts) = table;
        let nb = keys.len();
        if nb == 0 {
            return;
        }
        let mut all = perm;
        let (o_keys, o_starts) = (all.len(), all.len() + nb);
        all.extend_from_slice(&keys);
        all.extend_from_slice(&starts);
        let Some(base) = self.upload_idx(&all) else {
            return;
        };
        let (keys_p, starts_p) = (base + 4 * o_keys as u64, base + 4 * o_starts as u64);
        let (nb64, c64) = (nb as u64, c as u64);
        let mut b = self
            .stream()
            .launch_builder(&self.f.encoder_backward_buckets);
        b.arg(&dw)
            .arg(&g)
            .arg(&base)
            .arg(&keys_p)
            .arg(&starts_p)
            .arg(&nb64)
            .arg(&c64);
        // SAFETY: matches encoder_backward_buckets (encoder.cu); every key is a row of dw (token < Vp or position
        // < T), every perm entry a row of g (checked by the caller's lengths).
        let r = unsafe { b.launch(cfg(nb.min(MAX_GRID) as u32, ESLM_ENC_THREADS)) };
        self.check(r);
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type View<'a> = DevView<'a>;
    type ViewMut<'a> = DevViewMut<'a>;
    type Tokens = DeviceInts<u32>;
    type Targets = DeviceInts<i32>;

    fn alloc(&mut self, len: usize) -> CudaBuf {
        match self.stream().alloc_zeros::<f32>(alloc_len(len)) {
            Ok(s) => CudaBuf {
                ptr: raw_ptr(&s),
                slice: Some(s),
                len,
            },
            Err(e) => {
                self.fail(KernelError::from(e));
                CudaBuf {
                    slice: None,
                    ptr: 0,
                    len,
                }
            }
        }
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
        // SAFETY: dst holds at least src.len() floats (checked); pageable source: staged before return.
        let r = unsafe { drv::memcpy_htod_async(dst.ptr, src, self.stream().cu_stream()) };
        self.check(r);
    }
    fn download(&self, src: DevView<'_>, dst: &mut [f32]) {
        let ok = dst.is_empty()
            || (self.ready(&[("download", src.len, dst.len(), src.ptr)]) && {
                // SAFETY: src holds at least dst.len() floats (checked); the stream is synchronised below before
                // dst is read.
                let r = unsafe { drv::memcpy_dtoh_async(dst, src.ptr, self.stream().cu_stream()) };
                self.check(r) && self.check(self.stream().synchronize())
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
            _buf: PhantomData,
        }
    }
    fn view_mut(buf: &mut CudaBuf) -> DevViewMut<'_> {
        DevViewMut {
            ptr: buf.ptr,
            len: buf.len,
            _buf: PhantomData,
        }
    }
    fn slice<'a>(v: DevView<'a>, range: Range<usize>) -> DevView<'a>
    where
        Self: 'a,
    {
        let (ptr, len) = sub(v.ptr, v.len, range);
        DevView {
            ptr,
            len,
            _buf: PhantomData,
        }
    }
    fn slice_mut<'a>(v: DevViewMut<'a>, range: Range<usize>) -> DevViewMut<'a>
    where
        Self: 'a,
    {
        let (ptr, len) = sub(v.ptr, v.len, range);
        DevViewMut {
            ptr,
            len,
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
        let (a, b) = (sub(v.ptr, v.len, 0..at), sub(v.ptr, v.len, at..end));
        (
            DevViewMut {
                ptr: a.0,
                len: a.1,
                _buf: PhantomData,
            },
            DevViewMut {
                ptr: b.0,
                len: b.1,
                _buf: PhantomData,
            },
        )
    }
    fn reborrow<'b>(v: &'b mut DevViewMut<'_>) -> DevViewMut<'b> {
        DevViewMut {
            ptr: v.ptr,
            len: v.len,
            _buf: PhantomData,
        }
    }
    fn freeze<'b>(v: &'b DevViewMut<'_>) -> DevView<'b> {
        DevView {
            ptr: v.ptr,
            len: v.len,
            _buf: PhantomData,
        }
    }
    fn fill_zero(&mut self, v: DevViewMut<'_>) {
        if v.len == 0 || !self.ready(&[("fill_zero", v.len, v.len, v.ptr)]) {
            return;
        }
        // SAFETY: v is a live range of v.len floats.
        let r = unsafe { drv::memset_d8_async(v.ptr, 0, v.len * 4, self.stream().cu_stream()) };
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
        let max_tok = tokens
            .host
            .iter()
            .take(n)
            .max()
            .map_or(0, |&x| x as usize + 1);
        let ok = n == 0
            || self.ready(&[
                ("encoder out", out.len, n * c, out.ptr),
                ("tokens", tokens.len(), n, tokens.ptr()),
                ("wte", emb.wte.len, max_tok * c, emb.wte.ptr),
                ("wpe", emb.wpe.len, t.min(n) * c, emb.wpe.ptr),
            ]);
        if n > 0 && t == 0 {
            self.fail(Gpt2Error::Shape {
                what: "encoder sequence length",
                expected: "T ≥ 1".into(),
                got: "T = 0".into(),
            });
        }
        if n == 0 || !ok || t == 0 || c == 0 {
            return;
        }
        let (tok, n64, t64, c64) = (tokens.ptr(), n as u64, t as u64, c as u64);
        let mut b = self.stream().launch_builder(&self.f.encoder_forward);
        b.arg(&out.ptr)
            .arg(&tok)
            .arg(&emb.wte.ptr)
            .arg(&emb.wpe.ptr)
            .arg(&n64)
            .arg(&t64)
            .arg(&c64);
        // SAFETY: matches encoder_forward (encoder.cu); lengths checked above.
        let r = unsafe { b.launch(cfg(grid(n * c, ESLM_ENC_THREADS), ESLM_ENC_THREADS)) };
        self.check(r);
    }
    fn encoder_backward(
        &mut self,
        demb: Embeddings<DevViewMut<'_>>,
        dout: RowGrad<'_, DevView<'_>>,
        tokens: &DeviceInts<u32>,
        t: usize,
        c: usize,
    ) {
        let RowGrad { g, rows, n } = dout;
        let k = rows.count(n);
        if k > 0 && t == 0 {
            self.fail(Gpt2Error::Shape {
                what: "encoder sequence length",
                expected: "T ≥ 1".into(),
                got: "T = 0".into(),
            });
        }
        if k == 0 || t == 0 || c == 0 {
            return;
        }
        let host = &tokens.host;
        let max_tok = host.iter().take(n).max().map_or(0, |&x| x as usize + 1);
        let max_row = match rows {
            RowSet::All => n,
            RowSet::Rows(r) => r.last().map_or(0, |&x| x as usize + 1),
        };
        if !self.ready(&[
            ("encoder dout", g.len, k * c, g.ptr),
            ("tokens", host.len(), max_row, tokens.ptr()),
            ("dwte", demb.wte.len, max_tok * c, demb.wte.ptr),
            ("dwpe", demb.wpe.len, t.min(n) * c, demb.wpe.ptr),
        ]) {
            return;
        }
        let by_token = buckets(rows, n, |i| host[i]);
        let by_pos = buckets(rows, n, |i| (i % t) as u32);
        self.bucket_add(demb.wte.ptr, g.ptr, c, by_token);
        self.bucket_add(demb.wpe.ptr, g.ptr, c, by_pos);
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
        if n == 0
            || !self.ready(&[
                ("layernorm y", y.len, n * c, y.ptr),
                ("layernorm mean", stats.mean.len, n, stats.mean.ptr),
                ("layernorm rstd", stats.rstd.len, n, stats.rstd.ptr),
                ("layernorm x", x.len, n * c, x.ptr),
                ("layernorm w", p.w.len, c, p.w.ptr),
                ("layernorm b", p.b.len, c, p.b.ptr),
            ])
        {
            return;
        }
        let (n64, c64) = (n as u64, c as u64);
        let mut b = self.stream().launch_builder(&self.f.layernorm_forward);
        b.arg(&y.ptr)
            .arg(&stats.mean.ptr)
            .arg(&stats.rstd.ptr)
            .arg(&x.ptr)
            .arg(&p.w.ptr)
            .arg(&p.b.ptr)
            .arg(&n64)
            .arg(&c64);
        // SAFETY: matches layernorm_forward (layernorm.cu); lengths checked above.
        let r = unsafe { b.launch(cfg(warp_grid(n, ESLM_LN_THREADS), ESLM_LN_THREADS)) };
        self.check(r);
    }
    fn layernorm_backward(
        &mut self,
        dx: DevViewMut<'_>,
        dp: Affine<DevViewMut<'_>>,
        dy: RowGrad<'_, DevView<'_>>,
        saved: LnSaved<DevView<'_>>,
        c: usize,
    ) {
        let (rows, n) = (dy.rows, dy.n);
        let k = rows.count(n);
        let chunks = k.div_ceil(ESLM_COLSUM_ROWS as usize);
        if k == 0
            || c == 0
            || !self.ready(&[
                ("layernorm dx", dx.len, k * c, dx.ptr),
                ("layernorm dw", dp.w.len, c, dp.w.ptr),
                ("layernorm db", dp.b.len, c, dp.b.ptr),
                ("layernorm dy", dy.g.len, k * c, dy.g.ptr),
                ("layernorm x", saved.x.len, n * c, saved.x.ptr),
                (
                    "layernorm mean",
                    saved.stats.mean.len,
                    n,
                    saved.stats.mean.ptr,
                ),
                (
                    "layernorm rstd",
                    saved.stats.rstd.len,
                    n,
                    saved.stats.rstd.ptr,
                ),
                ("layernorm w", saved.w.len, c, saved.w.ptr),
            ])
        {
            return;
        }
        if chunks > u16::MAX as usize {
            self.fail(KernelError::Cuda(format!(
                "layernorm backward over {k} rows: too many row chunks"
            )));
            return;
        }
        let Some(rows_p) = self.upload_rows(rows) else {
            return;
        };
        let Some(partial) = self.scratch(1, chunks * 2 * c) else {
            return;
        };
        let (k64, c64, ch64) = (k as u64, c as u64, chunks as u64);
        let (mean, rstd) = (saved.stats.mean.ptr, saved.stats.rstd.ptr);
        let mut b = self.stream().launch_builder(&self.f.layernorm_backward_dx);
        b.arg(&dx.ptr)
            .arg(&dy.g.ptr)
            .arg(&saved.x.ptr)
            .arg(&mean)
            .arg(&rstd)
            .arg(&saved.w.ptr)
            .arg(&rows_p)
            .arg(&k64)
            .arg(&c64);
        // SAFETY: matches layernorm_backward_dx; lengths checked above, row list uploaded (K entries < n).
        let r = unsafe { b.launch(cfg(warp_grid(k, ESLM_LN_THREADS), ESLM_LN_THREADS)) };
        if !self.check(r) {
            return;
        }
        let mut b = self
            .stream()
            .launch_builder(&self.f.layernorm_backward_params);
        b.arg(&partial)
            .arg(&dy.g.ptr)
            .arg(&saved.x.ptr)
            .arg(&mean)
            .arg(&rstd)
            .arg(&rows_p)
            .arg(&k64)
            .arg(&c64);
        let launch = LaunchConfig {
            grid_dim: (
                c.div_ceil(ESLM_LN_THREADS as usize) as u32,
                chunks as u32,
                1,
            ),
            block_dim: (ESLM_LN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches layernorm_backward_params; partial holds chunks·2C floats.
        let r = unsafe { b.launch(launch) };
        if !self.check(r) {
            return;
        }
        let mut b = self
            .stream()
            .launch_builder(&self.f.layernorm_reduce_params);
        b.arg(&dp.w.ptr)
            .arg(&dp.b.ptr)
            .arg(&partial)
            .arg(&ch64)
            .arg(&c64);
        // SAFETY: matches layernorm_reduce_params; dw, db hold C floats.
        let r = unsafe { b.launch(cfg(grid(c, ESLM_LN_THREADS), ESLM_LN_THREADS)) };
        self.check(r);
    }
    fn linear_forward(
        &mut self,
        y: DevViewMut<'_>,
        x: DevView<'_>,
        p: Affine<DevView<'_>>,
        n: usize,
        d: LinearDims,
    ) -> f64 {
        let LinearDims { d_in, d_out } = d;
        if n == 0
            || !self.ready(&[
                ("linear y", y.len, n * d_out, y.ptr),
                ("linear x", x.len, n * d_in, x.ptr),
                ("linear w", p.w.len, d_out * d_in, p.w.ptr),
                ("linear b", p.b.len, d_out, p.b.ptr),
            ])
        {
            return 0.0;
        }
        let (n64, w64) = (n as u64, d_out as u64);
        let mut b = self.stream().launch_builder(&self.f.bias_forward);
        b.arg(&y.ptr).arg(&p.b.ptr).arg(&n64).arg(&w64);
        // SAFETY: matches bias_forward (linear.cu); y holds n·out, b out floats.
        let r = unsafe { b.launch(cfg(grid(n * d_out, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        if !self.check(r) {
            return 0.0;
        }
        self.gemm(Gemm {
            ta: false,
            tb: true,
            m: n,
            n: d_out,
            k: d_in,
            a: x.ptr,
            lda: d_in,
            sa: 0,
            b: p.w.ptr,
            ldb: d_in,
            sb: 0,
            c: y.ptr,
            ldc: d_out,
            sc: 0,
            batch: 1,
            beta: 1.0,
        });
        2.0 * (n * d_in * d_out) as f64
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
        let LinearDims { d_in, d_out } = d;
        let (rows, n) = (dy.rows, dy.n);
        let k = rows.count(n);
        let (dx_len, dx_ptr) = dx.as_ref().map_or((k * d_in, 1), |v| (v.len, v.ptr));
        if k == 0
            || !self.ready(&[
                ("linear dx", dx_len, k * d_in, dx_ptr),
                ("linear dw", dp.w.len, d_out * d_in, dp.w.ptr),
                ("linear db", dp.b.len, d_out, dp.b.ptr),
                ("linear dy", dy.g.len, k * d_out, dy.g.ptr),
                ("linear x", x.len, n * d_in, x.ptr),
                ("linear w", w.len, d_out * d_in, w.ptr),
            ])
        {
            return 0.0;
        }
        let mut flops = 0.0;
        self.colsum_add(dp.b.ptr, dy.g.ptr, k, d_out);
        if let Some(dx) = dx {
            self.gemm(Gemm {
                ta: false,
                tb: false,
                m: k,
                n: d_in,
                k: d_out,
                a: dy.g.ptr,
                lda: d_out,
                sa: 0,
                b: w.ptr,
                ldb: d_in,
                sb: 0,
                c: dx.ptr,
                ldc: d_in,
                sc: 0,
                batch: 1,
                beta: 0.0,
            });
            flops += 2.0 * (k * d_in * d_out) as f64;
        }
        let Some(x_rows) = self.rows_of(x.ptr, rows, n, d_in) else {
            return flops;
        };
        self.gemm(Gemm {
            ta: true,
            tb: false,
            m: d_out,
            n: d_in,
            k,
            a: dy.g.ptr,
            lda: d_out,
            sa: 0,
            b: x_rows,
            ldb: d_in,
            sb: 0,
            c: dp.w.ptr,
            ldc: d_in,
            sc: 0,
            batch: 1,
            beta: 1.0,
        });
        flops + 2.0 * (k * d_in * d_out) as f64
    }
    fn lm_head_forward(
        &mut self,
        z: DevViewMut<'_>,
        h: DevView<'_>,
        wte: DevView<'_>,
        n: usize,
        d: HeadDims,
    ) -> f64 {
        let HeadDims { c, v, vp } = d;
        if n == 0
            || !self.ready(&[
                ("logits", z.len, (n - 1) * vp + v, z.ptr),
                ("lm head h", h.len, n * c, h.ptr),
                ("wte", wte.len, v * c, wte.ptr),
            ])
        {
            return 0.0;
        }
        self.gemm(Gemm {
            ta: false,
            tb: true,
            m: n,
            n: v,
            k: c,
            a: h.ptr,
            lda: c,
            sa: 0,
            b: wte.ptr,
            ldb: c,
            sb: 0,
            c: z.ptr,
            ldc: vp,
            sc: 0,
            batch: 1,
            beta: 0.0,
        });
        2.0 * (n * c * v) as f64
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
        let HeadDims { c, v, vp } = d;
        let (rows, n) = (dz.rows, dz.n);
        let k = rows.count(n);
        if k == 0
            || !self.ready(&[
                ("lm head dh", dh.len, k * c, dh.ptr),
                ("dwte", dwte.len, v * c, dwte.ptr),
                ("dlogits", dz.g.len, (k - 1) * vp + v, dz.g.ptr),
                ("lm head h", h.len, n * c, h.ptr),
                ("wte", wte.len, v * c, wte.ptr),
            ])
        {
            return 0.0;
        }
        self.gemm(Gemm {
            ta: false,
            tb: false,
            m: k,
            n: c,
            k: v,
            a: dz.g.ptr,
            lda: vp,
            sa: 0,
            b: wte.ptr,
            ldb: c,
            sb: 0,
            c: dh.ptr,
            ldc: c,
            sc: 0,
            batch: 1,
            beta: 0.0,
        });
        let Some(h_rows) = self.rows_of(h.ptr, rows, n, c) else {
            return 2.0 * (k * c * v) as f64;
        };
        self.gemm(Gemm {
            ta: true,
            tb: false,
            m: v,
            n: c,
            k,
            a: dz.g.ptr,
            lda: vp,
            sa: 0,
            b: h_rows,
            ldb: c,
            sb: 0,
            c: dwte.ptr,
            ldc: c,
            sc: 0,
            batch: 1,
            beta: 1.0,
        });
        4.0 * (k * c * v) as f64
    }
    fn gelu_forward(&mut self, y: DevViewMut<'_>, x: DevView<'_>) {
        let len = x.len;
        if len == 0 || !self.ready(&[("gelu y", y.len, len, y.ptr), ("gelu x", len, len, x.ptr)]) {
            return;
        }
        let len64 = len as u64;
        let mut b = self.stream().launch_builder(&self.f.gelu_forward);
        b.arg(&y.ptr).arg(&x.ptr).arg(&len64);
        // SAFETY: matches gelu_forward (gelu.cu); both hold len floats.
        let r = unsafe { b.launch(cfg(grid(len, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r);
    }
    fn gelu_backward(
        &mut self,
        dx: DevViewMut<'_>,
        dy: RowGrad<'_, DevView<'_>>,
        x: DevView<'_>,
        width: usize,
    ) {
        let (rows, n) = (dy.rows, dy.n);
        let k = rows.count(n);
        if k == 0
            || !self.ready(&[
                ("gelu dx", dx.len, k * width, dx.ptr),
                ("gelu dy", dy.g.len, k * width, dy.g.ptr),
                ("gelu x", x.len, n * width, x.ptr),
            ])
        {
            return;
        }
        let Some(rows_p) = self.upload_rows(rows) else {
            return;
        };
        let (k64, w64) = (k as u64, width as u64);
        let mut b = self.stream().launch_builder(&self.f.gelu_backward);
        b.arg(&dx.ptr)
            .arg(&dy.g.ptr)
            .arg(&x.ptr)
            .arg(&rows_p)
            .arg(&k64)
            .arg(&w64);
        // SAFETY: matches gelu_backward; lengths checked, K row indices < n uploaded.
        let r = unsafe { b.launch(cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r);
    }
    fn attention_forward(
        &mut self,
        y: DevViewMut<'_>,
        att: DevViewMut<'_>,
        qkv: DevView<'_>,
        d: AttnDims,
    ) -> f64 {
        let AttnDims { b, t, c, nh } = d;
        if b * t == 0
            || nh == 0
            || !self.ready(&[
                ("attention y", y.len, b * t * c, y.ptr),
                ("attention att", att.len, b * nh * t * t, att.ptr),
                ("attention qkv", qkv.len, b * t * 3 * c, qkv.ptr),
            ])
        {
            return 0.0;
        }
        let hs = c / nh;
        for bi in 0..b {
            let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
            self.gemm(Gemm {
                ta: false,
                tb: true,
                m: t,
                n: t,
                k: hs,
                a: base,
                lda: 3 * c,
                sa: hs,
                b: base + 4 * c as u64,
                ldb: 3 * c,
                sb: hs,
                c: att.ptr + 4 * (bi * nh * t * t) as u64,
                ldc: t,
                sc: t * t,
                batch: nh,
                beta: 0.0,
            });
        }
        let (rows, t64) = (b * nh * t, t as u64);
        let rows64 = rows as u64;
        let scale = (1.0 / (hs as f64).sqrt()) as f32;
        if self.healthy() {
            let mut l = self
                .stream()
                .launch_builder(&self.f.attention_softmax_forward);
            l.arg(&att.ptr).arg(&rows64).arg(&t64).arg(&scale);
            // SAFETY: matches attention_softmax_forward (attention.cu); att holds B·H·T·T floats.
            let r = unsafe { l.launch(cfg(warp_grid(rows, ESLM_ATT_THREADS), ESLM_ATT_THREADS)) };
            self.check(r);
        }
        for bi in 0..b {
            let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
            self.gemm(Gemm {
                ta: false,
                tb: false,
                m: t,
                n: hs,
                k: t,
                a: att.ptr + 4 * (bi * nh * t * t) as u64,
                lda: t,
                sa: t * t,
                b: base + 4 * (2 * c) as u64,
                ldb: 3 * c,
                sb: hs,
                c: y.ptr + 4 * (bi * t * c) as u64,
                ldc: c,
                sc: hs,
                batch: nh,
                beta: 0.0,
            });
        }
        4.0 * (b * t * t * c) as f64
    }
    fn attention_backward(
        &mut self,
        dqkv: DevViewMut<'_>,
        dy: RowGrad<'_, DevView<'_>>,
        qkv: DevView<'_>,
        att: DevView<'_>,
        d: AttnDims,
    ) -> f64 {
        let AttnDims { b, t, c, nh } = d;
        let (rows, n) = (dy.rows, dy.n);
        let k = rows.count(n);
        if b * t == 0
            || nh == 0
            || !self.ready(&[
                ("attention dqkv", dqkv.len, b * t * 3 * c, dqkv.ptr),
                ("attention dy", dy.g.len, k * c, dy.g.ptr),
                ("attention qkv", qkv.len, b * t * 3 * c, qkv.ptr),
                ("attention att", att.len, b * nh * t * t, att.ptr),
            ])
        {
            return 0.0;
        }
        let hs = c / nh;
        // Dense dY [B·T, C]: the kept rows' gradient, zeros elsewhere.
        let dy_dense = match rows {
            RowSet::All => dy.g.ptr,
            RowSet::Rows(_) => {
                let Some(dense) = self.scratch(0, b * t * c) else {
                    return 0.0;
                };
                let view = DevViewMut {
                    ptr: dense,
                    len: b * t * c,
                    _buf: PhantomData,
                };
                self.fill_zero(view);
                let dst = DevViewMut {
                    ptr: dense,
                    len: b * t * c,
                    _buf: PhantomData,
                };
                self.scatter_add_rows(dst, dy, c);
                dense
            }
        };
        let Some(datt) = self.scratch(2, b * nh * t * t) else {
            return 0.0;
        };
        for bi in 0..b {
            let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
            self.gemm(Gemm {
                ta: false,
                tb: true,
                m: t,
                n: t,
                k: hs,
                a: dy_dense + 4 * (bi * t * c) as u64,
                lda: c,
                sa: hs,
                b: base + 4 * (2 * c) as u64,
                ldb: 3 * c,
                sb: hs,
                c: datt + 4 * (bi * nh * t * t) as u64,
                ldc: t,
                sc: t * t,
                batch: nh,
                beta: 0.0,
            });
        }
        let (nrows, t64) = (b * nh * t, t as u64);
        let rows64 = nrows as u64;
        let scale = (1.0 / (hs as f64).sqrt()) as f32;
        if self.healthy() {
            let mut l = self
                .stream()
                .launch_builder(&self.f.attention_softmax_backward);
            l.arg(&datt)
                .arg(&att.ptr)
                .arg(&rows64)
                .arg(&t64)
                .arg(&scale);
            // SAFETY: matches attention_softmax_backward; datt and att hold B·H·T·T floats.
            let r = unsafe { l.launch(cfg(warp_grid(nrows, ESLM_ATT_THREADS), ESLM_ATT_THREADS)) };
            self.check(r);
        }
        for bi in 0..b {
            let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
            let dbase = dqkv.ptr + 4 * (bi * t * 3 * c) as u64;
            let ds = datt + 4 * (bi * nh * t * t) as u64;
            let p = att.ptr + 4 * (bi * nh * t * t) as u64;
            let dyb = dy_dense + 4 * (bi * t * c) as u64;
            let g = |ta, a, lda, sa, bm, ldb, c_out| Gemm {
                ta,
                tb: false,
                m: t,
                n: hs,
                k: t,
                a,
                lda,
                sa,
                b: bm,
                ldb,
                sb: hs,
                c: c_out,
                ldc: 3 * c,
                sc: hs,
                batch: nh,
                beta: 0.0,
            };
            // dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dY (every column of dqkv written: beta 0 overwrites).
            self.gemm(g(false, ds, t, t * t, base + 4 * c as u64, 3 * c, dbase));
            self.gemm(g(true, ds, t, t * t, base, 3 * c, dbase + 4 * c as u64));
            self.gemm(g(true, p, t, t * t, dyb, c, dbase + 4 * (2 * c) as u64));
        }
        8.0 * (b * t * t * c) as f64
    }
    fn residual_forward(&mut self, out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>) {
        let len = out.len;
        if len == 0
            || !self.ready(&[
                ("residual out", len, len, out.ptr),
                ("residual a", a.len, len, a.ptr),
                ("residual b", b.len, len, b.ptr),
            ])
        {
            return;
        }
        let len64 = len as u64;
        let mut l = self.stream().launch_builder(&self.f.residual_forward);
        l.arg(&out.ptr).arg(&a.ptr).arg(&b.ptr).arg(&len64);
        // SAFETY: matches residual_forward (residual.cu); all hold len floats.
        let r = unsafe { l.launch(cfg(grid(len, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r);
    }
    fn residual_merge(
        &mut self,
        out: DevViewMut<'_>,
        a: RowGrad<'_, DevView<'_>>,
        b: RowGrad<'_, DevView<'_>>,
        width: usize,
    ) -> RowSet {
        let n = a.n;
        let (ka, kb) = (a.rows.count(n), b.rows.count(n));
        let Some((union, ia, ib)) = merge_maps(a.rows, b.rows, n) else {
            let len = ka * width;
            let out = DevViewMut {
                ptr: out.ptr,
                len: out.len.min(len),
                _buf: PhantomData,
            };
            if out.len == len {
                self.residual_forward(out, Self::slice(a.g, 0..len), Self::slice(b.g, 0..len));
            } else {
                self.ready(&[("residual merge out", out.len, len, out.ptr)]);
            }
            return a.rows.clone();
        };
        let k = union.count(n);
        if k == 0
            || !self.ready(&[
                ("residual merge out", out.len, k * width, out.ptr),
                ("residual merge a", a.g.len, ka * width, a.g.ptr),
                ("residual merge b", b.g.len, kb * width, b.g.ptr),
            ])
        {
            return union;
        }
        let mut maps: Vec<u32> = ia.iter().map(|&x| x as u32).collect();
        maps.extend(ib.iter().map(|&x| x as u32));
        let Some(base) = self.upload_idx(&maps) else {
            return union;
        };
        let ib_p = base + 4 * k as u64;
        let (k64, w64) = (k as u64, width as u64);
        let mut l = self.stream().launch_builder(&self.f.residual_merge);
        l.arg(&out.ptr)
            .arg(&a.g.ptr)
            .arg(&base)
            .arg(&b.g.ptr)
            .arg(&ib_p)
            .arg(&k64)
            .arg(&w64);
        // SAFETY: matches residual_merge; every map entry is -1 or a row of its compact buffer.
        let r = unsafe { l.launch(cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r);
        union
    }
    fn compact_blocks(&mut self, x: DevViewMut<'_>, block: usize, seqs: &[usize]) {
        let end = seqs.last().map_or(0, |&s| (s + 1) * block);
        if block == 0 || !self.ready(&[("compacted buffer", x.len, end, x.ptr)]) {
            return;
        }
        for (i, &s) in seqs.iter().enumerate().filter(|(i, s)| *i != **s) {
            // SAFETY: both blocks lie inside the view (checked through the last block); `i < s` (the list is
            // strictly ascending), so the destination ends at or before the source begins; ordered on the stream
            // after the earlier copies, whose sources lie after this destination.
            let r = unsafe {
                drv::memcpy_dtod_async(
                    x.ptr + (i * block * 4) as u64,
                    x.ptr + (s * block * 4) as u64,
                    block * 4,
                    self.stream().cu_stream(),
                )
            };
            if !self.check(r) {
                return;
            }
        }
    }
    fn gather_rows(&mut self, dst: DevViewMut<'_>, src: DevView<'_>, rows: &RowSet, width: usize) {
        match rows {
            RowSet::All => {
                let len = src.len;
                if len == 0
                    || !self.ready(&[
                        ("gather dst", dst.len, len, dst.ptr),
                        ("gather src", len, len, src.ptr),
                    ])
                {
                    return;
                }
                // SAFETY: both ranges hold len floats (checked) and are distinct buffers of the model.
                let r = unsafe {
                    drv::memcpy_dtod_async(dst.ptr, src.ptr, len * 4, self.stream().cu_stream())
                };
                self.check(r);
            }
            RowSet::Rows(r) => {
                let k = r.len();
                let max_row = r.last().map_or(0, |&x| x as usize + 1);
                if k == 0
                    || !self.ready(&[
                        ("gather dst", dst.len, k * width, dst.ptr),
                        ("gather src", src.len, max_row * width, src.ptr),
                    ])
                {
                    return;
                }
                self.gather_launch(dst.ptr, src.ptr, rows, width);
            }
        }
    }
    fn scatter_add_rows(&mut self, dst: DevViewMut<'_>, g: RowGrad<'_, DevView<'_>>, width: usize) {
        let (rows, n) = (g.rows, g.n);
        let k = rows.count(n);
        let max_row = match rows {
            RowSet::All => n,
            RowSet::Rows(r) => r.last().map_or(0, |&x| x as usize + 1),
        };
        if k == 0
            || !self.ready(&[
                ("scatter dst", dst.len, max_row * width, dst.ptr),
                ("scatter g", g.g.len, k * width, g.g.ptr),
            ])
        {
            return;
        }
        let Some(rows_p) = self.upload_rows(rows) else {
            return;
        };
        let (k64, w64) = (k as u64, width as u64);
        let mut l = self.stream().launch_builder(&self.f.scatter_add_rows);
        l.arg(&dst.ptr)
            .arg(&g.g.ptr)
            .arg(&rows_p)
            .arg(&k64)
            .arg(&w64);
        // SAFETY: matches scatter_add_rows (rows.cu); distinct rows < max_row.
        let r = unsafe { l.launch(cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r);
    }

    fn token_stats(
        &mut self,
        logits: Logits<DevView<'_>>,
        targets: &DeviceInts<i32>,
        out: &mut TokenStats,
    ) -> Result<()> {
        self.recorded()?;
        let Logits { z, rows, dims } = logits;
        crate::error::check_len("targets", targets.len(), rows)?;
        let vocab = dims.v;
        for (row, &target) in targets.host.iter().enumerate() {
            if target != DEFAULT_IGNORE_INDEX && (target < 0 || target as usize >= vocab) {
                return Err(KernelError::TargetOutOfRange {
                    row,
                    target: target as i64,
                    vocab,
                }
                .into());
            }
        }
        if rows == 0 {
            *out = TokenStats::default();
            return Ok(());
        }
        let used = logits_extent(rows, dims)?;
        if !self.ready(&[("logits", z.len, used, z.ptr)]) {
            return self.recorded();
        }
        let stream = self.stream().clone();
        if self.stats.as_ref().is_none_or(|s| s.capacity() < rows) {
            self.stats = Some(DeviceTokenStats::new(&self.kernels, rows)?);
        }
        let Some(stats) = self.stats.as_mut() else {
            return self.recorded();
        };
        let Some(tgt) = targets.dev.as_ref() else {
            return Err(KernelError::Cuda("targets have no device memory".into()).into());
        };
        // SAFETY: z is a live range of `used` ≥ z-extent floats of this context (checked above).
        let borrowed = unsafe { Borrowed::<f32>::new(&stream, z.ptr, used) };
        let view = DeviceLogits::new(borrowed.slice(0..used), rows, vocab, dims.vp)?;
        self.kernels
            .token_stats(&view, &tgt.slice(0..rows), DEFAULT_IGNORE_INDEX, stats)?;
        stats.check_status(&self.kernels)?;
        stats.to_host(&self.kernels, out)?;
        Ok(())
    }
    fn select(
        &mut self,
        scores: &[f32],
        valid: &[bool],
        rule: SelectRule,
        out: &mut Selection,
    ) -> Result<()> {
        self.recorded()?;
        self.kernels.select_host(scores, Some(valid), rule, out)?;
        Ok(())
    }
    fn sparse_ce(
        &mut self,
        logits: Logits<DevView<'_>>,
        rows: KeptTargets<'_, DeviceInts<i32>>,
        lse: &[f32],
        scale: f32,
        dlogits: DevViewMut<'_>,
    ) -> Result<f32> {
        self.recorded()?;
        let Logits { z, rows: n, dims } = logits;
        let kept = rows.kept;
        let k = kept.len();
        crate::error::check_len("targets", rows.targets.len(), n)?;
        crate::error::check_len("lse", lse.len(), n)?;
        if k == 0 {
            return Ok(0.0);
        }
        crate::model::validate_kept(kept, n)?;
        check_kept_targets(kept, &rows.targets.host, dims.v)?;
        let used = logits_extent(n, dims)?;
        if !self.ready(&[
            ("logits", z.len, used, z.ptr),
            ("dlogits", dlogits.len, k * dims.vp, dlogits.ptr),
        ]) {
            return self.recorded().map(|_| f32::NAN);
        }
        let stream = self.stream().clone();
        // Kept rows then the count, in the index scratch; lse in its own.
        let mut idx: Vec<u32> = kept.to_vec();
        idx.push(k as u32);
        let idx_ptr = self.upload_idx(&idx);
        let lse_ptr = self.scratch(3, n);
        let (Some(idx_ptr), Some(lse_ptr)) = (idx_ptr, lse_ptr) else {
            return self.recorded().map(|_| f32::NAN);
        };
        // SAFETY: lse scratch holds ≥ n floats; staged before return.
        let r = unsafe { drv::memcpy_htod_async(lse_ptr, lse, stream.cu_stream()) };
        r.map_err(KernelError::from)?;
        if self.ce.as_ref().is_none_or(|w| w.capacity() < k) {
            self.ce = Some(DeviceSparseCe::new(&self.kernels, k)?);
        }
        let Some(work) = self.ce.as_mut() else {
            return self.recorded().map(|_| f32::NAN);
        };
        let Some(tgt) = rows.targets.dev.as_ref() else {
            return Err(KernelError::Cuda("targets have no device memory".into()).into());
        };
        // SAFETY: each borrowed range is live device memory of this context of the stated length (checked above
        // or just uploaded), used only during this call.
        let (logits_b, lse_b, idx_b, mut dz_b) = unsafe {
            (
                Borrowed::<f32>::new(&stream, z.ptr, used),
                Borrowed::<f32>::new(&stream, lse_ptr, n),
                Borrowed::<u32>::new(&stream, idx_ptr, k + 1),
                Borrowed::<f32>::new(&stream, dlogits.ptr, k * dims.vp),
            )
        };
        let view = DeviceLogits::new(logits_b.slice(0..used), n, dims.v, dims.vp)?;
        let mut dz = dz_b.slice_mut(0..k * dims.vp);
        self.kernels.sparse_ce(
            SparseCeArgs {
                logits: &view,
                targets: &tgt.slice(0..n),
                lse: &lse_b.slice(0..n),
                kept: &idx_b.slice(0..k),
                count: &idx_b.slice(k..k + 1),
                dlogits: &mut dz,
                out_stride: dims.vp,
                scale: GradScale::Constant(scale),
            },
            work,
        )?;
        Ok(work.read_loss(&self.kernels)?)
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
        self.recorded()?;
        kd.validate()?;
        let Logits { z, rows: n, dims } = student;
        if teacher.rows != n || teacher.dims.v != dims.v || teacher.dims.vp != dims.vp {
            return Err(Gpt2Error::Shape {
                what: "teacher logits",
                expected: format!("[{n}, {}] in stride {} like the student's", dims.v, dims.vp),
                got: format!(
                    "[{}, {}] in stride {}",
                    teacher.rows, teacher.dims.v, teacher.dims.vp
                ),
            });
        }
        let kept = rows.kept;
        let k = kept.len();
        crate::error::check_len("targets", rows.targets.len(), n)?;
        if k == 0 {
            return Ok(0.0);
        }
        crate::model::validate_kept(kept, n)?;
        check_kept_targets(kept, &rows.targets.host, dims.v)?;
        let used = logits_extent(n, dims)?;
        if !self.ready(&[
            ("student logits", z.len, used, z.ptr),
            ("teacher logits", teacher.z.len, used, teacher.z.ptr),
            ("dlogits", dlogits.len, k * dims.vp, dlogits.ptr),
        ]) {
            return self.recorded().map(|_| f32::NAN);
        }
        let idx_ptr = self.upload_idx(kept);
        let loss_ptr = self.scratch(3, k);
        let (Some(idx_ptr), Some(loss_ptr)) = (idx_ptr, loss_ptr) else {
            return self.recorded().map(|_| f32::NAN);
        };
        let Some(tgt) = rows.targets.dev.as_ref() else {
            return Err(KernelError::Cuda("targets have no device memory".into()).into());
        };
        let tgt_ptr = raw_ptr(tgt);
        let (k64, v64, vp64) = (k as u64, dims.v as u64, dims.vp as u64);
        let (w, tau) = (kd.kd_weight, kd.temperature);
        let mut l = self.stream().launch_builder(&self.f.kd_grad_rows);
        l.arg(&z.ptr)
            .arg(&teacher.z.ptr)
            .arg(&tgt_ptr)
            .arg(&idx_ptr)
            .arg(&k64)
            .arg(&v64)
            .arg(&vp64)
            .arg(&vp64)
            .arg(&w)
            .arg(&tau)
            .arg(&scale)
            .arg(&dlogits.ptr)
            .arg(&loss_ptr);
        // SAFETY: matches kd_grad_rows (kd.cu; W and τ as f64): both logits hold n rows of stride Vp, the kept
        // list k rows < n with valid targets (checked), dlogits k·Vp floats, the loss scratch k floats. The
        // teacher's logits were written on the teacher backend's own stream; its statistics were read back to the
        // host (a synchronisation) before the trainer asks for this gradient, so they are complete here.
        let r = unsafe { l.launch(cfg(k.min(MAX_GRID) as u32, ESLM_KD_THREADS)) };
        if !self.check(r) {
            return self.recorded().map(|_| f32::NAN);
        }
        // The kept rows' losses (a per-row vector, K floats): the mean over them in f64, as on the CPU.
        let mut losses = vec![0f32; k];
        let view = DevView {
            ptr: loss_ptr,
            len: k,
            _buf: PhantomData,
        };
        self.download(view, &mut losses);
        self.recorded()?;
        Ok((losses.iter().map(|&x| x as f64).sum::<f64>() / k as f64) as f32)
    }

    fn adamw(
        &mut self,
        t: AdamWSlices<DevViewMut<'_>, DevView<'_>>,
        decays: bool,
        step: &AdamWStep,
    ) {
        let len = t.p.len;
        if len == 0
            || !self.ready(&[
                ("adamw p", len, len, t.p.ptr),
                ("adamw g", t.g.len, len, t.g.ptr),
                ("adamw m", t.m.len, len, t.m.ptr),
                ("adamw v", t.v.len, len, t.v.ptr),
            ])
        {
            return;
        }
        let [beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale] =
            step.kernel_args(decays);
        let len64 = len as u64;
        let mut l = self.stream().launch_builder(&self.f.adamw_update);
        l.arg(&t.p.ptr)
            .arg(&t.g.ptr)
            .arg(&t.m.ptr)
            .arg(&t.v.ptr)
            .arg(&len64)
            .arg(&beta1)
            .arg(&beta2)
            .arg(&eps)
            .arg(&step_size)
            .arg(&inv_sqrt_bc2)
            .arg(&decay)
            .arg(&grad_scale);
        // SAFETY: matches adamw_update (adamw.cu); all four hold len floats.
        let r = unsafe { l.launch(cfg(grid(len, ESLM_ADAMW_THREADS), ESLM_ADAMW_THREADS)) };
        self.check(r);
    }
    fn sum_squares(&self, x: DevView<'_>) -> f64 {
        if x.len == 0 {
            return 0.0;
        }
        if !self.ready(&[("sum_squares x", x.len, x.len, x.ptr)]) {
            return f64::NAN;
        }
        let _guard = self.norm_lock.lock().unwrap_or_else(|p| p.into_inner());
        let base = raw_ptr(&self.norm);
        let total = base + 8 * ESLM_NORM_BLOCKS as u64;
        let (len64, blocks64) = (x.len as u64, ESLM_NORM_BLOCKS as u64);
        let mut l = self.stream().launch_builder(&self.f.sum_squares_partial);
        l.arg(&base).arg(&x.ptr).arg(&len64);
        // SAFETY: matches sum_squares_partial (global_norm.cu): exactly ESLM_NORM_BLOCKS blocks write one partial
        // each into `norm` (ESLM_NORM_BLOCKS + 1 doubles).
        let r = unsafe { l.launch(cfg(ESLM_NORM_BLOCKS, ESLM_NORM_THREADS)) };
        if !self.check(r) {
            return f64::NAN;
        }
        let mut l = self.stream().launch_builder(&self.f.sum_squares_final);
        l.arg(&total).arg(&base).arg(&blocks64);
        // SAFETY: matches sum_squares_final; writes the last double of `norm`.
        let r = unsafe { l.launch(cfg(1, ESLM_NORM_THREADS)) };
        if !self.check(r) {
            return f64::NAN;
        }
        let mut out = [0.0f64];
        // SAFETY: `total` is one double of `norm`; synchronised before `out` is read.
        let r = unsafe { drv::memcpy_dtoh_async(&mut out[..], total, self.stream().cu_stream()) };
        if self.check(r) && self.check(self.stream().synchronize()) {
            out[0]
        } else {
            f64::NAN
        }
    }
    fn scale_rows(&mut self, x: DevViewMut<'_>, width: usize, weights: &[f32]) {
        let k = weights.len();
        if k == 0 || !self.ready(&[("scale_rows x", x.len, k * width, x.ptr)]) {
            return;
        }
        let Some(w) = self.scratch(1, k) else {
            return;
        };
        // SAFETY: the partial scratch holds ≥ k floats; ordered on the stream.
        let r = unsafe { drv::memcpy_htod_async(w, weights, self.stream().cu_stream()) };
        if !self.check(r) {
            return;
        }
        let (k64, w64) = (k as u64, width as u64);
        let mut l = self.stream().launch_builder(&self.f.scale_rows);
        l.arg(&x.ptr).arg(&w).arg(&k64).arg(&w64);
        // SAFETY: matches scale_rows (scale.cu); x holds K·width floats.
        let r = unsafe { l.launch(cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r);
    }
    fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
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
            if !self.ready(&[("collective buffer", x.len, x.len, x.ptr)]) {
                return self.recorded();
            }
            return comm.run(op, x.ptr, x.len, self.stream());
        }
        // Without NCCL: through the host.
        let mut host = vec![0.0f32; x.len];
        let view = DevView {
            ptr: x.ptr,
            len: x.len,
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
        self.recorded()
    }
}

impl Cuda {
    /// The rows `rows` of the dense `[n, width]` matrix at `src`: `src` itself for `All`, else gathered into the
    /// gather scratch.
    fn rows_of(&mut self, src: u64, rows: &RowSet, _n: usize, width: usize) -> Option<u64> {
        match rows {
            RowSet::All => Some(src),
            RowSet::Rows(r) => {
                let dst = self.scratch(0, r.len() * width)?;
                self.gather_launch(dst, src, rows, width).then_some(dst)
            }
        }
    }

    /// Queues `gather_rows` of a `Rows` set into `dst`; whether it was queued.
    fn gather_launch(&mut self, dst: u64, src: u64, rows: &RowSet, width: usize) -> bool {
        let RowSet::Rows(r) = rows else {
            return false;
        };
        let k = r.len();
        let Some(rows_p) = self.upload_rows(rows) else {
            return false;
        };
        let (k64, w64) = (k as u64, width as u64);
        let mut l = self.stream().launch_builder(&self.f.gather_rows);
        l.arg(&dst).arg(&src).arg(&rows_p).arg(&k64).arg(&w64);
        // SAFETY: matches gather_rows (rows.cu); dst holds K·width floats, every row < the rows of src.
        let r = unsafe { l.launch(cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS)) };
        self.check(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_outside_a_view_have_no_memory() {
        assert_eq!(sub(4096, 10, 2..5), (4096 + 8, 3));
        assert_eq!(sub(4096, 10, 0..10), (4096, 10));
        assert_eq!(sub(4096, 10, 5..11), (0, 6));
        assert_eq!(sub(0, 10, 0..3), (0, 3));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..2;
        assert_eq!(sub(4096, 10, reversed), (0, 0));
    }

    #[test]
    fn row_major_gemm_swaps_operands_for_cublas() {
        // C [2, 3] = A [2, 4]·Bᵀ with B [3, 4]: column-major Cᵀ [3, 2] = op(B)ᵀ·op(A)ᵀ → (T, N, 3, 2, 4, B, A).
        let g = Gemm {
            ta: false,
            tb: true,
            m: 2,
            n: 3,
            k: 4,
            a: 100,
            lda: 4,
            sa: 0,
            b: 200,
            ldb: 4,
            sb: 0,
            c: 300,
            ldc: 3,
            sc: 0,
            batch: 1,
            beta: 0.0,
        };
        assert_eq!(
            column_major(&g),
            Some(ColumnMajor {
                ta: true,
                tb: false,
                m: 3,
                n: 2,
                k: 4,
                a: 200,
                lda: 4,
                sa: 0,
                b: 100,
                ldb: 4,
                sb: 0,
                ldc: 3,
                sc: 0,
                batch: 1,
            })
        );
        let huge = Gemm { m: 1 << 31, ..g };
        assert_eq!(column_major(&huge), None);
        assert_eq!(column_major(&Gemm { ldc: 1 << 31, ..g }), None);
        assert_eq!(
            column_major(&Gemm {
                batch: 1 << 31,
                ..g
            }),
            None
        );
    }

    /// The GEMM mapping, executed on the host: a naive column-major SGEMM run with `column_major`'s arguments
    /// reproduces the row-major product.
    #[test]
    fn row_major_gemm_through_a_column_major_reference() {
        #[allow(clippy::too_many_arguments)]
        fn colmajor(
            ta: bool,
            tb: bool,
            m: usize,
            n: usize,
            k: usize,
            a: &[f32],
            lda: usize,
            b: &[f32],
            ldb: usize,
            c: &mut [f32],
            ldc: usize,
            beta: f32,
        ) {
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0.0;
                    for p in 0..k {
                        let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                        let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                        acc += av * bv;
                    }
                    c[i + j * ldc] = acc + beta * c[i + j * ldc];
                }
            }
        }
        // Every transpose combination, leading dimensions larger than the rows they hold (as for the LM head's
        // Vp > V and qkv's 3C with a head offset), and β = 1 accumulating into C.
        let (m, n, k, pad) = (3usize, 5usize, 4usize, 2usize);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
            let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (a_cols + pad, b_cols + pad + 1, n + pad);
            let a: Vec<f32> = (0..a_rows * lda).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..b_rows * ldb).map(|i| (i as f32 * 0.11).cos()).collect();
            let c0: Vec<f32> = (0..m * ldc).map(|i| i as f32 * 0.01).collect();
            let at = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] };
            let bt = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] };
            let mut want = c0.clone();
            for i in 0..m {
                for j in 0..n {
                    want[i * ldc + j] += (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f32>();
                }
            }
            let g = Gemm {
                ta,
                tb,
                m,
                n,
                k,
                a: 0,
                lda,
                sa: 0,
                b: 0,
                ldb,
                sb: 0,
                c: 0,
                ldc,
                sc: 0,
                batch: 1,
                beta: 1.0,
            };
            let ColumnMajor {
                ta: cta,
                tb: ctb,
                m: cm,
                n: cn,
                k: ck,
                lda: clda,
                ldb: cldb,
                ..
            } = column_major(&g).unwrap();
            let mut got = c0.clone();
            // Operands swapped: the first is B, the second A; C row-major [m, ldc] is column-major [n, m] in ldc.
            colmajor(
                cta,
                ctb,
                cm as usize,
                cn as usize,
                ck as usize,
                &b,
                clda as usize,
                &a,
                cldb as usize,
                &mut got,
                ldc,
                1.0,
            );
            for i in 0..m {
                for j in 0..ldc {
                    let (x, y) = (got[i * ldc + j], want[i * ldc + j]);
                    assert!(
                        (x - y).abs() < 1e-5,
                        "ta {ta} tb {tb}: C[{i},{j}] {x} vs {y}"
                    );
                }
            }
        }
    }

    /// The bf16 path converts exactly the elements a product reads: the extents of plain, transposed, strided
    /// (qkv rows of 3C) and batched operands, by brute force over the index set.
    #[test]
    fn operand_extents_cover_what_the_product_reads() {
        let read_a = |g: &Gemm| {
            let mut last = 0;
            for bi in 0..g.batch {
                for i in 0..g.m {
                    for p in 0..g.k {
                        let idx = bi * g.sa + if g.ta { p * g.lda + i } else { i * g.lda + p };
                        last = last.max(idx + 1);
                    }
                }
            }
            last
        };
        let read_b = |g: &Gemm| {
            let mut last = 0;
            for bi in 0..g.batch {
                for p in 0..g.k {
                    for j in 0..g.n {
                        let idx = bi * g.sb + if g.tb { j * g.ldb + p } else { p * g.ldb + j };
                        last = last.max(idx + 1);
                    }
                }
            }
            last
        };
        for (ta, tb, batch) in [
            (false, true, 1),
            (true, false, 3),
            (false, false, 2),
            (true, true, 4),
        ] {
            let (m, n, k) = (5usize, 3usize, 4usize);
            let g = Gemm {
                ta,
                tb,
                m,
                n,
                k,
                a: 0,
                lda: 3 * 8,
                sa: 7,
                b: 0,
                ldb: 11,
                sb: 50,
                c: 0,
                ldc: n,
                sc: m * n,
                batch,
                beta: 0.0,
            };
            assert_eq!(
                operand_extents(&g),
                (read_a(&g), read_b(&g)),
                "ta {ta} tb {tb} batch {batch}"
            );
        }
        let empty = Gemm {
            ta: false,
            tb: false,
            m: 0,
            n: 2,
            k: 0,
            a: 0,
            lda: 1,
            sa: 0,
            b: 0,
            ldb: 2,
            sb: 0,
            c: 0,
            ldc: 2,
            sc: 0,
            batch: 1,
            beta: 0.0,
        };
        assert_eq!(operand_extents(&empty), (0, 0));
    }

    #[test]
    fn merge_maps_match_the_cpu_union() {
        let a = RowSet::Rows(vec![1, 4, 6]);
        let b = RowSet::Rows(vec![0, 4, 7]);
        let (u, ia, ib) = merge_maps(&a, &b, 8).unwrap();
        assert_eq!(u, RowSet::Rows(vec![0, 1, 4, 6, 7]));
        assert_eq!(ia, vec![-1, 0, 1, 2, -1]);
        assert_eq!(ib, vec![0, -1, 1, -1, 2]);
        let (u, ia, ib) = merge_maps(&RowSet::All, &RowSet::Rows(vec![2]), 3).unwrap();
        assert_eq!(u, RowSet::All);
        assert_eq!((ia, ib), (vec![0, 1, 2], vec![-1, -1, 0]));
        assert!(merge_maps(&a, &a.clone(), 8).is_none());
        let (u, ia, ib) = merge_maps(&RowSet::Rows(vec![]), &RowSet::Rows(vec![3]), 5).unwrap();
        assert_eq!((u, ia, ib), (RowSet::Rows(vec![3]), vec![-1], vec![0]));
    }

    #[test]
    fn buckets_keep_rows_ascending_within_a_destination() {
        // Dense rows 0..6 with tokens [5, 2, 5, 2, 9, 5]: kept rows 0, 2, 3, 5 (compact 0..4).
        let tokens = [5u32, 2, 5, 2, 9, 5];
        let rows = RowSet::Rows(vec![0, 2, 3, 5]);
        let (perm, keys, starts) = buckets(&rows, 6, |i| tokens[i]);
        assert_eq!(keys, vec![2, 5]);
        assert_eq!(starts, vec![0, 1, 4]);
        assert_eq!(perm, vec![2, 0, 1, 3]);
        let (perm, keys, starts) = buckets(&RowSet::All, 4, |i| (i % 2) as u32);
        assert_eq!(
            (perm, keys, starts),
            (vec![0, 2, 1, 3], vec![0, 1], vec![0, 2, 4])
        );
        let (perm, keys, starts) = buckets(&RowSet::Rows(vec![]), 4, |i| i as u32);
        assert!(perm.is_empty() && keys.is_empty());
        assert_eq!(starts, vec![0]);
    }

    #[test]
    fn launch_shapes() {
        assert_eq!(grid(0, 256), 1);
        assert_eq!(grid(257, 256), 2);
        assert_eq!(grid(usize::MAX / 2, 256), MAX_GRID as u32);
        assert_eq!(warp_grid(9, 256), 2);
    }

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
