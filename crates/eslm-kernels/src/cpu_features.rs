//! Run-time CPU feature detection for the CPU kernels.
//!
//! The kernels' inner loops are plain Rust written so that LLVM vectorises them. The default x86-64 target only
//! allows SSE2 (4 lanes), so each hot row kernel is also compiled a second time inside a
//! `#[target_feature(enable = "avx2,fma")]` wrapper (8 lanes) and chosen at run time with [`has_avx2`].
//! Other architectures use the portable build only.

/// Whether this CPU supports AVX2 and FMA (cached by the standard library after the first call).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
