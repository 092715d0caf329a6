//! The kernels of the CPU backend ([`crate::backend::Cpu`]). Each op is a module with a `forward` and a
//! `backward`; the model calls them through the [`crate::backend::Backend`] trait, whose CPU implementation calls
//! these functions unchanged, and a CUDA backend provides the same ops over device buffers.
//!
//! **Row sparsity is a property of gradients.** A backward receives its output gradient as a [`RowSet`] plus a
//! *compact* buffer holding only those rows (`[K, width]` for `RowSet::Rows` of length K, `[N, width]` for
//! `RowSet::All`). Row-wise ops (layer norm, linear, GELU, residual add, LM head) return their input gradient on
//! the same row set and do K rows of work; attention mixes rows and returns a dense gradient. Forward activations
//! are always dense (`[N, width]`); a row-sparse backward gathers the K rows it needs.
//!
//! Every op is generic over [`Real`] (`f32` for the model, `f64` for the finite-difference tests).

pub mod attention;
pub mod encoder;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod matmul;
pub mod residual;

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A floating-point element the ops run on (`f32` or `f64`).
pub trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + Default
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Conversion from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Conversion to f64 (exact).
    fn to_f64(self) -> f64;
    /// `e^x`.
    fn exp(self) -> Self;
    /// `√x`.
    fn sqrt(self) -> Self;
    /// `tanh x`.
    fn tanh(self) -> Self;
    /// The larger of two values.
    fn max(self, other: Self) -> Self;
    /// `tanh x` for the GELU: exact (libm) for f64; for f32 a vectorisable rational approximation
    /// ([`fast_tanh_f32`], max abs error ≈ 1e-7).
    fn fast_tanh(self) -> Self {
        self.tanh()
    }
}

macro_rules! impl_real {
    ($t:ty, $fast_tanh:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn fast_tanh(self) -> Self {
                $fast_tanh(self)
            }
        }
    };
}
impl_real!(f32, fast_tanh_f32);
impl_real!(f64, f64::tanh);

/// `tanh x` in f32 by the [13/6] rational approximation used by Eigen (`generic_fast_tanh_float`), on `x`
/// clamped to ±7.9053 (where tanh rounds to ±1 in f32); `x` itself for `|x| < 4e-4`. Branch-free apart from
/// the clamp, so loops over it vectorise; max abs error vs f64 `tanh` ≈ 1e-7.
#[inline(always)]
#[allow(clippy::excessive_precision)] // coefficients as published
pub fn fast_tanh_f32(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525_2e-3;
    const B2: f32 = 2.268_434_6e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    let xc = x.clamp(-CLAMP, CLAMP);
    let x2 = xc * xc;
    let mut p = x2 * A13 + A11;
    p = x2 * p + A9;
    p = x2 * p + A7;
    p = x2 * p + A5;
    p = x2 * p + A3;
    p = x2 * p + A1;
    p *= xc;
    let mut q = x2 * B6 + B4;
    q = x2 * q + B2;
    q = x2 * q + B0;
    if x.abs() < 4e-4 {
        x
    } else {
        p / q
    }
}

/// Which rows of a gradient are (possibly) non-zero. Indices are strictly ascending and `< N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowSet {
    /// Every row: the gradient is dense.
    All,
    /// Only these rows; every other row of the gradient is zero.
    Rows(Vec<u32>),
}

impl RowSet {
    /// Number of rows stored in the compact gradient buffer (`n` for `All`, K for `Rows`).
    pub fn count(&self, n: usize) -> usize {
        match self {
            RowSet::All => n,
            RowSet::Rows(r) => r.len(),
        }
    }

    /// Whether the set is dense.
    pub fn is_all(&self) -> bool {
        matches!(self, RowSet::All)
    }

    /// The row set for a strictly ascending kept list over `n` rows (`All` when it names every row).
    pub fn from_kept(kept: &[u32], n: usize) -> RowSet {
        if kept.len() == n {
            RowSet::All
        } else {
            RowSet::Rows(kept.to_vec())
        }
    }
}

/// The rows `rows` of the dense `[N, width]` matrix `src`, compact: `src` itself for `RowSet::All`, otherwise
/// gathered into `scratch[..K·width]`.
pub fn gather<'a, T: Copy>(
    src: &'a [T],
    width: usize,
    rows: &RowSet,
    scratch: &'a mut [T],
) -> &'a [T] {
    match rows {
        RowSet::All => src,
        RowSet::Rows(r) => {
            for (dst, &i) in scratch.chunks_exact_mut(width).zip(r.iter()) {
                let i = i as usize;
                dst.copy_from_slice(&src[i * width..(i + 1) * width]);
            }
            &scratch[..r.len() * width]
        }
    }
}

/// Adds the compact gradient `g` (rows `rows`) into the dense `[N, width]` buffer `dst`.
pub fn scatter_add<T: Real>(dst: &mut [T], width: usize, rows: &RowSet, g: &[T]) {
    match rows {
        RowSet::All => dst.iter_mut().zip(g).for_each(|(d, &x)| *d += x),
        RowSet::Rows(r) => {
            for (src, &i) in g.chunks_exact(width).zip(r.iter()) {
                let i = i as usize;
                dst[i * width..(i + 1) * width]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(d, &x)| *d += x);
            }
        }
    }
}

/// FLOPs counted by the ops that actually ran (multiply-add = 2 FLOPs; only GEMM-class work and attention are
/// counted, elementwise ops are negligible and left out).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlopCounter {
    /// Forward FLOPs.
    pub forward: f64,
    /// Backward FLOPs of the LM head (K rows).
    pub backward_head: f64,
    /// Backward FLOPs that ran on a row subset (row-wise parts of the last block), excluding the LM head.
    pub backward_row_sparse: f64,
    /// Backward FLOPs of the dense parts (attention onwards).
    pub backward_dense: f64,
}

impl FlopCounter {
    /// Total FLOPs.
    pub fn total(&self) -> f64 {
        self.forward + self.backward_head + self.backward_row_sparse + self.backward_dense
    }
}
