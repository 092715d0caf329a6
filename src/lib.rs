//! `eslm`: the workspace's root package. It re-exports the member crates so that the cross-crate tests in
//! `tests/` and the benchmarks in `benches/` have one import path.

pub use eslm_data as data;
pub use eslm_gpt2 as gpt2;
pub use eslm_kernels as kernels;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
