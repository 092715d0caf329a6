//! Forward linear layers with the bias, and the MLP's GELU, in the GEMM's epilogue (cuBLASLt). CPU counterparts:
//! `crate::ops::linear::forward` and `crate::ops::gelu::forward`.
//!
//! `y [n, out] = x [n, in]·Wᵀ + b` is, column-major, `yᵀ [out, n] = W·xᵀ`: A = the weight, stored row-major
//! `[out, in]`, i.e. column-major `[in, out]` (ld `in`) read transposed; B = `xᵀ`, column-major `[in, n]` (ld
//! `in`); D = `yᵀ`, column-major `[out, n]` (ld `out`). cuBLASLt's bias is a vector over the rows of D (length
//! `out`) broadcast over its columns: the row-major bias over output features. With `GELU_AUX_BIAS`, D receives
//! `GELU(A·B + bias)` and the auxiliary output (same layout, ld `out`) `A·B + bias`, the pre-activation the GELU
//! backward reads.
//!
//! One kernel where the fallback (`linear.rs`, `gelu.rs`) runs two or three: the bias broadcast, the GEMM with
//! β = 1 reading it back, the GELU pass. Used when libcublasLt loads, cuBLASLt has an algorithm for the shape,
//! the operand types of the precision and the pointers' alignment (asked once per such key, then cached; a
//! combination cuBLASLt rejects counts as "no algorithm"), the bias (and the auxiliary output) are 16-byte aligned
//! and, for the GELU epilogue, `out` is a multiple of 8 (cuBLASLt's rule for the auxiliary leading dimension); else
//! the fallback runs. cuBLASLt documents its GELU epilogue as "GELU" only: before its first use one tiny product
//! checks that it is GPT-2's tanh form on this GPU ([`Cuda::lt_gelu_is_tanh`]); if not, the MLP keeps the bias
//! epilogue and the GELU kernel. `ESLM_NO_CUBLASLT=1` (or [`Cuda::set_fused_epilogues`]) forces the fallback.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys as lt_sys};

use super::*;

/// Workspace handed to cuBLASLt's algorithms (32 MiB, NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;
/// The largest alignment cuBLASLt's heuristics ask about (bytes).
const MAX_ALIGN: u32 = 256;

/// The epilogue of a fused forward linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Epilogue {
    /// `D = A·B + bias`.
    Bias,
    /// `D = GELU(A·B + bias)`, auxiliary output `A·B + bias`.
    GeluAuxBias,
}

/// One forward linear layer for cuBLASLt (device pointers, row-major dimensions; see the module docs).
#[derive(Debug, Clone, Copy)]
pub(super) struct FusedLinear {
    /// Input `x [n, d_in]`.
    pub(super) x: u64,
    /// Weight `[d_out, d_in]`.
    pub(super) w: u64,
    /// Bias `[d_out]`.
    pub(super) b: u64,
    /// Output `[n, d_out]`: `x·Wᵀ + b` ([`Epilogue::Bias`]) or its GELU ([`Epilogue::GeluAuxBias`]).
    pub(super) y: u64,
    /// The pre-activation `[n, d_out]` ([`Epilogue::GeluAuxBias`] only).
    pub(super) aux: u64,
    pub(super) n: usize,
    pub(super) d: LinearDims,
    pub(super) epilogue: Epilogue,
    /// Element type of `x`, `y` and `aux` (the weight and the bias are f32).
    pub(super) dtype: Dtype,
}

/// What decides cuBLASLt's algorithm: the shape, the epilogue, the precision and the operands' alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    n: usize,
    d: (usize, usize),
    epilogue: Epilogue,
    precision: MatmulPrecision,
    dtype: Dtype,
    /// Alignment in bytes of A, B, C (= D).
    align: [u32; 3],
}

/// The cuBLASLt side of a backend: the handle, the workspace, the algorithm chosen per [`AlgoKey`] (`None`: no
/// algorithm, the fallback runs).
pub(super) struct Lt {
    handle: lt_sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: HashMap<AlgoKey, Option<lt_sys::cublasLtMatmulAlgo_t>>,
    /// Whether the GELU epilogue is GPT-2's tanh GELU here ([`Cuda::lt_gelu_is_tanh`]; asked at first use).
    gelu_tanh: Option<bool>,
}

// SAFETY: the handle is used only through `&mut Cuda` (one thread at a time); cuBLASLt handles are not tied to
// the thread that created them.
unsafe impl Send for Lt {}
// SAFETY: shared references never touch the handle (every use takes `&mut Lt`).
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created by `lt::create_handle` in `Lt::open`, destroyed once here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl std::fmt::Debug for Lt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lt")
            .field("algorithms", &self.algos.len())
            .finish_non_exhaustive()
    }
}

/// Whether cuBLASLt is tried: not yet, open, or not available / turned off (the fallback runs).
#[derive(Debug, Default)]
pub(super) enum LtState {
    #[default]
    Untried,
    Open(Box<Lt>),
    Off,
}

impl Lt {
    /// Opens cuBLASLt on the backend's context; `None` when the library does not load or the workspace does not
    /// fit (the fallback runs; nothing is recorded).
    fn open(cuda: &Cuda) -> Option<Self> {
        // SAFETY: only tries to dlopen libcublasLt (the handle constructor would panic without it).
        if !unsafe { lt_sys::is_culib_present() } || !cuda.bind() {
            return None;
        }
        let workspace = cuda.stream().alloc_zeros::<u8>(WORKSPACE_BYTES).ok()?;
        let handle = lt::create_handle().ok()?;
        Some(Self {
            handle,
            workspace,
            algos: HashMap::new(),
            gelu_tanh: None,
        })
    }
}

/// Which operands are converted to bf16 before the product, `(weight, input)`: both under bf16 products of f32
/// storage, the (f32) weight only under bf16 storage (the input is bf16 already), none for f32 / TF32 products.
fn converts(precision: MatmulPrecision, act: Dtype) -> (bool, bool) {
    match precision {
        MatmulPrecision::Bf16 => (true, act == Dtype::F32),
        MatmulPrecision::F32 | MatmulPrecision::Tf32 => (false, false),
    }
}

/// The largest power of two (≤ 256) dividing a device address: the alignment cuBLASLt may assume.
pub(super) fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return MAX_ALIGN;
    }
    (1u64 << ptr.trailing_zeros().min(MAX_ALIGN.trailing_zeros())) as u32
}

/// The column-major cuBLASLt problem of a row-major forward linear layer (module docs): `(m, n, k)` of D = op(A)·B
/// with op(A) = Aᵀ, and the leading dimensions of A, B and D; `None` when a dimension does not fit cuBLASLt's
/// 32-bit leading dimensions or, for the GELU epilogue, the auxiliary leading dimension is not a multiple of 8.
pub(super) fn problem(n: usize, d: LinearDims, epilogue: Epilogue) -> Option<LtProblem> {
    let fits = |x: usize| i32::try_from(x).is_ok();
    if n == 0 || d.d_in == 0 || d.d_out == 0 || ![n, d.d_in, d.d_out].into_iter().all(fits) {
        return None;
    }
    if epilogue == Epilogue::GeluAuxBias && d.d_out % 8 != 0 {
        return None;
    }
    Some(LtProblem {
        m: d.d_out as u64,
        n: n as u64,
        k: d.d_in as u64,
        lda: d.d_in as i64,
        ldb: d.d_in as i64,
        ldd: d.d_out as i64,
    })
}

/// See [`problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LtProblem {
    pub(super) m: u64,
    pub(super) n: u64,
    pub(super) k: u64,
    pub(super) lda: i64,
    pub(super) ldb: i64,
    pub(super) ldd: i64,
}

/// A cuBLASLt descriptor destroyed on drop.
struct Desc(lt_sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created once by `lt::create_matmul_desc`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
/// A cuBLASLt matrix layout destroyed on drop.
struct Layout(lt_sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created once by `lt::create_matrix_layout`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
/// A cuBLASLt preference destroyed on drop.
struct Pref(lt_sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created once by `lt::create_matmul_pref`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// Sets one descriptor attribute from a plain value.
///
/// # Safety
/// `T` must be the attribute's documented type.
unsafe fn set_desc<T>(
    desc: &Desc,
    attr: lt_sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> std::result::Result<(), lt::CublasError> {
    lt::set_matmul_desc_attribute(
        desc.0,
        attr,
        (value as *const T).cast(),
        std::mem::size_of::<T>(),
    )
}

/// Sets one preference attribute from a plain value.
///
/// # Safety
/// `T` must be the attribute's documented type.
unsafe fn set_pref<T>(
    pref: &Pref,
    attr: lt_sys::cublasLtMatmulPreferenceAttributes_t,
    value: &T,
) -> std::result::Result<(), lt::CublasError> {
    lt::set_matmul_pref_attribute(
        pref.0,
        attr,
        (value as *const T).cast(),
        std::mem::size_of::<T>(),
    )
}

/// The descriptor, layouts and operand pointers of one fused product.
struct Prepared {
    desc: Desc,
    a: Layout,
    b: Layout,
    d: Layout,
}

/// Builds the descriptor (compute type of the precision, Aᵀ·B, the epilogue and its pointers) and the layouts.
fn prepare(
    op: &FusedLinear,
    p: LtProblem,
    precision: MatmulPrecision,
) -> std::result::Result<Prepared, lt::CublasError> {
    use lt_sys::cublasLtMatmulDescAttributes_t as A;
    let compute = match precision {
        MatmulPrecision::Tf32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        MatmulPrecision::F32 | MatmulPrecision::Bf16 => {
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        }
    };
    let f32_t = lt_sys::cudaDataType::CUDA_R_32F;
    let bf16_t = lt_sys::cudaDataType::CUDA_R_16BF;
    let operand_t = match precision {
        MatmulPrecision::Bf16 => bf16_t,
        MatmulPrecision::F32 | MatmulPrecision::Tf32 => f32_t,
    };
    let out_t = match op.dtype {
        Dtype::F32 => f32_t,
        Dtype::Bf16 => bf16_t,
    };
    let desc = Desc(lt::create_matmul_desc(compute, f32_t)?);
    let (ta, tb) = (
        blas_sys::cublasOperation_t::CUBLAS_OP_T,
        blas_sys::cublasOperation_t::CUBLAS_OP_N,
    );
    let epilogue = match op.epilogue {
        Epilogue::Bias => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        Epilogue::GeluAuxBias => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
    };
    let bias = op.b as *const c_void;
    // SAFETY: each value has the attribute's documented type (cublasOperation_t, cublasLtEpilogue_t, a device
    // pointer, cudaDataType for the bias (f32 whatever D's type; without an algorithm for that, the heuristic says
    // so and the fallback runs), int64_t for the auxiliary leading dimension).
    unsafe {
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &ta)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &tb)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &f32_t)?;
        if op.epilogue == Epilogue::GeluAuxBias {
            let aux = op.aux as *mut c_void;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux)?;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &p.ldd)?;
        }
    }
    Ok(Prepared {
        desc,
        a: Layout(lt::create_matrix_layout(operand_t, p.k, p.m, p.lda)?),
        b: Layout(lt::create_matrix_layout(operand_t, p.k, p.n, p.ldb)?),
        d: Layout(lt::create_matrix_layout(out_t, p.m, p.n, p.ldd)?),
    })
}

/// cuBLASLt's best algorithm for `prep` with operands of the given alignments, `None` when it has none.
fn heuristic(
    handle: lt_sys::cublasLtHandle_t,
    prep: &Prepared,
    align: [u32; 3],
) -> std::result::Result<Option<lt_sys::cublasLtMatmulAlgo_t>, lt::CublasError> {
    use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
    let pref = Pref(lt::create_matmul_pref()?);
    let workspace = WORKSPACE_BYTES as u64;
    // SAFETY: uint64_t for the workspace size, uint32_t for the alignments (cuBLASLt's documented types).
    unsafe {
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &workspace,
        )?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            &align[0],
        )?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            &align[1],
        )?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            &align[2],
        )?;
        set_pref(
            &pref,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            &align[2],
        )?;
    }
    // SAFETY: every descriptor is live for the call.
    let found = unsafe {
        lt::get_matmul_algo_heuristic(
            handle,
            prep.desc.0,
            prep.a.0,
            prep.b.0,
            prep.d.0,
            prep.d.0,
            pref.0,
        )
    };
    match found {
        Ok(h) => Ok(Some(h.algo)),
        Err(e) if e.0 == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Ok(None),
        Err(e) => Err(e),
    }
}

impl Cuda {
    /// Turns the fused cuBLASLt epilogues on or off (on by default unless `ESLM_NO_CUBLASLT=1`); off, the forward
    /// linear layers run the separate bias, GEMM and GELU kernels.
    pub fn set_fused_epilogues(&mut self, on: bool) {
        self.lt = match (on, std::mem::take(&mut self.lt)) {
            (false, _) => LtState::Off,
            (true, LtState::Open(lt)) => LtState::Open(lt),
            (true, _) => LtState::Untried,
        };
    }

    /// Queues `op` on cuBLASLt (see the module docs). Returns false, with nothing queued, when the fallback must
    /// run instead; a failure after that point is recorded (and true returned: the caller must not run it twice).
    pub(super) fn fused_linear(&mut self, op: FusedLinear) -> bool {
        let precision = self.precision;
        if !self.healthy()
            || matches!(self.lt, LtState::Off)
            || (op.dtype == Dtype::Bf16 && precision != MatmulPrecision::Bf16)
        {
            return false;
        }
        let Some(p) = problem(op.n, op.d, op.epilogue) else {
            return false;
        };
        // The epilogue's bias and auxiliary output want 16-byte alignment on some GPUs: the fallback otherwise.
        let aux_ok = op.epilogue == Epilogue::Bias || alignment(op.aux) >= 16;
        if alignment(op.b) < 16 || !aux_ok {
            return false;
        }
        if matches!(self.lt, LtState::Untried) {
            self.lt = Lt::open(self).map_or(LtState::Off, |lt| LtState::Open(Box::new(lt)));
        }
        if op.epilogue == Epilogue::GeluAuxBias && !self.gelu_epilogue_ok() {
            return false;
        }
        let (convert_w, convert_x) = converts(precision, op.dtype);
        // The weight's bf16 copy in the parameters' shadow is known now; other converted operands live in the bf16
        // scratch, of which only 16 bytes of alignment are assumed.
        let w16 = convert_w
            .then(|| self.shadow_of(op.w, op.d.d_out * op.d.d_in))
            .flatten();
        let converted = |yes: bool, ptr: u64| if yes { 16 } else { alignment(ptr) };
        let align = [
            w16.map_or(converted(convert_w, op.w), alignment),
            converted(convert_x, op.x),
            alignment(op.y).min(alignment(op.aux)),
        ];
        let key = AlgoKey {
            n: op.n,
            d: (op.d.d_in, op.d.d_out),
            epilogue: op.epilogue,
            precision,
            dtype: op.dtype,
            align,
        };
        let LtState::Open(lt) = &mut self.lt else {
            return false;
        };
        if lt.algos.get(&key) == Some(&None) {
            return false;
        }
        // Descriptors or a heuristic cuBLASLt rejects (an unsupported type combination, say) mean "no algorithm":
        // cached, and the fallback runs. Only a failed product is an error.
        let prep = prepare(&op, p, precision).ok();
        let algo = match (lt.algos.get(&key), &prep) {
            (Some(a), _) => *a,
            (None, Some(prep)) => heuristic(lt.handle, prep, align).ok().flatten(),
            (None, None) => None,
        };
        lt.algos.insert(key, algo);
        match (algo, prep) {
            (Some(algo), Some(prep)) => self.bind() && self.run_fused(&op, &prep, &algo, w16),
            _ => false,
        }
    }

    /// Whether the GELU epilogue may be used: cuBLASLt is open and its GELU is the tanh form (probed once).
    fn gelu_epilogue_ok(&mut self) -> bool {
        let known = match &self.lt {
            LtState::Open(lt) => lt.gelu_tanh,
            _ => return false,
        };
        let ok = known.unwrap_or_else(|| self.lt_gelu_is_tanh());
        if let LtState::Open(lt) = &mut self.lt {
            lt.gelu_tanh = Some(ok);
        }
        ok
    }

    /// Converts the operands when the precision asks for bf16 (the weight: `w16`, its copy in the parameters'
    /// shadow, if it has one) and runs the product.
    fn run_fused(
        &self,
        op: &FusedLinear,
        prep: &Prepared,
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        w16: Option<u64>,
    ) -> bool {
        let (n, d) = (op.n, op.d);
        let mut scratch = self.bf16_operands.lock().unwrap_or_else(|p| p.into_inner());
        let (slot_w, slot_x) = &mut *scratch;
        let (convert_w, convert_x) = converts(self.precision, op.dtype);
        let a = match (convert_w, w16) {
            (true, Some(p)) => Some(p),
            (true, None) => self.to_bf16(slot_w, op.w, d.d_out * d.d_in),
            (false, _) => Some(op.w),
        };
        let b = match convert_x {
            true => self.to_bf16(slot_x, op.x, n * d.d_in),
            false => Some(op.x),
        };
        let (Some(a), Some(b)) = (a, b) else {
            return true;
        };
        let r = self.lt_matmul(prep, algo, (a, b), op.y);
        drop(scratch);
        match r {
            Ok(()) => true,
            Err(e) => self.lt_failed("matmul", e),
        }
    }

    /// Queues `D = epilogue(A·B)` with the prepared descriptors (`op.y` as C and D, β = 0); an error when
    /// cuBLASLt is not open.
    fn lt_matmul(
        &self,
        prep: &Prepared,
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        (a, b): (u64, u64),
        y: u64,
    ) -> std::result::Result<(), lt::CublasError> {
        let LtState::Open(lt) = &self.lt else {
            return Err(lt::CublasError(
                lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED,
            ));
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ws = raw_ptr(&lt.workspace);
        // SAFETY: A holds the `d_out × d_in` weight, B the `n × d_in` input (or their bf16 copies), D the `n × d_out`
        // output, aux (GELU) another `n × d_out`, bias `d_out` floats: the callers checked every length; C = D with
        // β = 0 (never read); alpha/beta are host f32 scalars read before the call returns; the workspace holds
        // WORKSPACE_BYTES; everything is ordered on this backend's stream.
        unsafe {
            lt::matmul(
                lt.handle,
                prep.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a as *const c_void,
                prep.a.0,
                b as *const c_void,
                prep.b.0,
                y as *const c_void,
                prep.d.0,
                y as *mut c_void,
                prep.d.0,
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream().cu_stream() as lt_sys::cudaStream_t,
            )
        }
    }

    /// Whether cuBLASLt's GELU epilogue computes GPT-2's tanh GELU on this GPU (cuBLASLt documents it as "GELU"
    /// only; the erf form differs by up to ≈ 5e-4): one f32 product of the 8×8 identity with inputs spanning
    /// [−4, 4], compared with `crate::ops::gelu` in f64 (tolerance 5e-5). `false` when it cannot be run; nothing is
    /// recorded either way.
    fn lt_gelu_is_tanh(&mut self) -> bool {
        const K: usize = 8;
        let xs: Vec<f32> = (0..K * K)
            .map(|i| -4.0 + 8.0 * i as f32 / (K * K - 1) as f32)
            .collect();
        let eye: Vec<f32> = (0..K * K)
            .map(|i| if i / K == i % K { 1.0 } else { 0.0 })
            .collect();
        let (mut x, mut w) = (self.alloc(K * K), self.alloc(K * K));
        let (b, pre, post) = (self.alloc(K), self.alloc(K * K), self.alloc(K * K));
        self.upload(Cuda::view_mut(&mut x), &xs);
        self.upload(Cuda::view_mut(&mut w), &eye);
        let d = LinearDims { d_in: K, d_out: K };
        let op = FusedLinear {
            x: x.ptr,
            w: w.ptr,
            b: b.ptr,
            y: post.ptr,
            aux: pre.ptr,
            n: K,
            d,
            epilogue: Epilogue::GeluAuxBias,
            dtype: Dtype::F32,
        };
        let (Some(p), LtState::Open(lt)) = (problem(K, d, op.epilogue), &self.lt) else {
            return false;
        };
        let Ok(prep) = prepare(&op, p, MatmulPrecision::F32) else {
            return false;
        };
        let Ok(Some(algo)) = heuristic(lt.handle, &prep, [MAX_ALIGN; 3]) else {
            return false;
        };
        if !self.healthy()
            || self
                .lt_matmul(&prep, &algo, (w.ptr, x.ptr), post.ptr)
                .is_err()
        {
            return false;
        }
        let mut got = vec![0f32; K * K];
        self.download(Cuda::view(&post), &mut got);
        let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
        let mut want = vec![0f64; K * K];
        crate::ops::gelu::forward(&mut want, &x64);
        self.healthy()
            && got
                .iter()
                .zip(&want)
                .all(|(&g, &w)| (g as f64 - w).abs() <= 5e-5)
    }

    /// Records a failed cuBLASLt product; true (the op counts as run: the recorded error fails the step).
    fn lt_failed(&self, what: &str, e: lt::CublasError) -> bool {
        self.fail(KernelError::Cuda(format!("cuBLASLt {what}: {e:?}")));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0004), 4);
        assert_eq!(alignment(0x7f00_0000_0010), 16);
        assert_eq!(alignment(0x7f00_0000_0180), 128);
        assert_eq!(alignment(0), 256);
    }

    /// cuBLASLt's product as documented, column-major: `D (m×n, ldd) = op(A)·B + bias` over rows, with
    /// op(A) = Aᵀ for A (k×m, lda) and B (k×n, ldb).
    fn column_major_reference(p: LtProblem, a: &[f32], b: &[f32], bias: &[f32]) -> Vec<f32> {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (lda, ldb, ldd) = (p.lda as usize, p.ldb as usize, p.ldd as usize);
        let mut d = vec![f32::NAN; ldd * n];
        for j in 0..n {
            for i in 0..m {
                let dot: f64 = (0..k)
                    .map(|l| a[l + i * lda] as f64 * b[l + j * ldb] as f64)
                    .sum();
                d[i + j * ldd] = (dot + bias[i] as f64) as f32;
            }
        }
        d
    }

    #[test]
    fn the_column_major_problem_computes_the_row_major_layer() {
        let (n, d_in, d_out) = (5usize, 3usize, 8usize);
        let x: Vec<f32> = (0..n * d_in).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..d_out * d_in).map(|i| (i as f32 * 0.11).cos()).collect();
        let bias: Vec<f32> = (0..d_out).map(|i| i as f32 * 0.5 - 1.0).collect();
        let d = LinearDims { d_in, d_out };
        let p = problem(n, d, Epilogue::GeluAuxBias).unwrap();
        // The row-major buffers handed over as they are: A = W, B = x, D read back as y [n, out].
        let got = column_major_reference(p, &w, &x, &bias);
        for r in 0..n {
            for o in 0..d_out {
                let want: f64 = (0..d_in)
                    .map(|i| x[r * d_in + i] as f64 * w[o * d_in + i] as f64)
                    .sum::<f64>()
                    + bias[o] as f64;
                let y = got[r * d_out + o] as f64;
                assert!((y - want).abs() < 1e-6, "y[{r}, {o}] = {y}, want {want}");
            }
        }
    }

    #[test]
    fn problem_maps_the_row_major_layer_to_column_major() {
        let d = LinearDims {
            d_in: 768,
            d_out: 3072,
        };
        let p = problem(8192, d, Epilogue::GeluAuxBias).unwrap();
        // D = yᵀ [out, n] = (W stored [in, out] column-major)ᵀ · xᵀ [in, n].
        assert_eq!((p.m, p.n, p.k), (3072, 8192, 768));
        assert_eq!((p.lda, p.ldb, p.ldd), (768, 768, 3072));
        let odd = LinearDims {
            d_in: 16,
            d_out: 33,
        };
        assert!(
            problem(7, odd, Epilogue::GeluAuxBias).is_none(),
            "aux ld 33"
        );
        assert!(problem(7, odd, Epilogue::Bias).is_some());
        assert!(problem(0, odd, Epilogue::Bias).is_none());
        assert!(problem(1 << 31, odd, Epilogue::Bias).is_none());
    }
}
