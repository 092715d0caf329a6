//! `--device cpu | cuda | cuda:N` without a GPU: the flag's parsing (through the binary), the error of a build
//! without the `cuda` feature, and the no-driver error of a `cuda` build on a machine without a GPU (never a
//! panic; the output directory untouched). Where a GPU is usable these checks skip with a message; the training
//! runs on the GPU are in `cuda_device.rs`.

use std::path::Path;
use std::process::Command;

use eslm_train::config::{Device, PolicyKind, TrainArgs};
use eslm_train::run::run_training;

mod common;
use common::no_stop;

/// A small GPT-2 run on the synthetic corpus on `device`.
fn small(out: &Path, select: PolicyKind, steps: u64, device: Device) -> TrainArgs {
    TrainArgs {
        device: Some(device),
        eval_batches: Some(2),
        ..common::small_gpt2(out, select, steps)
    }
}

#[test]
fn bad_device_values_are_named_by_the_cli() {
    for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
        let out = Command::new(env!("CARGO_BIN_EXE_eslm-train"))
            .args(["train", "--device", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--device {bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{bad}` is not a device")), "{err}");
        assert!(err.contains("cuda:N"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// What `--device cuda` answers on a machine where the GPU test cannot run: without the feature, "rebuild with
/// --features cuda"; with it and no driver, the backend's "no CUDA driver found; use --device cpu". The output
/// directory is not touched. Returns `false` where a GPU is usable (nothing to check).
fn cuda_refusal_checked(device: Device) -> bool {
    #[cfg(feature = "cuda")]
    if eslm_kernels::cuda::cuda_available() {
        return false;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = run_training(&small(&out, PolicyKind::Clm, 1, device), no_stop())
        .unwrap_err()
        .to_string();
    if cfg!(feature = "cuda") {
        assert!(
            err.contains("no CUDA driver found; use --device cpu"),
            "{err}"
        );
        assert!(err.contains(&format!("--device {device}")), "{err}");
    } else {
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
    }
    assert!(!out.exists(), "the refused run created {}", out.display());
    true
}

#[test]
fn cuda_without_a_usable_gpu_is_a_clear_error() {
    for device in [Device::Cuda(0), Device::Cuda(1)] {
        if !cuda_refusal_checked(device) {
            println!(
                "skipping cuda_without_a_usable_gpu_is_a_clear_error: a CUDA device is present"
            );
            return;
        }
    }
}

#[test]
fn cuda_refusal_through_the_binary_is_not_a_panic() {
    #[cfg(feature = "cuda")]
    if eslm_kernels::cuda::cuda_available() {
        println!(
            "skipping cuda_refusal_through_the_binary_is_not_a_panic: a CUDA device is present"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_eslm-train"))
        .args(["train", "--device", "cuda:0", "--no-progress", "--out"])
        .arg(dir.path().join("run"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let want = if cfg!(feature = "cuda") {
        "no CUDA driver found; use --device cpu"
    } else {
        "--features cuda"
    };
    assert!(err.contains(want), "{err}");
}
