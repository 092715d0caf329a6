//! Host-side launch arithmetic of the CUDA backend: grid sizes, the row-major → column-major mapping of a GEMM
//! for cuBLAS, and the index maps of row-sparse merges and of the encoder backward's buckets. Pure functions,
//! unit-tested on the host.

use cudarc::driver::LaunchConfig;
use eslm_kernels::cuda::cudarc;

use super::super::HeadDims;
use super::MAX_GRID;
use crate::error::{Gpt2Error, Result};
use crate::ops::RowSet;

/// Launch configuration of `blocks` blocks of `threads`.
pub(super) fn cfg(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Elements a `[rows, Vp]` logits matrix spans (`(rows − 1)·Vp + V`), checked for overflow.
pub(super) fn logits_extent(rows: usize, d: HeadDims) -> Result<usize> {
    rows.checked_sub(1)
        .and_then(|r| r.checked_mul(d.vp))
        .and_then(|x| x.checked_add(d.v))
        .ok_or_else(|| Gpt2Error::Shape {
            what: "logits",
            expected: "at least one row of a size that fits in memory".into(),
            got: format!("{rows} rows of stride {}", d.vp),
        })
}

/// Blocks of a grid-stride launch over `total` items.
pub(super) fn grid(total: usize, threads: u32) -> u32 {
    total.div_ceil(threads as usize).clamp(1, MAX_GRID) as u32
}

/// Blocks of a one-warp-per-row launch over `rows` rows.
pub(super) fn warp_grid(rows: usize, threads: u32) -> u32 {
    rows.div_ceil(threads as usize / 32)
        .clamp(1, i32::MAX as usize) as u32
}

/// A row-major GEMM `C [m, n] = op(A)·op(B) + beta·C` for `batch` matrices spaced by the strides (elements).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Gemm {
    pub(super) ta: bool,
    pub(super) tb: bool,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) a: u64,
    pub(super) lda: usize,
    pub(super) sa: usize,
    pub(super) b: u64,
    pub(super) ldb: usize,
    pub(super) sb: usize,
    pub(super) c: u64,
    pub(super) ldc: usize,
    pub(super) sc: usize,
    pub(super) batch: usize,
    pub(super) beta: f32,
}

/// The column-major cuBLAS arguments of a row-major [`Gemm`] (the operands swapped: `Cᵀ = op(B)ᵀ·op(A)ᵀ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ColumnMajor {
    pub(super) ta: bool,
    pub(super) tb: bool,
    pub(super) m: i32,
    pub(super) n: i32,
    pub(super) k: i32,
    pub(super) a: u64,
    pub(super) lda: i32,
    pub(super) sa: i64,
    pub(super) b: u64,
    pub(super) ldb: i32,
    pub(super) sb: i64,
    pub(super) ldc: i32,
    pub(super) sc: i64,
    pub(super) batch: i32,
}

/// [`ColumnMajor`] of `g`, or `None` when a dimension does not fit cuBLAS's 32-bit (strides 64-bit) arguments.
pub(super) fn column_major(g: &Gemm) -> Option<ColumnMajor> {
    let i = |x: usize| i32::try_from(x).ok();
    let l = |x: usize| i64::try_from(x).ok();
    Some(ColumnMajor {
        ta: g.tb,
        tb: g.ta,
        m: i(g.n)?,
        n: i(g.m)?,
        k: i(g.k)?,
        a: g.b,
        lda: i(g.ldb)?,
        sa: l(g.sb)?,
        b: g.a,
        ldb: i(g.lda)?,
        sb: l(g.sa)?,
        ldc: i(g.ldc)?,
        sc: l(g.sc)?,
        batch: i(g.batch)?,
    })
}

/// The elements each operand of a row-major [`Gemm`] spans from its base pointer, `(A, B)`: `(batch − 1)·stride +
/// (rows − 1)·ld + cols` of its stored `[rows, cols]` (transposed operands are stored `[k, m]` / `[n, k]`).
pub(super) fn operand_extents(g: &Gemm) -> (usize, usize) {
    let extent = |rows: usize, cols: usize, ld: usize, stride: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (g.batch.max(1) - 1) * stride + (rows - 1) * ld + cols
        }
    };
    let (ar, ac) = if g.ta { (g.k, g.m) } else { (g.m, g.k) };
    let (br, bc) = if g.tb { (g.n, g.k) } else { (g.k, g.n) };
    (extent(ar, ac, g.lda, g.sa), extent(br, bc, g.ldb, g.sb))
}

/// The union of two row sets and, for each union row, its index in `a`'s and `b`'s compact buffers (`-1`: not
/// there). `None` for two equal sets (an elementwise add).
pub(super) fn merge_maps(a: &RowSet, b: &RowSet, n: usize) -> Option<(RowSet, Vec<i32>, Vec<i32>)> {
    if a == b {
        return None;
    }
    let pos = |r: &RowSet| -> Vec<i32> {
        let mut m = vec![-1i32; n];
        match r {
            RowSet::All => m.iter_mut().enumerate().for_each(|(i, x)| *x = i as i32),
            RowSet::Rows(rows) => rows
                .iter()
                .enumerate()
                .for_each(|(j, &i)| m[i as usize] = j as i32),
        }
        m
    };
    match (a, b) {
        (RowSet::All, _) | (_, RowSet::All) => Some((RowSet::All, pos(a), pos(b))),
        (RowSet::Rows(x), RowSet::Rows(y)) => {
            let (mut ia, mut ib, mut union) = (Vec::new(), Vec::new(), Vec::new());
            let (mut i, mut j) = (0, 0);
            while i < x.len() || j < y.len() {
                if j >= y.len() || (i < x.len() && x[i] < y[j]) {
                    union.push(x[i]);
                    ia.push(i as i32);
                    ib.push(-1);
                    i += 1;
                } else if i >= x.len() || y[j] < x[i] {
                    union.push(y[j]);
                    ia.push(-1);
                    ib.push(j as i32);
                    j += 1;
                } else {
                    union.push(x[i]);
                    ia.push(i as i32);
                    ib.push(j as i32);
                    i += 1;
                    j += 1;
                }
            }
            Some((RowSet::Rows(union), ia, ib))
        }
    }
}

/// Buckets of compact rows by destination row `key(dense row)`: `(perm, keys, starts)` with bucket `q` holding
/// `perm[starts[q]..starts[q + 1]]` (compact row indices, ascending) added into row `keys[q]`.
pub(super) fn buckets(
    rows: &RowSet,
    n: usize,
    key: impl Fn(usize) -> u32,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let k = rows.count(n);
    let dense = |j: usize| match rows {
        RowSet::All => j,
        RowSet::Rows(r) => r[j] as usize,
    };
    let mut perm: Vec<u32> = (0..k as u32).collect();
    perm.sort_by_key(|&j| key(dense(j as usize))); // stable: ascending j within a bucket
    let (mut keys, mut starts) = (Vec::new(), Vec::new());
    for (s, &j) in perm.iter().enumerate() {
        let kk = key(dense(j as usize));
        if keys.last() != Some(&kk) {
            keys.push(kk);
            starts.push(s as u32);
        }
    }
    starts.push(k as u32);
    (perm, keys, starts)
}
