//! Matrix products on cuBLAS: row-major GEMMs through the column-major swap ([`column_major`]), in f32 (SGEMM,
//! default or TF32 math mode) or with bf16 operands (`cublasGemmStridedBatchedEx`, f32 accumulation): bf16
//! activations as they are, the weights from the parameters' bf16 copy (`shadow.rs`), other f32 operands (every
//! activation under `--matmul bf16` with f32 storage) converted into scratch first (`kernels/convert.cu`); the
//! result in C's own type (f32, or bf16 activations).

use super::*;

/// The cuBLAS operation of a transpose flag.
fn blas_op(transpose: bool) -> blas_sys::cublasOperation_t {
    if transpose {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

impl Cuda {
    /// Queues a row-major GEMM (see [`Gemm`]); records a failure. Skipped when the output is empty.
    pub(super) fn gemm(&self, g: Gemm) {
        if g.m == 0 || g.n == 0 || g.batch == 0 || !self.healthy() {
            return;
        }
        if self.precision == MatmulPrecision::Bf16 || g.types.contains(&Dtype::Bf16) {
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

    /// [`Cuda::gemm`] with bf16 operands: the f32 ones are converted (round to nearest even) into scratch over the
    /// extent the product reads, then multiplied on the tensor cores with f32 accumulation into the result of C's
    /// type (`cublasGemmStridedBatchedEx`, compute type 32F).
    fn gemm_bf16(&self, g: Gemm) {
        let mut scratch = self.bf16_operands.lock().unwrap_or_else(|p| p.into_inner());
        let (slot_a, slot_b) = &mut *scratch;
        let (ea, eb) = operand_extents(&g);
        let [ta, tb, tc] = g.types;
        let a16 = match ta {
            Dtype::F32 => self.bf16_operand(slot_a, g.a, ea),
            Dtype::Bf16 => Some(g.a),
        };
        let b16 = match tb {
            Dtype::F32 => self.bf16_operand(slot_b, g.b, eb),
            Dtype::Bf16 => Some(g.b),
        };
        let (Some(a16), Some(b16)) = (a16, b16) else {
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
        let c_type = match tc {
            Dtype::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            Dtype::Bf16 => bf16,
        };
        // SAFETY: `c.a` and `c.b` are bf16 operands (the caller's bf16 views, or the scratch copies of its f32 ones
        // over their extents: same layout, so the same leading dimensions and strides), `g.c` the caller's checked
        // output of type `c_type`; alpha and beta are host f32 scalars read before the call returns; compute type
        // 32F matches their type.
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
                c_type,
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
    pub(super) fn to_bf16(&self, slot: &mut Grow<u16>, src: u64, len: usize) -> Option<u64> {
        let out = match slot.ensure(self.stream(), len) {
            Ok(s) => raw_ptr(s),
            Err(e) => {
                self.fail(e);
                return None;
            }
        };
        let len64 = len as u64;
        // SAFETY: matches f32_to_bf16 (convert.cu): `src` holds the `len` floats the product reads (its extent),
        // `out` at least `len` u16.
        let queued = unsafe {
            launch!(
                self,
                f32_to_bf16,
                cfg(grid(len, ESLM_EW_THREADS), ESLM_EW_THREADS),
                &out,
                &src,
                &len64
            )
        };
        queued.then_some(out)
    }
}
