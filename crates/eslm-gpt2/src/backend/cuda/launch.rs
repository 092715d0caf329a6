//! Host-side launch arithmetic of the CUDA backend: grid sizes, the row-major → column-major mapping of a GEMM
//! for cuBLAS, and the index maps of row-sparse merges and of the encoder backward's buckets. Pure functions,
//! unit-tested on the host.

use cudarc::driver::LaunchConfig;
use eslm_kernels::cuda::cudarc;

use super::super::HeadDims;
use super::{Dtype, MAX_GRID};
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

/// Launch configuration of a column-sum over row chunks: `x` blocks of `threads` columns, `y` one row chunk each.
pub(super) fn chunk_grid(width: usize, chunks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            width.div_ceil(threads as usize).max(1) as u32,
            chunks as u32,
            1,
        ),
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

/// A row-major GEMM `C [m, n] = op(A)·op(B) + beta·C` for `batch` matrices spaced by the strides (elements),
/// with the element types of A, B and C (`types`; f32 operands meet bf16 ones as bf16 copies, [`Cuda::gemm`]).
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
    pub(super) types: [Dtype; 3],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_gemm_swaps_operands_for_cublas() {
        // C [2, 3] = A [2, 4]·Bᵀ with B [3, 4]: column-major Cᵀ [3, 2] = op(B)ᵀ·op(A)ᵀ → (T, N, 3, 2, 4, B, A).
        let g = Gemm {
            ta: false,
            tb: true,
            m: 2,
            n: 3,
            k: 4,
            a: 100,
            lda: 4,
            sa: 0,
            b: 200,
            ldb: 4,
            sb: 0,
            c: 300,
            ldc: 3,
            sc: 0,
            batch: 1,
            beta: 0.0,
            types: [Dtype::F32; 3],
        };
        assert_eq!(
            column_major(&g),
            Some(ColumnMajor {
                ta: true,
                tb: false,
                m: 3,
                n: 2,
                k: 4,
                a: 200,
                lda: 4,
                sa: 0,
                b: 100,
                ldb: 4,
                sb: 0,
                ldc: 3,
                sc: 0,
                batch: 1,
            })
        );
        let huge = Gemm { m: 1 << 31, ..g };
        assert_eq!(column_major(&huge), None);
        assert_eq!(column_major(&Gemm { ldc: 1 << 31, ..g }), None);
        assert_eq!(
            column_major(&Gemm {
                batch: 1 << 31,
                ..g
            }),
            None
        );
    }

    /// The GEMM mapping, executed on the host: a naive column-major SGEMM run with `column_major`'s arguments
    /// reproduces the row-major product.

    #[test]
    fn row_major_gemm_through_a_column_major_reference() {
        #[allow(clippy::too_many_arguments)]
        fn colmajor(
            ta: bool,
            tb: bool,
            m: usize,
            n: usize,
            k: usize,
            a: &[f32],
            lda: usize,
            b: &[f32],
            ldb: usize,
            c: &mut [f32],
            ldc: usize,
            beta: f32,
        ) {
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0.0;
                    for p in 0..k {
                        let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                        let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                        acc += av * bv;
                    }
                    c[i + j * ldc] = acc + beta * c[i + j * ldc];
                }
            }
        }
        // Every transpose combination, leading dimensions larger than the rows they hold (as for the LM head's
        // Vp > V and qkv's 3C with a head offset), and β = 1 accumulating into C.
        let (m, n, k, pad) = (3usize, 5usize, 4usize, 2usize);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
            let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (a_cols + pad, b_cols + pad + 1, n + pad);
            let a: Vec<f32> = (0..a_rows * lda).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..b_rows * ldb).map(|i| (i as f32 * 0.11).cos()).collect();
            let c0: Vec<f32> = (0..m * ldc).map(|i| i as f32 * 0.01).collect();
            let at = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] };
            let bt = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] };
            let mut want = c0.clone();
            for i in 0..m {
                for j in 0..n {
                    want[i * ldc + j] += (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f32>();
                }
            }
            let g = Gemm {
                ta,
                tb,
                m,
                n,
                k,
                a: 0,
                lda,
                sa: 0,
                b: 0,
                ldb,
                sb: 0,
                c: 0,
                ldc,
                sc: 0,
                batch: 1,
                beta: 1.0,
                types: [Dtype::F32; 3],
            };
            let ColumnMajor {
                ta: cta,
                tb: ctb,
                m: cm,
                n: cn,
                k: ck,
                lda: clda,
                ldb: cldb,
                ..
            } = column_major(&g).unwrap();
            let mut got = c0.clone();
            // Operands swapped: the first is B, the second A; C row-major [m, ldc] is column-major [n, m] in ldc.
            colmajor(
                cta,
                ctb,
                cm as usize,
                cn as usize,
                ck as usize,
                &b,
                clda as usize,
                &a,
                cldb as usize,
                &mut got,
                ldc,
                1.0,
            );
            for i in 0..m {
                for j in 0..ldc {
                    let (x, y) = (got[i * ldc + j], want[i * ldc + j]);
                    assert!(
                        (x - y).abs() < 1e-5,
                        "ta {ta} tb {tb}: C[{i},{j}] {x} vs {y}"
                    );
                }
            }
        }
    }

    /// The bf16 path converts exactly the elements a product reads: the extents of plain, transposed, strided
    /// (qkv rows of 3C) and batched operands, by brute force over the index set.

    #[test]
    fn operand_extents_cover_what_the_product_reads() {
        let read_a = |g: &Gemm| {
            let mut last = 0;
            for bi in 0..g.batch {
                for i in 0..g.m {
                    for p in 0..g.k {
                        let idx = bi * g.sa + if g.ta { p * g.lda + i } else { i * g.lda + p };
                        last = last.max(idx + 1);
                    }
                }
            }
            last
        };
        let read_b = |g: &Gemm| {
            let mut last = 0;
            for bi in 0..g.batch {
                for p in 0..g.k {
                    for j in 0..g.n {
                        let idx = bi * g.sb + if g.tb { j * g.ldb + p } else { p * g.ldb + j };
                        last = last.max(idx + 1);
                    }
                }
            }
            last
        };
        for (ta, tb, batch) in [
            (false, true, 1),
            (true, false, 3),
            (false, false, 2),
            (true, true, 4),
        ] {
            let (m, n, k) = (5usize, 3usize, 4usize);
            let g = Gemm {
                ta,
                tb,
                m,
                n,
                k,
                a: 0,
                lda: 3 * 8,
                sa: 7,
                b: 0,
                ldb: 11,
                sb: 50,
                c: 0,
                ldc: n,
                sc: m * n,
                batch,
                beta: 0.0,
                types: [Dtype::F32; 3],
            };
            assert_eq!(
                operand_extents(&g),
                (read_a(&g), read_b(&g)),
                "ta {ta} tb {tb} batch {batch}"
            );
        }
        let empty = Gemm {
            ta: false,
            tb: false,
            m: 0,
            n: 2,
            k: 0,
            a: 0,
            lda: 1,
            sa: 0,
            b: 0,
            ldb: 2,
            sb: 0,
            c: 0,
            ldc: 2,
            sc: 0,
            batch: 1,
            beta: 0.0,
            types: [Dtype::F32; 3],
        };
        assert_eq!(operand_extents(&empty), (0, 0));
    }

    #[test]
    fn merge_maps_match_the_cpu_union() {
        let a = RowSet::Rows(vec![1, 4, 6]);
        let b = RowSet::Rows(vec![0, 4, 7]);
        let (u, ia, ib) = merge_maps(&a, &b, 8).unwrap();
        assert_eq!(u, RowSet::Rows(vec![0, 1, 4, 6, 7]));
        assert_eq!(ia, vec![-1, 0, 1, 2, -1]);
        assert_eq!(ib, vec![0, -1, 1, -1, 2]);
        let (u, ia, ib) = merge_maps(&RowSet::All, &RowSet::Rows(vec![2]), 3).unwrap();
        assert_eq!(u, RowSet::All);
        assert_eq!((ia, ib), (vec![0, 1, 2], vec![-1, -1, 0]));
        assert!(merge_maps(&a, &a.clone(), 8).is_none());
        let (u, ia, ib) = merge_maps(&RowSet::Rows(vec![]), &RowSet::Rows(vec![3]), 5).unwrap();
        assert_eq!((u, ia, ib), (RowSet::Rows(vec![3]), vec![-1], vec![0]));
    }

    #[test]
    fn buckets_keep_rows_ascending_within_a_destination() {
        // Dense rows 0..6 with tokens [5, 2, 5, 2, 9, 5]: kept rows 0, 2, 3, 5 (compact 0..4).
        let tokens = [5u32, 2, 5, 2, 9, 5];
        let rows = RowSet::Rows(vec![0, 2, 3, 5]);
        let (perm, keys, starts) = buckets(&rows, 6, |i| tokens[i]);
        assert_eq!(keys, vec![2, 5]);
        assert_eq!(starts, vec![0, 1, 4]);
        assert_eq!(perm, vec![2, 0, 1, 3]);
        let (perm, keys, starts) = buckets(&RowSet::All, 4, |i| (i % 2) as u32);
        assert_eq!(
            (perm, keys, starts),
            (vec![0, 2, 1, 3], vec![0, 1], vec![0, 2, 4])
        );
        let (perm, keys, starts) = buckets(&RowSet::Rows(vec![]), 4, |i| i as u32);
        assert!(perm.is_empty() && keys.is_empty());
        assert_eq!(starts, vec![0]);
    }

    #[test]
    fn launch_shapes() {
        assert_eq!(grid(0, 256), 1);
        assert_eq!(grid(257, 256), 2);
        assert_eq!(grid(usize::MAX / 2, 256), MAX_GRID as u32);
        assert_eq!(warp_grid(9, 256), 2);
    }
}
