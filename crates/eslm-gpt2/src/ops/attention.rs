//! Causal multi-head self-attention on the fused `qkv [N, 3C]` (per row: q | k | v, heads of size `hs = C/H`
//! side by side). Per sequence b and head h: `S = Q·Kᵀ/√hs`, `P = softmax(S + causal mask)` (stored
//! `[B, H, T, T]` for the backward, zeros above the diagonal), `Y = P·V`, written into `y [N, C]`.
//!
//! Backward for the query rows `Q_R` of the row set (K_b rows in sequence b; `dY` compact): with
//! `tmax = max(R_b) + 1` (later keys get no gradient),
//! `dP = dY·Vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP)) / √hs`, `dQ_R = dS·K`, `dK += dSᵀ·Q_R`, `dV += Pᵀ·dY`.
//! Rows mix here: keys and values of all earlier positions receive gradient, so the output `dqkv` is dense.
//!
//! Both directions work in blocks of [`BLOCK`] query rows, each multiplying only against the keys it can see
//! (about half the FLOPs of the full `T×T` products for long sequences).

use super::matmul::{matmul_serial, Mat};
use super::{Real, RowSet};
use rayon::prelude::*;

/// Query rows per causal block: a block of rows `i0..i1` only multiplies against keys `0..i1`.
pub const BLOCK: usize = 32;

/// Dimensions of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    /// Batch size B.
    pub b: usize,
    /// Sequence length T.
    pub t: usize,
    /// Width C.
    pub c: usize,
    /// Heads H.
    pub nh: usize,
}

/// FLOPs of one [`forward`] call (the blocked causal products, all heads).
pub fn forward_flops(d: AttnDims) -> f64 {
    let blocks: usize = (0..d.t)
        .step_by(BLOCK)
        .map(|i0| {
            let i1 = (i0 + BLOCK).min(d.t);
            (i1 - i0) * i1
        })
        .sum();
    4.0 * (d.b * blocks * d.c) as f64
}

/// Forward. `y [B·T, C]`, `att [B, H, T, T]`, `qkv [B·T, 3C]`. Returns FLOPs.
pub fn forward<T: Real>(y: &mut [T], att: &mut [T], qkv: &[T], d: AttnDims) -> f64 {
    let AttnDims { b, t, c, nh } = d;
    let hs = c / nh;
    let scale = T::from_f64(1.0 / (hs as f64).sqrt());
    let flops: f64 = y[..b * t * c]
        .par_chunks_mut(t * c)
        .zip(att[..b * nh * t * t].par_chunks_mut(nh * t * t))
        .enumerate()
        .map(|(bi, (yb, attb))| {
            let qkvb = &qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c];
            let mut flops = 0.0;
            for h in 0..nh {
                let p = &mut attb[h * t * t..(h + 1) * t * t];
                let kt = Mat::transposed(&qkvb[c + h * hs..], 3 * c);
                let v = Mat::rows(&qkvb[2 * c + h * hs..], 3 * c);
                // Causal: query rows i0..i1 only need keys 0..i1.
                for i0 in (0..t).step_by(BLOCK) {
                    let i1 = (i0 + BLOCK).min(t);
                    let rows = i1 - i0;
                    let q = Mat::rows(&qkvb[i0 * 3 * c + h * hs..], 3 * c);
                    flops += matmul_serial(rows, i1, hs, &mut p[i0 * t..], t, false, q, kt);
                    for i in i0..i1 {
                        let row = &mut p[i * t..(i + 1) * t];
                        let mut m = row[0] * scale;
                        for &s in &row[1..=i] {
                            m = m.max(s * scale);
                        }
                        let mut sum = T::ZERO;
                        for s in &mut row[..=i] {
                            *s = (*s * scale - m).exp();
                            sum += *s;
                        }
                        let inv = T::ONE / sum;
                        row[..=i].iter_mut().for_each(|s| *s *= inv);
                        row[i + 1..].iter_mut().for_each(|s| *s = T::ZERO);
                    }
                    let pb = Mat::rows(&p[i0 * t..], t);
                    flops +=
                        matmul_serial(rows, hs, i1, &mut yb[i0 * c + h * hs..], c, false, pb, v);
                }
            }
            flops
        })
        .sum();
    flops
}

/// Backward on row set `rows` (query rows with non-zero `dy`): `dy` compact `[K, C]`; writes the dense
/// `dqkv [B·T, 3C]` (fully overwritten). Returns FLOPs.
pub fn backward<T: Real>(
    dqkv: &mut [T],
    dy: &[T],
    qkv: &[T],
    att: &[T],
    rows: &RowSet,
    d: AttnDims,
) -> f64 {
    let AttnDims { b, t, c, nh } = d;
    let hs = c / nh;
    let scale = T::from_f64(1.0 / (hs as f64).sqrt());
    // Per sequence: the range of compact rows it owns and their local positions.
    let spans: Vec<(usize, Vec<usize>)> = (0..b)
        .map(|bi| match rows {
            RowSet::All => (bi * t, (0..t).collect()),
            RowSet::Rows(r) => {
                let lo = r.partition_point(|&x| (x as usize) < bi * t);
                let hi = r.partition_point(|&x| (x as usize) < (bi + 1) * t);
                (lo, r[lo..hi].iter().map(|&x| x as usize - bi * t).collect())
            }
        })
        .collect();
    dqkv[..b * t * 3 * c]
        .par_chunks_mut(t * 3 * c)
        .zip(spans.par_iter())
        .enumerate()
        .map(|(bi, (dqkvb, (start, qrows)))| {
            dqkvb.iter_mut().for_each(|x| *x = T::ZERO);
            let kb = qrows.len();
            if kb == 0 {
                return 0.0;
            }
            let qkvb = &qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c];
            let dyb = &dy[start * c..(start + kb) * c];
            let tcap = qrows[kb - 1] + 1;
            let blk = kb.min(BLOCK);
            let mut pk = vec![T::ZERO; blk * tcap];
            let mut dp = vec![T::ZERO; blk * tcap];
            let mut qk = vec![T::ZERO; blk * hs];
            let mut dq = vec![T::ZERO; blk * hs];
            let mut flops = 0.0;
            for h in 0..nh {
                let p = &att[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t];
                let vt = Mat::transposed(&qkvb[2 * c + h * hs..], 3 * c);
                let kmat = Mat::rows(&qkvb[c + h * hs..], 3 * c);
                // Groups of kept query rows; a group only touches keys up to its last row.
                for j0 in (0..kb).step_by(BLOCK) {
                    let j1 = (j0 + BLOCK).min(kb);
                    let (g, group) = (j1 - j0, &qrows[j0..j1]);
                    let tmax = group[g - 1] + 1;
                    for (j, &qi) in group.iter().enumerate() {
                        pk[j * tmax..(j + 1) * tmax].copy_from_slice(&p[qi * t..qi * t + tmax]);
                        let o = qi * 3 * c + h * hs;
                        qk[j * hs..(j + 1) * hs].copy_from_slice(&qkvb[o..o + hs]);
                    }
                    let (pk, dp) = (&pk[..g * tmax], &mut dp[..g * tmax]);
                    let dyh = Mat::rows(&dyb[j0 * c + h * hs..], c);
                    flops += matmul_serial(g, tmax, hs, dp, tmax, false, dyh, vt);
                    for (dpr, pr) in dp.chunks_exact_mut(tmax).zip(pk.chunks_exact(tmax)) {
                        let dot: T = dpr.iter().zip(pr).map(|(&a, &b)| a * b).sum();
                        for (d, &pv) in dpr.iter_mut().zip(pr) {
                            *d = pv * (*d - dot) * scale;
                        }
                    }
                    flops +=
                        matmul_serial(g, hs, tmax, &mut dq, hs, false, Mat::rows(dp, tmax), kmat);
                    for (j, &qi) in group.iter().enumerate() {
                        let o = qi * 3 * c + h * hs;
                        dqkvb[o..o + hs]
                            .iter_mut()
                            .zip(&dq[j * hs..(j + 1) * hs])
                            .for_each(|(d, &x)| *d += x);
                    }
                    let dst_k = &mut dqkvb[c + h * hs..];
                    let (dpt, qg) = (Mat::transposed(dp, tmax), Mat::rows(&qk[..g * hs], hs));
                    flops += matmul_serial(tmax, hs, g, dst_k, 3 * c, true, dpt, qg);
                    let dst_v = &mut dqkvb[2 * c + h * hs..];
                    flops += matmul_serial(
                        tmax,
                        hs,
                        g,
                        dst_v,
                        3 * c,
                        true,
                        Mat::transposed(pk, tmax),
                        dyh,
                    );
                }
            }
            flops
        })
        .sum()
}
