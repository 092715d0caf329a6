//! The linear layers and the LM head (`kernels/linear.cu` for the bias; CPU counterpart `crate::ops::linear`):
//! cuBLAS products ([`Cuda::gemm`]) over the dense rows or the gathered kept rows, the bias as a separate kernel,
//! its gradient a deterministic column sum.

use super::epilogue::{Epilogue, FusedLinear};
use super::*;

/// The activation type of a forward linear layer when it can be queued: `n > 0`, every view of the stated length
/// (outputs `[n, out]` named in `outs`), the outputs and `x` of one type, the parameters f32; records a
/// mismatch.
fn forward_ready(
    cuda: &Cuda,
    outs: &[(&'static str, &DevViewMut<'_>)],
    x: DevView<'_>,
    p: Affine<DevView<'_>>,
    n: usize,
    d: LinearDims,
) -> Option<Dtype> {
    let LinearDims { d_in, d_out } = d;
    let mut views: Vec<(&'static str, usize, usize, u64)> = outs
        .iter()
        .map(|(name, v)| (*name, v.len, n * d_out, v.ptr))
        .collect();
    views.extend([
        ("linear x", x.len, n * d_in, x.ptr),
        ("linear w", p.w.len, d_out * d_in, p.w.ptr),
        ("linear b", p.b.len, d_out, p.b.ptr),
    ]);
    if n == 0 || !cuda.ready(&views) {
        return None;
    }
    let mut acts: Vec<(&'static str, Dtype)> = outs.iter().map(|(w, v)| (*w, v.dtype)).collect();
    acts.push(("linear x", x.dtype));
    cuda.op_dtype(&acts, &[("linear w", p.w.dtype), ("linear b", p.b.dtype)])
}

/// `y = x·Wᵀ + b`: one cuBLASLt product with the bias in its epilogue where it applies ([`super::epilogue`]),
/// else the bias broadcast then a GEMM accumulating onto it.
pub(super) fn forward(
    cuda: &mut Cuda,
    y: DevViewMut<'_>,
    x: DevView<'_>,
    p: Affine<DevView<'_>>,
    n: usize,
    d: LinearDims,
) -> f64 {
    let LinearDims { d_in, d_out } = d;
    let Some(dt) = forward_ready(cuda, &[("linear y", &y)], x, p, n, d) else {
        return 0.0;
    };
    let flops = 2.0 * (n * d_in * d_out) as f64;
    let fused = FusedLinear {
        x: x.ptr,
        w: p.w.ptr,
        b: p.b.ptr,
        y: y.ptr,
        aux: 0,
        n,
        d,
        epilogue: Epilogue::Bias,
        dtype: dt,
    };
    if cuda.fused_linear(fused) {
        return flops;
    }
    let (n64, w64) = (n as u64, d_out as u64);
    // SAFETY: matches bias_forward (linear.cu; the twin of y's type); y holds n·out elements, b out floats.
    if !unsafe {
        launch!(
            cuda,
            bias_forward[dt],
            cfg(grid(n * d_out, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &y.ptr,
            &p.b.ptr,
            &n64,
            &w64
        )
    } {
        return 0.0;
    }
    cuda.gemm(Gemm {
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
        types: [dt, Dtype::F32, dt],
    });
    flops
}

/// `pre = x·Wᵀ + b`, `post = GELU(pre)`: one cuBLASLt product with the bias and the GELU in its epilogue where it
/// applies ([`super::epilogue`]), else [`forward`] then the GELU kernel.
pub(super) fn forward_gelu(
    cuda: &mut Cuda,
    mut pre: DevViewMut<'_>,
    post: DevViewMut<'_>,
    x: DevView<'_>,
    p: Affine<DevView<'_>>,
    n: usize,
    d: LinearDims,
) -> f64 {
    let outs = [("linear pre", &pre), ("linear post", &post)];
    let Some(dt) = forward_ready(cuda, &outs, x, p, n, d) else {
        return 0.0;
    };
    let fused = FusedLinear {
        x: x.ptr,
        w: p.w.ptr,
        b: p.b.ptr,
        y: post.ptr,
        aux: pre.ptr,
        n,
        d,
        epilogue: Epilogue::GeluAuxBias,
        dtype: dt,
    };
    if cuda.fused_linear(fused) {
        return 2.0 * (n * d.d_in * d.d_out) as f64;
    }
    let flops = forward(cuda, Cuda::reborrow(&mut pre), x, p, n, d);
    gelu::forward(cuda, post, Cuda::freeze(&pre));
    flops
}

pub(super) fn backward(
    cuda: &mut Cuda,
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
        || !cuda.ready(&[
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
    let mut acts = vec![("linear dy", dy.g.dtype), ("linear x", x.dtype)];
    acts.extend(dx.as_ref().map(|v| ("linear dx", v.dtype)));
    let f32s = [
        ("linear dw", dp.w.dtype),
        ("linear db", dp.b.dtype),
        ("linear w", w.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &f32s) else {
        return 0.0;
    };
    let mut flops = 0.0;
    colsum_add(cuda, dp.b.ptr, (dy.g.ptr, dt), k, d_out);
    if let Some(dx) = dx {
        cuda.gemm(Gemm {
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
            types: [dt, Dtype::F32, dt],
        });
        flops += 2.0 * (k * d_in * d_out) as f64;
    }
    let Some(x_rows) = rows::rows_of(cuda, (x.ptr, dt), rows, n, d_in) else {
        return flops;
    };
    cuda.gemm(Gemm {
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
        types: [dt, dt, Dtype::F32],
    });
    flops + 2.0 * (k * d_in * d_out) as f64
}

pub(super) fn lm_head_forward(
    cuda: &mut Cuda,
    z: DevViewMut<'_>,
    h: DevView<'_>,
    wte: DevView<'_>,
    n: usize,
    d: HeadDims,
) -> f64 {
    let HeadDims { c, v, vp } = d;
    if n == 0
        || !cuda.ready(&[
            ("logits", z.len, (n - 1) * vp + v, z.ptr),
            ("lm head h", h.len, n * c, h.ptr),
            ("wte", wte.len, v * c, wte.ptr),
        ])
    {
        return 0.0;
    }
    let acts = [("logits", z.dtype), ("lm head h", h.dtype)];
    let Some(dt) = cuda.op_dtype(&acts, &[("wte", wte.dtype)]) else {
        return 0.0;
    };
    cuda.gemm(Gemm {
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
        types: [dt, Dtype::F32, dt],
    });
    2.0 * (n * c * v) as f64
}

pub(super) fn lm_head_backward(
    cuda: &mut Cuda,
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
        || !cuda.ready(&[
            ("lm head dh", dh.len, k * c, dh.ptr),
            ("dwte", dwte.len, v * c, dwte.ptr),
            ("dlogits", dz.g.len, (k - 1) * vp + v, dz.g.ptr),
            ("lm head h", h.len, n * c, h.ptr),
            ("wte", wte.len, v * c, wte.ptr),
        ])
    {
        return 0.0;
    }
    let acts = [
        ("lm head dh", dh.dtype),
        ("dlogits", dz.g.dtype),
        ("lm head h", h.dtype),
    ];
    let f32s = [("dwte", dwte.dtype), ("wte", wte.dtype)];
    let Some(dt) = cuda.op_dtype(&acts, &f32s) else {
        return 0.0;
    };
    cuda.gemm(Gemm {
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
        types: [dt, Dtype::F32, dt],
    });
    let Some(h_rows) = rows::rows_of(cuda, (h.ptr, dt), rows, n, c) else {
        return 2.0 * (k * c * v) as f64;
    };
    cuda.gemm(Gemm {
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
        types: [dt, dt, Dtype::F32],
    });
    4.0 * (k * c * v) as f64
}

/// Compact `[K, width]` column sums of `dy` (elements of the given type) added into the f32 `dst [width]` (the
/// bias gradient), deterministic.
pub(super) fn colsum_add(
    cuda: &mut Cuda,
    dst: u64,
    (dy, dt): (u64, Dtype),
    k: usize,
    width: usize,
) {
    let chunks = k.div_ceil(ESLM_COLSUM_ROWS as usize);
    if k == 0 || width == 0 || chunks > u16::MAX as usize {
        if chunks > u16::MAX as usize {
            cuda.fail(KernelError::Cuda(format!(
                "column sum over {k} rows: too many row chunks"
            )));
        }
        return;
    }
    let Some(partial) = cuda.scratch(1, chunks * width) else {
        return;
    };
    let (k64, w64, c64) = (k as u64, width as u64, chunks as u64);
    // SAFETY: matches colsum_partial (linear.cu; the twin of dy's type); partial holds chunks·width floats, dy
    // K·width elements.
    if !unsafe {
        launch!(
            cuda,
            colsum_partial[dt],
            chunk_grid(width, chunks, ESLM_EW_THREADS),
            &partial,
            &dy,
            &k64,
            &w64
        )
    } {
        return;
    }
    // SAFETY: matches colsum_reduce_add; dst holds width floats.
    unsafe {
        launch!(
            cuda,
            colsum_reduce_add,
            cfg(grid(width, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &dst,
            &partial,
            &c64,
            &w64
        )
    };
}
