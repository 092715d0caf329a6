//! Token + position embedding: `x[b, t] = wte[token[b, t]] + wpe[t]`.
//! Backward (row-wise): `dwte[token] += dx`, `dwpe[t] += dx` for the rows in the row set.

use super::{Real, RowSet};

/// Forward over `b·t` tokens (ids already validated `< V`), width `c`.
pub fn forward<T: Real>(out: &mut [T], tokens: &[u32], wte: &[T], wpe: &[T], t: usize, c: usize) {
    for (i, (row, &tok)) in out.chunks_exact_mut(c).zip(tokens).enumerate() {
        let e = &wte[tok as usize * c..(tok as usize + 1) * c];
        let p = &wpe[(i % t) * c..(i % t + 1) * c];
        for ((o, &a), &b) in row.iter_mut().zip(e).zip(p) {
            *o = a + b;
        }
    }
}

/// Backward on row set `rows`: `dout` compact `[K, c]`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dwte: &mut [T],
    dwpe: &mut [T],
    dout: &[T],
    tokens: &[u32],
    rows: &RowSet,
    n: usize,
    t: usize,
    c: usize,
) {
    for (j, g) in dout.chunks_exact(c).take(rows.count(n)).enumerate() {
        let i = match rows {
            RowSet::All => j,
            RowSet::Rows(r) => r[j] as usize,
        };
        let tok = tokens[i] as usize;
        dwte[tok * c..(tok + 1) * c]
            .iter_mut()
            .zip(g)
            .for_each(|(d, &x)| *d += x);
        let p = i % t;
        dwpe[p * c..(p + 1) * c]
            .iter_mut()
            .zip(g)
            .for_each(|(d, &x)| *d += x);
    }
}
