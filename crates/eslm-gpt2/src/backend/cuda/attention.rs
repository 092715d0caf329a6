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
    let hs = c / nh;
    for bi in 0..b {
        let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
        cuda.gemm(Gemm {
            ta: false,
            tb: true,
            m: t,
            n: t,
            k: hs,
            a: base,
            lda: 3 * c,
            sa: hs,
            b: base + 4 * c as u64,
            ldb: 3 * c,
            sb: hs,
            c: att.ptr + 4 * (bi * nh * t * t) as u64,
            ldc: t,
            sc: t * t,
            batch: nh,
            beta: 0.0,
        });
    }
    let (rows, t64) = (b * nh * t, t as u64);
    let rows64 = rows as u64;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    if cuda.healthy() {
        // SAFETY: matches attention_softmax_forward (attention.cu); att holds B·H·T·T floats.
        unsafe {
            launch!(
                cuda,
                attention_softmax_forward,
                cfg(warp_grid(rows, ESLM_ATT_THREADS), ESLM_ATT_THREADS),
                &att.ptr,
                &rows64,
                &t64,
                &scale
            )
        };
    }
    for bi in 0..b {
        let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
        cuda.gemm(Gemm {
            ta: false,
            tb: false,
            m: t,
            n: hs,
            k: t,
            a: att.ptr + 4 * (bi * nh * t * t) as u64,
            lda: t,
            sa: t * t,
            b: base + 4 * (2 * c) as u64,
            ldb: 3 * c,
            sb: hs,
            c: y.ptr + 4 * (bi * t * c) as u64,
            ldc: c,
            sc: hs,
            batch: nh,
            beta: 0.0,
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
    let hs = c / nh;
    // Dense dY [B·T, C]: the kept rows' gradient, zeros elsewhere.
    let dy_dense = match rows {
        RowSet::All => dy.g.ptr,
        RowSet::Rows(_) => {
            let Some(dense) = cuda.scratch(0, b * t * c) else {
                return 0.0;
            };
            let view = DevViewMut {
                ptr: dense,
                len: b * t * c,
                _buf: PhantomData,
            };
            cuda.fill_zero(view);
            let dst = DevViewMut {
                ptr: dense,
                len: b * t * c,
                _buf: PhantomData,
            };
            cuda.scatter_add_rows(dst, dy, c);
            dense
        }
    };
    let Some(datt) = cuda.scratch(2, b * nh * t * t) else {
        return 0.0;
    };
    for bi in 0..b {
        let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
        cuda.gemm(Gemm {
            ta: false,
            tb: true,
            m: t,
            n: t,
            k: hs,
            a: dy_dense + 4 * (bi * t * c) as u64,
            lda: c,
            sa: hs,
            b: base + 4 * (2 * c) as u64,
            ldb: 3 * c,
            sb: hs,
            c: datt + 4 * (bi * nh * t * t) as u64,
            ldc: t,
            sc: t * t,
            batch: nh,
            beta: 0.0,
        });
    }
    let (nrows, t64) = (b * nh * t, t as u64);
    let rows64 = nrows as u64;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    if cuda.healthy() {
        // SAFETY: matches attention_softmax_backward; datt and att hold B·H·T·T floats.
        unsafe {
            launch!(
                cuda,
                attention_softmax_backward,
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
        let base = qkv.ptr + 4 * (bi * t * 3 * c) as u64;
        let dbase = dqkv.ptr + 4 * (bi * t * 3 * c) as u64;
        let ds = datt + 4 * (bi * nh * t * t) as u64;
        let p = att.ptr + 4 * (bi * nh * t * t) as u64;
        let dyb = dy_dense + 4 * (bi * t * c) as u64;
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
        };
        // dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dY (every column of dqkv written: beta 0 overwrites).
        cuda.gemm(g(false, ds, t, t * t, base + 4 * c as u64, 3 * c, dbase));
        cuda.gemm(g(true, ds, t, t * t, base, 3 * c, dbase + 4 * c as u64));
        cuda.gemm(g(true, p, t, t * t, dyb, c, dbase + 4 * (2 * c) as u64));
    }
    8.0 * (b * t * t * c) as f64
}
