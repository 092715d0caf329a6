//! Host emulations of CUDA kernel logic that a CPU can check without a GPU (no `cuda` feature needed).
//!
//! - `kernels/token_stats.cu`: the per-thread running state `(m, s, t)`, its rescale in `acc_chunk` and the merge
//!   `acc_merge`, in f32 with the same operations in the same order, driven like one 512-thread block (thread
//!   `tid` takes 16-value chunks `tid, tid + 512, …`, then the warp butterflies and the merge of the 16 warps).
//!   Checked against the float64 reference on rows masked with −FLT_MAX and rows holding a 3e38 logit, where the
//!   unclamped rescale `t' = e^d·(t + d·s)` gives `0·(−inf) = NaN`.
//! - `kernels/sparse_ce.cu`: which store writes each column of an output row (`grad_row`'s head / body / tail
//!   splits), for every alignment of the input and output rows: every column written exactly once, every vector
//!   store aligned, and vector stores for the body even when the output row is not aligned like the input row.
//!
//! These mirror the `.cu` code line by line (keep them in sync); the GPU parity tests check the kernels themselves.

mod common;

use common::{ref_lse_entropy, rng};
use rand::Rng;

/// `ACC_D_MIN` in token_stats.cu: the smallest rescale exponent (e^-128 is 0 in f32).
const ACC_D_MIN: f32 = -128.0;
/// `ESLM_TS_THREADS`.
const THREADS: usize = 512;
/// Values per chunk of the vector body (16 f32: 4 vectors of 4).
const CHUNK: usize = 16;

/// The running state of a (partial) row.
#[derive(Debug, Clone, Copy)]
struct Acc {
    m: f32,
    s: f32,
    t: f32,
}

const EMPTY: Acc = Acc {
    m: f32::NEG_INFINITY,
    s: 0.0,
    t: 0.0,
};

/// The rescale exponent `d = m − m'`: clamped at `ACC_D_MIN` (the fix) or not (the code as reviewed).
fn rescale_d(m: f32, m_new: f32, clamp: bool) -> f32 {
    if clamp {
        (m - m_new).max(ACC_D_MIN)
    } else {
        m - m_new
    }
}

/// `fast_exp_nonpos`: ex2.approx.ftz of d·log2(e) (here an accurate exp2, flushed to zero below 2^-126).
fn fast_exp_nonpos(d: f32) -> f32 {
    let p = (d * std::f32::consts::LOG2_E).exp2();
    if p < f32::MIN_POSITIVE {
        0.0
    } else {
        p
    }
}

/// `acc_chunk<N>`: chunk max first, at most one rescale, then one exp per value.
fn acc_chunk(a: &mut Acc, z: &[f32], nan: &mut bool, clamp: bool) {
    let mut cmax = z[0];
    let mut cnan = z[0].is_nan();
    for &x in &z[1..] {
        cmax = cmax.max(x); // fmaxf ignores NaN, as f32::max does
        cnan |= x.is_nan();
    }
    *nan |= cnan;
    if cmax > a.m {
        if a.m > f32::NEG_INFINITY {
            let d = rescale_d(a.m, cmax, clamp);
            let f = d.exp();
            a.t = f * (a.t + d * a.s);
            a.s *= f;
        }
        a.m = cmax;
    }
    if a.m == f32::NEG_INFINITY {
        return;
    }
    for &x in z {
        let d = (x - a.m).max(ACC_D_MIN);
        let p = fast_exp_nonpos(d);
        a.s += p;
        a.t = p.mul_add(d, a.t);
    }
}

/// `acc_merge`.
fn acc_merge(a: Acc, b: Acc, clamp: bool) -> Acc {
    let m = a.m.max(b.m);
    if m == f32::NEG_INFINITY {
        return a;
    }
    let mut r = Acc { m, s: 0.0, t: 0.0 };
    for x in [a, b] {
        if x.m > f32::NEG_INFINITY {
            let d = rescale_d(x.m, m, clamp);
            let f = d.exp();
            r.s += f * x.s;
            r.t += f * (x.t + d * x.s);
        }
    }
    r
}

/// One block over an aligned f32 row: per-thread chunks, warp butterflies, then warp 0 over the warp results.
/// Returns `(lse, entropy)` as thread 0 writes them.
fn block_row_stats(row: &[f32], clamp: bool) -> (f32, f32) {
    let mut acc = vec![EMPTY; THREADS];
    let mut nan = vec![false; THREADS];
    let nchunks = row.len() / CHUNK;
    for (tid, (a, n)) in acc.iter_mut().zip(&mut nan).enumerate() {
        let mut c = tid;
        while c < nchunks {
            acc_chunk(a, &row[c * CHUNK..(c + 1) * CHUNK], n, clamp);
            c += THREADS;
        }
        let mut j = nchunks * CHUNK + tid;
        while j < row.len() {
            acc_chunk(a, &row[j..j + 1], n, clamp);
            j += THREADS;
        }
    }
    let butterfly = |lanes: &mut [Acc]| {
        for off in [16, 8, 4, 2, 1] {
            let before = lanes.to_vec();
            for (lane, x) in lanes.iter_mut().enumerate() {
                *x = acc_merge(before[lane], before[lane ^ off], clamp);
            }
        }
    };
    let mut warp0 = vec![EMPTY; 32];
    for (w, lanes) in acc.chunks_mut(32).enumerate() {
        butterfly(lanes);
        warp0[w] = lanes[0];
    }
    butterfly(&mut warp0);
    let a = warp0[0];
    if nan.iter().any(|&n| n) {
        return (f32::NAN, f32::NAN);
    }
    let ln_s = a.s.ln();
    (a.m + ln_s, ln_s - a.t / a.s)
}

/// Rows where the running maximum jumps by more than f32 can hold in `d·s`.
fn overflow_rows(v: usize) -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = rng(11);
    let mut ordinary =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-4.0f32..4.0)).collect() };
    let mut masked_then_normal = vec![f32::MIN; v];
    masked_then_normal[v / 2..].copy_from_slice(&ordinary(v - v / 2));
    let mut normal_then_huge = ordinary(v);
    normal_then_huge[v - 20] = 3e38;
    let mut masked_with_huge = vec![f32::MIN; v];
    masked_with_huge[0] = 1.0;
    masked_with_huge[v - 1] = 3e38;
    let mut interleaved = ordinary(v);
    for z in interleaved.iter_mut().step_by(3) {
        *z = f32::MIN;
    }
    vec![
        ("-FLT_MAX then ordinary logits", masked_then_normal),
        ("ordinary logits then 3e38", normal_then_huge),
        ("-FLT_MAX with 1.0 and 3e38", masked_with_huge),
        ("-FLT_MAX every third logit", interleaved),
        ("all -FLT_MAX", vec![f32::MIN; v]),
    ]
}

#[test]
fn token_stats_rescale_is_finite_on_f32_min_masks_and_huge_logits() {
    // GPT-2's vocabulary (ragged: 3 scalar tail values) and a small row.
    for v in [50257, 777] {
        for (what, row) in overflow_rows(v) {
            let (lse, entropy) = block_row_stats(&row, true);
            let row64: Vec<f64> = row.iter().map(|&z| z as f64).collect();
            let (want_lse, want_entropy) = ref_lse_entropy(&row64);
            assert!(
                lse.is_finite() && entropy.is_finite(),
                "{what} (V {v}): lse {lse}, entropy {entropy}"
            );
            let lse_err = (lse as f64 - want_lse).abs();
            assert!(
                lse_err <= 1e-5 + 1e-6 * want_lse.abs(),
                "{what} (V {v}): lse {lse} vs {want_lse}"
            );
            assert!(
                (entropy as f64 - want_entropy).abs() <= 1e-4 + 1e-5 * want_entropy.abs(),
                "{what} (V {v}): entropy {entropy} vs {want_entropy}"
            );
        }
    }
}

#[test]
fn unclamped_rescale_gives_nan_on_the_same_rows() {
    // The kernel as reviewed (no clamp): documents why the clamp is there. The rows whose running maximum jumps
    // from −FLT_MAX (or from an ordinary value to 3e38) hit 0 · (−inf) somewhere in the block; in the other two
    // every chunk's maximum is an ordinary value from the start.
    for (what, row) in overflow_rows(50257) {
        let (_, entropy) = block_row_stats(&row, false);
        if what == "all -FLT_MAX" || what == "-FLT_MAX every third logit" {
            assert!(entropy.is_finite(), "{what}: {entropy}");
        } else {
            assert!(
                entropy.is_nan(),
                "{what}: expected NaN without the clamp, got {entropy}"
            );
        }
    }
}

#[test]
fn ordinary_rows_match_the_reference() {
    let mut rng = rng(5);
    for v in [1, 15, 16, 17, 8191, 50257] {
        let row: Vec<f32> = (0..v).map(|_| rng.gen_range(-30.0f32..30.0)).collect();
        let (lse, entropy) = block_row_stats(&row, true);
        let row64: Vec<f64> = row.iter().map(|&z| z as f64).collect();
        let (want_lse, want_entropy) = ref_lse_entropy(&row64);
        assert!(
            (lse as f64 - want_lse).abs() <= 1e-5 + 1e-6 * want_lse.abs(),
            "V {v}: lse"
        );
        assert!(
            (entropy as f64 - want_entropy).abs() <= 1e-4 + 1e-5 * want_entropy.abs(),
            "V {v}: entropy {entropy} vs {want_entropy}"
        );
    }
}

/// How `grad_row` stores one column.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Store {
    Scalar,
    Vector,
}

/// Emulates `grad_row<Tin, Tout>`'s column assignment for an input row at byte address `in_addr` and an output row
/// at `out_addr`: returns, per column `j < vocab`, how it was stored, checking vector-store alignment.
fn grad_row_stores(
    in_addr: u64,
    out_addr: u64,
    vocab: u64,
    in_size: u64,
    out_size: u64,
) -> Vec<Store> {
    let head_elems = |addr: u64, size: u64| ((16 - (addr & 15)) & 15) / size;
    let vec = 16 / in_size; // Elem<Tin>::VEC
    let out_align = (vec * out_size).min(16);
    let mut stores = vec![None; vocab as usize];
    let mut put = |j: u64, s: Store| {
        assert!(stores[j as usize].is_none(), "column {j} written twice");
        stores[j as usize] = Some(s);
    };
    let head = head_elems(in_addr, in_size).min(vocab);
    if (out_addr + head * out_size) % out_align == 0 {
        (0..head).for_each(|j| put(j, Store::Scalar));
        let nvec = (vocab - head) / vec;
        for i in 0..nvec {
            let j0 = head + i * vec;
            assert_eq!(
                (out_addr + j0 * out_size) % out_align,
                0,
                "misaligned vector store"
            );
            (j0..j0 + vec).for_each(|j| put(j, Store::Vector));
        }
        (head + nvec * vec..vocab).for_each(|j| put(j, Store::Scalar));
    } else {
        let ovec = 16 / out_size;
        let ohead = head_elems(out_addr, out_size).min(vocab);
        (0..ohead).for_each(|j| put(j, Store::Scalar));
        let nvec = (vocab - ohead) / ovec;
        for i in 0..nvec {
            let j0 = ohead + i * ovec;
            assert_eq!(
                (out_addr + j0 * out_size) % 16,
                0,
                "misaligned vector store"
            );
            (j0..j0 + ovec).for_each(|j| put(j, Store::Vector));
        }
        (ohead + nvec * ovec..vocab).for_each(|j| put(j, Store::Scalar));
    }
    stores
        .into_iter()
        .enumerate()
        .map(|(j, s)| s.unwrap_or_else(|| panic!("column {j} never written")))
        .collect()
}

#[test]
fn sparse_ce_output_rows_split_by_their_own_alignment() {
    // f32 / bf16 in and out; input rows at every element offset; output strides that keep or break the alignment.
    for (in_size, out_size) in [(4u64, 4u64), (4, 2), (2, 4), (2, 2)] {
        for in_offset in 0..8u64 {
            for out_stride in [50304u64, 50257, 50258, 50260, 1003] {
                for row in 0..4u64 {
                    let vocab = 50257u64.min(out_stride);
                    let in_addr = 4096 + in_offset * in_size;
                    let out_addr = 8192 + row * out_stride * out_size;
                    let stores = grad_row_stores(in_addr, out_addr, vocab, in_size, out_size);
                    let vector = stores.iter().filter(|&&s| s == Store::Vector).count();
                    // At most one 16-byte head and tail are scalar, whatever the two alignments.
                    assert!(
                        stores.len() - vector <= 2 * 16,
                        "in {in_size} B at +{in_offset}, out {out_size} B stride {out_stride} row {row}: \
                         {} scalar stores",
                        stores.len() - vector
                    );
                }
            }
        }
    }
}
