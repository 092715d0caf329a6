//! Build script. Without the `cuda` feature it does nothing. With it:
//!
//! 1. finds `nvcc` (`$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, `/usr/local/cuda/bin`) and stops with a clear
//!    message if there is none (run `scripts/install-cuda-toolchain.sh` and set `CUDA_HOME`);
//! 2. compiles every `kernels/*.cu` into `$OUT_DIR/<name>.fatbin` holding SASS for sm_80 and sm_90 plus compute_90
//!    PTX (`-O3`, IEEE math: no `--use_fast_math`), with `-Xptxas -v`: the register / spill report of each kernel is
//!    saved as `$OUT_DIR/<name>.ptxas.txt`, printed as cargo warnings when `ESLM_PTXAS_VERBOSE=1`, and any spill
//!    is always reported as a warning;
//! 3. runs bindgen over `kernels/eslm_kernels.h` (the kernels' parameter structs) into `$OUT_DIR/params.rs`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    /// The kernel families compiled into fatbins (one `.cu` each); the Rust side embeds exactly these.
    const KERNELS: [&str; 3] = ["token_stats", "select", "sparse_ce"];
    /// SASS for Ampere and Hopper plus PTX that newer GPUs JIT.
    const GENCODE: [&str; 6] = [
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-gencode",
        "arch=compute_90,code=compute_90",
    ];

    pub fn build() {
        let manifest = PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
        );
        let kernels = manifest.join("../../kernels");
        let kernels = kernels.canonicalize().unwrap_or(kernels);
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        println!("cargo:rerun-if-changed={}", kernels.display());
        for var in ["CUDA_HOME", "CUDA_PATH", "ESLM_PTXAS_VERBOSE", "NVCC_CCBIN"] {
            println!("cargo:rerun-if-env-changed={var}");
        }

        let nvcc = find_nvcc();
        println!("cargo:rerun-if-changed={}", nvcc.display());
        compile_kernels(&nvcc, &kernels, &out);
        bindgen_params(&kernels, &out);
    }

    /// `nvcc` from `CUDA_HOME`, `CUDA_PATH`, `PATH` or `/usr/local/cuda`, else a panic that says what to do.
    fn find_nvcc() -> PathBuf {
        let mut candidates = Vec::new();
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(home) = std::env::var_os(var) {
                candidates.push(PathBuf::from(home).join("bin").join("nvcc"));
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("nvcc")));
        }
        candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
        if let Some(found) = candidates.iter().find(|p| p.is_file()) {
            return found.clone();
        }
        panic!(
            "\n\neslm-kernels: the `cuda` feature needs nvcc (the CUDA compiler), and none was found in $CUDA_HOME/bin, \
             $CUDA_PATH/bin, PATH or /usr/local/cuda/bin.\n\
             HINT: install the pinned toolchain and point CUDA_HOME at it:\n\
             \n    export CUDA_HOME=$(scripts/install-cuda-toolchain.sh)\n\n\
             or set CUDA_HOME to your own CUDA toolkit (12.x / 13.0). Build without `--features cuda` for the CPU \
             backend only.\n"
        );
    }

    /// Compiles every kernel family in parallel (one nvcc process each) and checks the ptxas reports.
    fn compile_kernels(nvcc: &Path, kernels: &Path, out: &Path) {
        let verbose = std::env::var("ESLM_PTXAS_VERBOSE").is_ok_and(|v| v == "1");
        let children: Vec<_> = KERNELS
            .iter()
            .map(|name| {
                let src = kernels.join(format!("{name}.cu"));
                assert!(
                    src.is_file(),
                    "eslm-kernels: missing kernel source {}",
                    src.display()
                );
                let mut cmd = Command::new(nvcc);
                cmd.arg("-fatbin")
                    .args(["-O3", "-std=c++17", "-Xptxas", "-v"])
                    .arg("-I")
                    .arg(kernels)
                    .args(GENCODE)
                    .arg("-o")
                    .arg(out.join(format!("{name}.fatbin")))
                    .arg(&src);
                if let Some(ccbin) = std::env::var_os("NVCC_CCBIN") {
                    cmd.arg("-ccbin").arg(ccbin);
                }
                let child = cmd
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!("eslm-kernels: could not run {}: {e}", nvcc.display())
                    });
                (name, child)
            })
            .collect();
        for (name, child) in children {
            let output: Output = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("eslm-kernels: nvcc for {name}.cu did not finish: {e}"));
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            if !output.status.success() {
                panic!(
                    "eslm-kernels: nvcc failed on kernels/{name}.cu ({}):\n{log}",
                    output.status
                );
            }
            std::fs::write(out.join(format!("{name}.ptxas.txt")), &log)
                .unwrap_or_else(|e| panic!("eslm-kernels: cannot write the ptxas report: {e}"));
            let mut entry = String::new();
            for line in log.lines() {
                if let Some(rest) = line.split("Compiling entry function ").nth(1) {
                    entry = rest.trim().to_string();
                }
                if verbose && !line.trim().is_empty() {
                    println!("cargo:warning={name}.cu: {}", line.trim());
                }
                if line.contains("spill stores") && !line.contains(" 0 bytes spill stores") {
                    println!(
                        "cargo:warning={name}.cu: register spills in {entry}: {}",
                        line.trim()
                    );
                }
            }
        }
    }

    /// bindgen over the shared header: the structs and `ESLM_*` constants, with layout checks.
    fn bindgen_params(kernels: &Path, out: &Path) {
        let header = kernels.join("eslm_kernels.h");
        let bindings = bindgen::Builder::default()
            .header(header.to_string_lossy())
            .allowlist_type("Eslm.*")
            .allowlist_var("ESLM_.*")
            .derive_default(true)
            .derive_debug(true)
            .derive_copy(true)
            .generate()
            .unwrap_or_else(|e| {
                panic!(
                    "eslm-kernels: bindgen failed on {} ({e}). bindgen needs libclang: apt-get install libclang-dev",
                    header.display()
                )
            });
        bindings
            .write_to_file(out.join("params.rs"))
            .unwrap_or_else(|e| panic!("eslm-kernels: cannot write params.rs: {e}"));
    }
}
