//! The optimizer step (`kernels/adamw.cu`, `kernels/global_norm.cu`; CPU counterpart `crate::optim`): fused
//! AdamW with the decay flag, and the reproducible sum of squares for the global gradient norm.

use super::*;

pub(super) fn adamw(
    cuda: &mut Cuda,
    t: AdamWSlices<DevViewMut<'_>, DevView<'_>>,
    decays: bool,
    step: &AdamWStep,
) {
    let len = t.p.len;
    if len == 0
        || !cuda.ready(&[
            ("adamw p", len, len, t.p.ptr),
            ("adamw g", t.g.len, len, t.g.ptr),
            ("adamw m", t.m.len, len, t.m.ptr),
            ("adamw v", t.v.len, len, t.v.ptr),
        ])
    {
        return;
    }
    let f32s = [
        ("adamw p", t.p.dtype),
        ("adamw g", t.g.dtype),
        ("adamw m", t.m.dtype),
        ("adamw v", t.v.dtype),
    ];
    if cuda.op_dtype(&[], &f32s).is_none() {
        return;
    }
    cuda.touched(t.p.ptr, len, t.p.dtype);
    let [beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale] = step.kernel_args(decays);
    let len64 = len as u64;
    // SAFETY: matches adamw_update (adamw.cu); all four hold len floats.
    unsafe {
        launch!(
            cuda,
            adamw_update,
            cfg(grid(len, ESLM_ADAMW_THREADS), ESLM_ADAMW_THREADS),
            &t.p.ptr,
            &t.g.ptr,
            &t.m.ptr,
            &t.v.ptr,
            &len64,
            &beta1,
            &beta2,
            &eps,
            &step_size,
            &inv_sqrt_bc2,
            &decay,
            &grad_scale
        )
    };
}

pub(super) fn sum_squares(cuda: &Cuda, x: DevView<'_>) -> f64 {
    if x.len == 0 {
        return 0.0;
    }
    if !cuda.ready(&[("sum_squares x", x.len, x.len, x.ptr)])
        || cuda.op_dtype(&[], &[("sum_squares x", x.dtype)]).is_none()
    {
        return f64::NAN;
    }
    let _guard = cuda.norm_lock.lock().unwrap_or_else(|p| p.into_inner());
    let base = raw_ptr(&cuda.norm);
    let total = base + 8 * ESLM_NORM_BLOCKS as u64;
    let (len64, blocks64) = (x.len as u64, ESLM_NORM_BLOCKS as u64);
    // SAFETY: matches sum_squares_partial (global_norm.cu): exactly ESLM_NORM_BLOCKS blocks write one partial
    // each into `norm` (ESLM_NORM_BLOCKS + 1 doubles).
    if !unsafe {
        launch!(
            cuda,
            sum_squares_partial,
            cfg(ESLM_NORM_BLOCKS, ESLM_NORM_THREADS),
            &base,
            &x.ptr,
            &len64
        )
    } {
        return f64::NAN;
    }
    // SAFETY: matches sum_squares_final; writes the last double of `norm`.
    if !unsafe {
        launch!(
            cuda,
            sum_squares_final,
            cfg(1, ESLM_NORM_THREADS),
            &total,
            &base,
            &blocks64
        )
    } {
        return f64::NAN;
    }
    let mut out = [0.0f64];
    // SAFETY: `total` is one double of `norm`; synchronised before `out` is read.
    let r = unsafe { drv::memcpy_dtoh_async(&mut out[..], total, cuda.stream().cu_stream()) };
    if cuda.check(r) && cuda.check(cuda.stream().synchronize()) {
        out[0]
    } else {
        f64::NAN
    }
}
