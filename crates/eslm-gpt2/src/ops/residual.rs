//! Residual add `z = a + b`. Its backward passes `dz` to both inputs unchanged; where a stream's gradient arrives
//! from two consumers, [`merge`] adds them, and the sum is non-zero on the union of their row sets (dense as
//! soon as either is).

use super::{scatter_add, Real, RowSet};

/// Forward: `out = a + b`.
pub fn forward<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// Sums two compact gradients of the same `[n, width]` tensor: `(ra, ga)` and `(rb, gb)`. Writes the sum,
/// compact over the returned row set (the union), into `out`.
pub fn merge<T: Real>(
    out: &mut [T],
    ra: &RowSet,
    ga: &[T],
    rb: &RowSet,
    gb: &[T],
    n: usize,
    width: usize,
) -> RowSet {
    if ra == rb {
        let k = ra.count(n) * width;
        for ((o, &x), &y) in out[..k].iter_mut().zip(&ga[..k]).zip(&gb[..k]) {
            *o = x + y;
        }
        return ra.clone();
    }
    match (ra, rb) {
        (RowSet::All, _) | (_, RowSet::All) => {
            let (dense, rs, sparse) = if ra.is_all() {
                (ga, rb, gb)
            } else {
                (gb, ra, ga)
            };
            out[..n * width].copy_from_slice(&dense[..n * width]);
            scatter_add(&mut out[..n * width], width, rs, sparse);
            RowSet::All
        }
        (RowSet::Rows(x), RowSet::Rows(y)) => {
            let mut union = Vec::with_capacity(x.len() + y.len());
            let (mut i, mut j) = (0, 0);
            while i < x.len() || j < y.len() {
                let o = union.len() * width;
                let row = &mut out[o..o + width];
                if j >= y.len() || (i < x.len() && x[i] < y[j]) {
                    row.copy_from_slice(&ga[i * width..(i + 1) * width]);
                    union.push(x[i]);
                    i += 1;
                } else if i >= x.len() || y[j] < x[i] {
                    row.copy_from_slice(&gb[j * width..(j + 1) * width]);
                    union.push(y[j]);
                    j += 1;
                } else {
                    for ((o, &p), &q) in row
                        .iter_mut()
                        .zip(&ga[i * width..(i + 1) * width])
                        .zip(&gb[j * width..(j + 1) * width])
                    {
                        *o = p + q;
                    }
                    union.push(x[i]);
                    i += 1;
                    j += 1;
                }
            }
            RowSet::Rows(union)
        }
    }
}
