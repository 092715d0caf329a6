//! GELU, tanh form (GPT-2's): `y = ½·x·(1 + tanh(u))`, `u = s·(x + 0.044715·x³)`, `s = √(2/π)`.
//! `dy/dx = ½·(1 + tanh u) + ½·x·(1 − tanh² u)·s·(1 + 3·0.044715·x²)`. Elementwise, so row-wise.

use super::{Real, RowSet};
use rayon::prelude::*;

const GELU_C: f64 = 0.044715;

#[inline(always)]
fn scale<T: Real>() -> T {
    T::from_f64((2.0 / std::f64::consts::PI).sqrt())
}

/// Forward on `len` elements.
pub fn forward<T: Real>(y: &mut [T], x: &[T]) {
    let s = scale::<T>();
    let c = T::from_f64(GELU_C);
    let half = T::from_f64(0.5);
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(yc, xc)| {
            for (o, &v) in yc.iter_mut().zip(xc) {
                let u = s * (v + c * v * v * v);
                *o = half * v * (T::ONE + u.fast_tanh());
            }
        });
}

/// Backward on row set `rows` with row width `width`: `dy`, `dx` compact `[K, width]` (`dx` overwritten), `x`
/// the dense forward input.
pub fn backward<T: Real>(dx: &mut [T], dy: &[T], x: &[T], rows: &RowSet, n: usize, width: usize) {
    let s = scale::<T>();
    let c = T::from_f64(GELU_C);
    let c3 = T::from_f64(3.0 * GELU_C);
    let half = T::from_f64(0.5);
    let k = rows.count(n);
    dx[..k * width]
        .par_chunks_mut(width)
        .zip(dy[..k * width].par_chunks(width))
        .enumerate()
        .for_each(|(j, (dxr, dyr))| {
            let i = match rows {
                RowSet::All => j,
                RowSet::Rows(r) => r[j] as usize,
            };
            let xr = &x[i * width..(i + 1) * width];
            for ((d, &g), &v) in dxr.iter_mut().zip(dyr).zip(xr) {
                let u = s * (v + c * v * v * v);
                let th = u.fast_tanh();
                let local = half * (T::ONE + th)
                    + half * v * (T::ONE - th * th) * s * (T::ONE + c3 * v * v);
                *d = g * local;
            }
        });
}
