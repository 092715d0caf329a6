//! GELU, tanh approximation (`kernels/gelu.cu`; CPU counterpart `crate::ops::gelu`), the backward on the kept
//! rows only.

use super::*;

pub(super) fn forward(cuda: &mut Cuda, y: DevViewMut<'_>, x: DevView<'_>) {
    let len = x.len;
    if len == 0 || !cuda.ready(&[("gelu y", y.len, len, y.ptr), ("gelu x", len, len, x.ptr)]) {
        return;
    }
    let Some(dt) = cuda.op_dtype(&[("gelu y", y.dtype), ("gelu x", x.dtype)], &[]) else {
        return;
    };
    let len64 = len as u64;
    // SAFETY: matches gelu_forward (gelu.cu; the twin of the activations' type); both hold len elements.
    unsafe {
        launch!(
            cuda,
            gelu_forward[dt],
            cfg(grid(len, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &y.ptr,
            &x.ptr,
            &len64
        )
    };
}

pub(super) fn backward(
    cuda: &mut Cuda,
    dx: DevViewMut<'_>,
    dy: RowGrad<'_, DevView<'_>>,
    x: DevView<'_>,
    width: usize,
) {
    let (rows, n) = (dy.rows, dy.n);
    let k = rows.count(n);
    if k == 0
        || !cuda.ready(&[
            ("gelu dx", dx.len, k * width, dx.ptr),
            ("gelu dy", dy.g.len, k * width, dy.g.ptr),
            ("gelu x", x.len, n * width, x.ptr),
        ])
    {
        return;
    }
    let acts = [
        ("gelu dx", dx.dtype),
        ("gelu dy", dy.g.dtype),
        ("gelu x", x.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &[]) else {
        return;
    };
    let Some(rows_p) = cuda.upload_rows(rows) else {
        return;
    };
    let (k64, w64) = (k as u64, width as u64);
    // SAFETY: matches gelu_backward (the twin of the activations' type); lengths checked, K row indices < n
    // uploaded.
    unsafe {
        launch!(
            cuda,
            gelu_backward[dt],
            cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &dx.ptr,
            &dy.g.ptr,
            &x.ptr,
            &rows_p,
            &k64,
            &w64
        )
    };
}
