//! The layer-norm family (`kernels/layernorm.cu`; CPU counterpart `crate::ops::layernorm`): one warp per row
//! forward; the backward writes the kept rows' `dx` and reduces `dw`, `db` over row chunks in a fixed order.

use super::*;

pub(super) fn forward(
    cuda: &mut Cuda,
    y: DevViewMut<'_>,
    stats: LnStats<DevViewMut<'_>>,
    x: DevView<'_>,
    p: Affine<DevView<'_>>,
    n: usize,
    c: usize,
) {
    if n == 0
        || !cuda.ready(&[
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
    let acts = [("layernorm y", y.dtype), ("layernorm x", x.dtype)];
    let f32s = [
        ("layernorm mean", stats.mean.dtype),
        ("layernorm rstd", stats.rstd.dtype),
        ("layernorm w", p.w.dtype),
        ("layernorm b", p.b.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &f32s) else {
        return;
    };
    let (n64, c64) = (n as u64, c as u64);
    // SAFETY: matches layernorm_forward (layernorm.cu; the twin of the activations' type); lengths checked above.
    unsafe {
        launch!(
            cuda,
            layernorm_forward[dt],
            cfg(warp_grid(n, ESLM_LN_THREADS), ESLM_LN_THREADS),
            &y.ptr,
            &stats.mean.ptr,
            &stats.rstd.ptr,
            &x.ptr,
            &p.w.ptr,
            &p.b.ptr,
            &n64,
            &c64
        )
    };
}

pub(super) fn backward(
    cuda: &mut Cuda,
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
        || !cuda.ready(&[
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
    let acts = [
        ("layernorm dx", dx.dtype),
        ("layernorm dy", dy.g.dtype),
        ("layernorm x", saved.x.dtype),
    ];
    let f32s = [
        ("layernorm dw", dp.w.dtype),
        ("layernorm db", dp.b.dtype),
        ("layernorm mean", saved.stats.mean.dtype),
        ("layernorm rstd", saved.stats.rstd.dtype),
        ("layernorm w", saved.w.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &f32s) else {
        return;
    };
    if chunks > u16::MAX as usize {
        cuda.fail(KernelError::Cuda(format!(
            "layernorm backward over {k} rows: too many row chunks"
        )));
        return;
    }
    let Some(rows_p) = cuda.upload_rows(rows) else {
        return;
    };
    let Some(partial) = cuda.scratch(1, chunks * 2 * c) else {
        return;
    };
    let (k64, c64, ch64) = (k as u64, c as u64, chunks as u64);
    let (mean, rstd) = (saved.stats.mean.ptr, saved.stats.rstd.ptr);
    // SAFETY: matches layernorm_backward_dx; lengths checked above, row list uploaded (K entries < n).
    if !unsafe {
        launch!(
            cuda,
            layernorm_backward_dx[dt],
            cfg(warp_grid(k, ESLM_LN_THREADS), ESLM_LN_THREADS),
            &dx.ptr,
            &dy.g.ptr,
            &saved.x.ptr,
            &mean,
            &rstd,
            &saved.w.ptr,
            &rows_p,
            &k64,
            &c64
        )
    } {
        return;
    }
    // SAFETY: matches layernorm_backward_params; partial holds chunks·2C floats.
    if !unsafe {
        launch!(
            cuda,
            layernorm_backward_params[dt],
            chunk_grid(c, chunks, ESLM_LN_THREADS),
            &partial,
            &dy.g.ptr,
            &saved.x.ptr,
            &mean,
            &rstd,
            &rows_p,
            &k64,
            &c64
        )
    } {
        return;
    }
    // SAFETY: matches layernorm_reduce_params; dw, db hold C floats.
    unsafe {
        launch!(
            cuda,
            layernorm_reduce_params,
            cfg(grid(c, ESLM_LN_THREADS), ESLM_LN_THREADS),
            &dp.w.ptr,
            &dp.b.ptr,
            &partial,
            &ch64,
            &c64
        )
    };
}
