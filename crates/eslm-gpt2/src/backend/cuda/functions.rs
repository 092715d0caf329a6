//! The engine's kernel functions (`ENGINE_FATBINS`, one module per `kernels/*.cu` family), loaded once.

use super::*;

/// The engine's kernels (`ENGINE_FATBINS`), loaded once.
#[derive(Debug)]
pub(super) struct Functions {
    pub(super) encoder_forward: CudaFunction,
    pub(super) encoder_backward_buckets: CudaFunction,
    pub(super) layernorm_forward: CudaFunction,
    pub(super) layernorm_backward_dx: CudaFunction,
    pub(super) layernorm_backward_params: CudaFunction,
    pub(super) layernorm_reduce_params: CudaFunction,
    pub(super) gelu_forward: CudaFunction,
    pub(super) gelu_backward: CudaFunction,
    pub(super) residual_forward: CudaFunction,
    pub(super) residual_merge: CudaFunction,
    pub(super) gather_rows: CudaFunction,
    pub(super) scatter_add_rows: CudaFunction,
    pub(super) attention_softmax_forward: CudaFunction,
    pub(super) attention_softmax_backward: CudaFunction,
    pub(super) adamw_update: CudaFunction,
    pub(super) sum_squares_partial: CudaFunction,
    pub(super) sum_squares_final: CudaFunction,
    pub(super) scale_rows: CudaFunction,
    pub(super) bias_forward: CudaFunction,
    pub(super) colsum_partial: CudaFunction,
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
