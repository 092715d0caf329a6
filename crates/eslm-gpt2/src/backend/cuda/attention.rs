//! Causal self-attention (`kernels/attention.cu`; CPU counterpart `crate::ops::attention`), llm.c's layout:
//! `S = Q·Kᵀ` and `Y = P·V` as cuBLAS products batched over the heads of each sequence, a fused scaled causal
//! softmax in between; `P [B, H, T, T]` is stored for the backward.

use super::*;

pub(super) fn forward(
    cuda: &mut Cuda,
    y: DevViewMut<'_>,
    att: DevViewMut<'_>,
    qkv: DevView<'_>,
    d: AttnDims,
) -> f64 {
    let AttnDims { b, t, c, nh } = d;
    if b * t == 0
        || nh == 0
        || !cuda.ready(&[
            ("attention y", y.len, b * t * c, y.ptr),
            ("attention att", att.len, b * nh * t * t, att.ptr),
            ("attention qkv", qkv.len, b * t * 3 * c, qkv.ptr),
        ])
    {
        return 0.0;
    }
    let acts = [
        ("attention y", y.dtype),
        ("attention att", att.dtype),
        ("attention qkv", qkv.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &[]) else {
        return 0.0;
    };
    let o = |p: u64, elems: usize| at(p, elems, dt);
    let hs = c / nh;
    for bi in 0..b {
        let base = o(qkv.ptr, bi * t * 3 * c);
        cuda.gemm(Gemm {
            ta: false,
            tb: true,
            m: t,
            n: t,
            k: hs,
            a: base,
            lda: 3 * c,
            sa: hs,
            b: o(base, c),
            ldb: 3 * c,
            sb: hs,
            c: o(att.ptr, bi * nh * t * t),
            ldc: t,
            sc: t * t,
            batch: nh,
            beta: 0.0,
            types: [dt; 3],
        });
    }
    let (rows, t64) = (b * nh * t, t as u64);
    let rows64 = rows as u64;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    if cuda.healthy() {
        // SAFETY: matches attention_softmax_forward (attention.cu; the twin of att's type); att holds B·H·T·T
        // elements.
        unsafe {
            launch!(
                cuda,
                attention_softmax_forward[dt],
                cfg(warp_grid(rows, ESLM_ATT_THREADS), ESLM_ATT_THREADS),
                &att.ptr,
                &rows64,
                &t64,
                &scale
            )
        };
    }
    for bi in 0..b {
        let base = o(qkv.ptr, bi * t * 3 * c);
        cuda.gemm(Gemm {
            ta: false,
            tb: false,
            m: t,
            n: hs,
            k: t,
            a: o(att.ptr, bi * nh * t * t),
            lda: t,
            sa: t * t,
            b: o(base, 2 * c),
            ldb: 3 * c,
            sb: hs,
            c: o(y.ptr, bi * t * c),
            ldc: c,
            sc: hs,
            batch: nh,
            beta: 0.0,
            types: [dt; 3],
        });
    }
    4.0 * (b * t * t * c) as f64
}

pub(super) fn backward(
    cuda: &mut Cuda,
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
        || !cuda.ready(&[
            ("attention dqkv", dqkv.len, b * t * 3 * c, dqkv.ptr),
            ("attention dy", dy.g.len, k * c, dy.g.ptr),
            ("attention qkv", qkv.len, b * t * 3 * c, qkv.ptr),
            ("attention att", att.len, b * nh * t * t, att.ptr),
        ])
    {
        return 0.0;
    }
    let acts = [
        ("attention dqkv", dqkv.dtype),
        ("attention dy", dy.g.dtype),
        ("attention qkv", qkv.dtype),
        ("attention att", att.dtype),
    ];
    let Some(dt) = cuda.op_dtype(&acts, &[]) else {
        return 0.0;
    };
    let o = |p: u64, elems: usize| at(p, elems, dt);
    let hs = c / nh;
    // Dense dY [B·T, C]: the kept rows' gradient, zeros elsewhere.
    let dy_dense = match rows {
        RowSet::All => dy.g.ptr,
        RowSet::Rows(_) => {
            let Some(dense) = cuda.scratch_of(0, b * t * c, dt) else {
                return 0.0;
            };
            let dense_view = || DevViewMut {
                ptr: dense,
                len: b * t * c,
                dtype: dt,
                _buf: PhantomData,
            };
            cuda.fill_zero(dense_view());
            let dst = dense_view();
            cuda.scatter_add_rows(dst, dy, c);
            dense
        }
    };
    let Some(datt) = cuda.scratch_of(2, b * nh * t * t, dt) else {
        return 0.0;
    };
    for bi in 0..b {
        let base = o(qkv.ptr, bi * t * 3 * c);
        cuda.gemm(Gemm {
            ta: false,
            tb: true,
            m: t,
            n: t,
            k: hs,
            a: o(dy_dense, bi * t * c),
            lda: c,
            sa: hs,
            b: o(base, 2 * c),
            ldb: 3 * c,
            sb: hs,
            c: o(datt, bi * nh * t * t),
            ldc: t,
            sc: t * t,
            batch: nh,
            beta: 0.0,
            types: [dt; 3],
        });
    }
    let (nrows, t64) = (b * nh * t, t as u64);
    let rows64 = nrows as u64;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    if cuda.healthy() {
        // SAFETY: matches attention_softmax_backward (the twin of the activations' type); datt and att hold
        // B·H·T·T elements.
        unsafe {
            launch!(
                cuda,
                attention_softmax_backward[dt],
                cfg(warp_grid(nrows, ESLM_ATT_THREADS), ESLM_ATT_THREADS),
                &datt,
                &att.ptr,
                &rows64,
                &t64,
                &scale
            )
        };
    }
    for bi in 0..b {
        let base = o(qkv.ptr, bi * t * 3 * c);
        let dbase = o(dqkv.ptr, bi * t * 3 * c);
        let ds = o(datt, bi * nh * t * t);
        let p = o(att.ptr, bi * nh * t * t);
        let dyb = o(dy_dense, bi * t * c);
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
            types: [dt; 3],
        };
        // dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dY (every column of dqkv written: beta 0 overwrites).
        cuda.gemm(g(false, ds, t, t * t, o(base, c), 3 * c, dbase));
        cuda.gemm(g(true, ds, t, t * t, base, 3 * c, o(dbase, c)));
        cuda.gemm(g(true, p, t, t * t, dyb, c, o(dbase, 2 * c)));
    }
    8.0 * (b * t * t * c) as f64
}
