//! The engine's kernel functions (`ENGINE_FATBINS`, one module per `kernels/*.cu` family), loaded once.

use super::*;

/// A kernel and its bf16-activation twin (`NAME` and `NAME_bf16`, `ESLM_TWINS` in kernels/common.cuh).
#[derive(Debug)]
pub(super) struct Twin {
    f32: CudaFunction,
    bf16: CudaFunction,
}

impl Twin {
    /// The kernel for activations of type `dtype`.
    pub(super) fn get(&self, dtype: Dtype) -> &CudaFunction {
        match dtype {
            Dtype::F32 => &self.f32,
            Dtype::Bf16 => &self.bf16,
        }
    }
}

/// The engine's kernels (`ENGINE_FATBINS`), loaded once.
#[derive(Debug)]
pub(super) struct Functions {
    pub(super) encoder_forward: Twin,
    pub(super) encoder_backward_buckets: Twin,
    pub(super) layernorm_forward: Twin,
    pub(super) layernorm_backward_dx: Twin,
    pub(super) layernorm_backward_params: Twin,
    pub(super) layernorm_reduce_params: CudaFunction,
    pub(super) gelu_forward: Twin,
    pub(super) gelu_backward: Twin,
    pub(super) residual_forward: Twin,
    pub(super) residual_merge: Twin,
    pub(super) gather_rows: Twin,
    pub(super) scatter_add_rows: Twin,
    pub(super) attention_softmax_forward: Twin,
    pub(super) attention_softmax_backward: Twin,
    pub(super) adamw_update: CudaFunction,
    pub(super) sum_squares_partial: CudaFunction,
    pub(super) sum_squares_final: CudaFunction,
    pub(super) scale_rows: Twin,
    pub(super) bias_forward: Twin,
    pub(super) colsum_partial: Twin,
    pub(super) colsum_reduce_add: CudaFunction,
    pub(super) kd_grad_rows: CudaFunction,
    pub(super) f32_to_bf16: CudaFunction,
}

impl Functions {
    pub(super) fn load(modules: &[(&str, Arc<CudaModule>)]) -> Result<Self> {
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
        let twin = |family: &str, name: &str| -> Result<Twin> {
            Ok(Twin {
                f32: f(family, name)?,
                bf16: f(family, &format!("{name}_bf16"))?,
            })
        };
        Ok(Self {
            encoder_forward: twin("encoder", "encoder_forward")?,
            encoder_backward_buckets: twin("encoder", "encoder_backward_buckets")?,
            layernorm_forward: twin("layernorm", "layernorm_forward")?,
            layernorm_backward_dx: twin("layernorm", "layernorm_backward_dx")?,
            layernorm_backward_params: twin("layernorm", "layernorm_backward_params")?,
            layernorm_reduce_params: f("layernorm", "layernorm_reduce_params")?,
            gelu_forward: twin("gelu", "gelu_forward")?,
            gelu_backward: twin("gelu", "gelu_backward")?,
            residual_forward: twin("residual", "residual_forward")?,
            residual_merge: twin("residual", "residual_merge")?,
            gather_rows: twin("rows", "gather_rows")?,
            scatter_add_rows: twin("rows", "scatter_add_rows")?,
            attention_softmax_forward: twin("attention", "attention_softmax_forward")?,
            attention_softmax_backward: twin("attention", "attention_softmax_backward")?,
            adamw_update: f("adamw", "adamw_update")?,
            sum_squares_partial: f("global_norm", "sum_squares_partial")?,
            sum_squares_final: f("global_norm", "sum_squares_final")?,
            scale_rows: twin("scale", "scale_rows")?,
            bias_forward: twin("linear", "bias_forward")?,
            colsum_partial: twin("linear", "colsum_partial")?,
            colsum_reduce_add: f("linear", "colsum_reduce_add")?,
            kd_grad_rows: f("kd", "kd_grad_rows")?,
            f32_to_bf16: f("convert", "f32_to_bf16")?,
        })
    }
}
