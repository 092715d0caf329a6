//! Residual adds (`kernels/residual.cu`; CPU counterpart `crate::ops::residual`): the dense forward and the
//! merge of two row-sparse gradients into the union of their rows ([`merge_maps`]).

use super::*;

pub(super) fn forward(cuda: &mut Cuda, out: DevViewMut<'_>, a: DevView<'_>, b: DevView<'_>) {
    let len = out.len;
    if len == 0
        || !cuda.ready(&[
            ("residual out", len, len, out.ptr),
            ("residual a", a.len, len, a.ptr),
            ("residual b", b.len, len, b.ptr),
        ])
    {
        return;
    }
    let acts = [
        ("residual out", out.dtype),
        ("residual a", a.dtype),
        ("residual b", b.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &[]) else {
        return;
    };
    let len64 = len as u64;
    // SAFETY: matches residual_forward (residual.cu; the twin of the activations' type); all hold len elements.
    unsafe {
        launch!(
            cuda,
            residual_forward[dt],
            cfg(grid(len, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &out.ptr,
            &a.ptr,
            &b.ptr,
            &len64
        )
    };
}

pub(super) fn merge(
    cuda: &mut Cuda,
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
            dtype: out.dtype,
            _buf: PhantomData,
        };
        if out.len == len {
            cuda.residual_forward(out, Cuda::slice(a.g, 0..len), Cuda::slice(b.g, 0..len));
        } else {
            cuda.ready(&[("residual merge out", out.len, len, out.ptr)]);
        }
        return a.rows.clone();
    };
    let k = union.count(n);
    if k == 0
        || !cuda.ready(&[
            ("residual merge out", out.len, k * width, out.ptr),
            ("residual merge a", a.g.len, ka * width, a.g.ptr),
            ("residual merge b", b.g.len, kb * width, b.g.ptr),
        ])
    {
        return union;
    }
    let acts = [
        ("residual merge out", out.dtype),
        ("residual merge a", a.g.dtype),
        ("residual merge b", b.g.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &[]) else {
        return union;
    };
    let mut maps: Vec<u32> = ia.iter().map(|&x| x as u32).collect();
    maps.extend(ib.iter().map(|&x| x as u32));
    let Some(base) = cuda.upload_idx(&maps) else {
        return union;
    };
    let ib_p = base + 4 * k as u64;
    let (k64, w64) = (k as u64, width as u64);
    // SAFETY: matches residual_merge; every map entry is -1 or a row of its compact buffer.
    unsafe {
        launch!(
            cuda,
            residual_merge[dt],
            cfg(grid(k * width, ESLM_EW_THREADS), ESLM_EW_THREADS),
            &out.ptr,
            &a.g.ptr,
            &base,
            &b.g.ptr,
            &ib_p,
            &k64,
            &w64
        )
    };
    union
}
