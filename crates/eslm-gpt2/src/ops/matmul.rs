//! Strided matrix multiply on top of the `gemm` crate: `dst[m, n] (+)= a[m, k] · b[k, n]`, where every operand
//! is given by a slice plus row and column strides, so transposes (`Wᵀ`, `dYᵀ`) are folded into strides instead
//! of copies. Large products run multithreaded on the current rayon pool.

use super::Real;
use gemm::Parallelism;

/// A read-only strided matrix operand: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a, T> {
    /// Storage.
    pub data: &'a [T],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix with row stride `rs` (column stride 1).
    pub fn rows(data: &'a [T], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix with row stride `rs`.
    pub fn transposed(data: &'a [T], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }

    fn check(&self, r: usize, c: usize, what: &str) {
        if r > 0 && c > 0 {
            let last = (r - 1) * self.rs + (c - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "matmul operand {what} out of bounds"
            );
        }
    }
}

/// Products smaller than this many multiply-adds run single-threaded.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `dst[m, n] = (accumulate ? dst : 0) + a[m, k]·b[k, n]`, `dst` row-major with row stride `dst_rs`.
/// Multithreaded (current rayon pool) when the product is large. Returns the FLOPs (2·m·n·k).
///
/// Panics if an operand is too short for its shape (internal invariant: callers validate shapes).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
) -> f64 {
    let threads = rayon::current_num_threads();
    // Inside `ThreadPool::install` the current pool is the installed one (a 2-thread pool gives 2 threads);
    // callers that are themselves parallel loops use `matmul_serial`.
    let par = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    matmul_with(m, n, k, dst, dst_rs, accumulate, a, b, par)
}

/// [`matmul`], always single-threaded (for use inside parallel loops).
#[allow(clippy::too_many_arguments)]
pub fn matmul_serial<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
) -> f64 {
    matmul_with(m, n, k, dst, dst_rs, accumulate, a, b, Parallelism::None)
}

#[allow(clippy::too_many_arguments)]
fn matmul_with<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    par: Parallelism,
) -> f64 {
    if m == 0 || n == 0 {
        return 0.0;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "matmul dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n]
                    .iter_mut()
                    .for_each(|x| *x = T::ZERO);
            }
        }
        return 0.0;
    }
    a.check(m, k, "a");
    b.check(k, n, "b");
    // SAFETY: the asserts above guarantee every index the product touches lies inside its slice; `dst` is
    // exclusively borrowed and does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
    2.0 * (m * n * k) as f64
}
