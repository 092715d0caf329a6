//! Linear layer `y = x·Wᵀ + b` with `W` stored `[out, in]` (llm.c layout), and the tied LM head `z = h·Wteᵀ`
//! (no bias, `V` real columns written into rows of stride `Vp`).
//!
//! Backward on the row set R (K rows; compact `dy [K, out]`): `dW += dy_Rᵀ·x_R`, `db += Σ_R dy`,
//! `dx_R = dy_R·W`. Rows outside R have zero gradient, so this is exact and costs K rows of work.

use super::matmul::{matmul, Mat};
use super::{gather, Real, RowSet};

/// Forward: `y[n, out] = x[n, in]·Wᵀ + b`. Returns FLOPs.
pub fn forward<T: Real>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    n: usize,
    d_in: usize,
    d_out: usize,
) -> f64 {
    let acc = match b {
        Some(b) => {
            for row in y[..n * d_out].chunks_exact_mut(d_out) {
                row.copy_from_slice(&b[..d_out]);
            }
            true
        }
        None => false,
    };
    matmul(
        n,
        d_out,
        d_in,
        y,
        d_out,
        acc,
        Mat::rows(x, d_in),
        Mat::transposed(w, d_in),
    )
}

/// Backward on row set `rows`: `dy` is compact `[K, d_out]` with row stride `dy_rs`; writes compact
/// `dx [K, d_in]` (if given), accumulates `dw` and `db`. `x` is the dense forward input `[n, d_in]`;
/// `scratch` holds at least `K·d_in` elements (used only for a row subset). Returns FLOPs.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
    dy: &[T],
    dy_rs: usize,
    x: &[T],
    w: &[T],
    rows: &RowSet,
    n: usize,
    d_in: usize,
    d_out: usize,
    scratch: &mut [T],
) -> f64 {
    let k = rows.count(n);
    let mut flops = 0.0;
    if let Some(db) = db {
        for row in dy.chunks(dy_rs).take(k) {
            db.iter_mut().zip(&row[..d_out]).for_each(|(d, &g)| *d += g);
        }
    }
    if let Some(dx) = dx {
        flops += matmul(
            k,
            d_in,
            d_out,
            dx,
            d_in,
            false,
            Mat::rows(dy, dy_rs),
            Mat::rows(w, d_in),
        );
    }
    let xk = gather(&x[..n * d_in], d_in, rows, scratch);
    flops += matmul(
        d_out,
        d_in,
        k,
        dw,
        d_in,
        true,
        Mat::transposed(dy, dy_rs),
        Mat::rows(xk, d_in),
    );
    flops
}

/// Tied LM head forward: `z[n, 0..v] = h[n, c]·Wteᵀ` with `z` rows of stride `vp` (padded columns untouched).
/// Returns FLOPs.
pub fn lm_head_forward<T: Real>(
    z: &mut [T],
    h: &[T],
    wte: &[T],
    n: usize,
    c: usize,
    v: usize,
    vp: usize,
) -> f64 {
    matmul(
        n,
        v,
        c,
        z,
        vp,
        false,
        Mat::rows(h, c),
        Mat::transposed(wte, c),
    )
}

/// Tied LM head backward on row set `rows`: `dz` compact `[K, vp]` (first `v` columns used),
/// `dwte[0..v] += dzᵀ·h_R`, `dh = dz·Wte` compact `[K, c]`. Returns FLOPs.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_backward<T: Real>(
    dh: &mut [T],
    dwte: &mut [T],
    dz: &[T],
    h: &[T],
    wte: &[T],
    rows: &RowSet,
    n: usize,
    c: usize,
    v: usize,
    vp: usize,
    scratch: &mut [T],
) -> f64 {
    let k = rows.count(n);
    let mut flops = matmul(k, c, v, dh, c, false, Mat::rows(dz, vp), Mat::rows(wte, c));
    let hk = gather(&h[..n * c], c, rows, scratch);
    flops += matmul(
        v,
        c,
        k,
        dwte,
        c,
        true,
        Mat::transposed(dz, vp),
        Mat::rows(hk, c),
    );
    flops
}
