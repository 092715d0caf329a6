//! Build script. Without the `cuda` feature it does nothing. With it, it compiles every `kernels/*.cu`
//! with nvcc into a fatbin (SASS for sm_80 and sm_90 plus compute_90 PTX) and runs bindgen over the shared
//! C header of kernel parameter structs.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    pub fn build() {
        // Filled in by the CUDA backend work (nvcc + bindgen).
    }
}
