//! Layer norm over the last dimension (eps = 1e-5): `μ = mean(x)`, `r = 1/√(var(x) + eps)` (biased variance),
//! `n = (x − μ)·r`, `y = n·w + b`.
//!
//! Backward per row (row-wise, so on a row set R it does K rows of work): `dn = dy·w`,
//! `dx = r·(dn − mean(dn) − n·mean(dn·n))`, `dw += Σ_R dy·n`, `db += Σ_R dy`.

use super::{Real, RowSet};
use rayon::prelude::*;

/// Layer-norm epsilon (GPT-2's).
pub const EPS: f64 = 1e-5;

/// Forward over `n` rows of width `c`; stores per-row mean and reciprocal std for the backward (if given).
#[allow(clippy::too_many_arguments)] // a kernel: its buffers and dims, explicitly (llm.c style)
pub fn forward<T: Real>(
    y: &mut [T],
    mean: Option<&mut [T]>,
    rstd: Option<&mut [T]>,
    x: &[T],
    w: &[T],
    b: &[T],
    n: usize,
    c: usize,
) {
    let inv_c = T::from_f64(1.0 / c as f64);
    let eps = T::from_f64(EPS);
    let run = |(yr, xr): (&mut [T], &[T])| -> (T, T) {
        let m = xr.iter().copied().sum::<T>() * inv_c;
        let var = xr.iter().map(|&v| (v - m) * (v - m)).sum::<T>() * inv_c;
        let r = T::ONE / (var + eps).sqrt();
        for ((o, &xv), (&wv, &bv)) in yr.iter_mut().zip(xr).zip(w.iter().zip(b)) {
            *o = (xv - m) * r * wv + bv;
        }
        (m, r)
    };
    let stats: Vec<(T, T)> = y[..n * c]
        .par_chunks_mut(c)
        .zip(x[..n * c].par_chunks(c))
        .with_min_len(16)
        .map(run)
        .collect();
    if let Some(mean) = mean {
        mean.iter_mut().zip(&stats).for_each(|(d, s)| *d = s.0);
    }
    if let Some(rstd) = rstd {
        rstd.iter_mut().zip(&stats).for_each(|(d, s)| *d = s.1);
    }
}

/// Backward on row set `rows`: `dy` and `dx` are compact `[K, c]` (`dx` overwritten); `x`, `mean`, `rstd` are
/// the dense forward values; accumulates `dw`, `db`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    dy: &[T],
    x: &[T],
    mean: &[T],
    rstd: &[T],
    w: &[T],
    rows: &RowSet,
    n: usize,
    c: usize,
) {
    let k = rows.count(n);
    let inv_c = T::from_f64(1.0 / c as f64);
    for j in 0..k {
        let i = match rows {
            RowSet::All => j,
            RowSet::Rows(r) => r[j] as usize,
        };
        let xr = &x[i * c..(i + 1) * c];
        let dyr = &dy[j * c..(j + 1) * c];
        let (m, r) = (mean[i], rstd[i]);
        let mut mean_dn = T::ZERO;
        let mut mean_dn_n = T::ZERO;
        for ((&xv, &g), &wv) in xr.iter().zip(dyr).zip(w) {
            let nv = (xv - m) * r;
            let dn = g * wv;
            mean_dn += dn;
            mean_dn_n += dn * nv;
        }
        mean_dn *= inv_c;
        mean_dn_n *= inv_c;
        let dxr = &mut dx[j * c..(j + 1) * c];
        for (idx, ((&xv, &g), &wv)) in xr.iter().zip(dyr).zip(w).enumerate() {
            let nv = (xv - m) * r;
            dw[idx] += g * nv;
            db[idx] += g;
            dxr[idx] = r * (g * wv - mean_dn - nv * mean_dn_n);
        }
    }
}
