//! `--device cpu | cuda | cuda:N`: the flag's parsing (through the binary), the error of a build without the
//! `cuda` feature, the no-driver error of a `cuda` build on a machine without a GPU (never a panic), and, on a
//! GPU, CLM and ESLM runs on CUDA against the same runs on the CPU plus a CUDA checkpoint resumed on the CPU.
//! The GPU test skips with a printed message where no CUDA driver loads (and does not exist without the
//! feature).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use eslm_train::config::{Device, PolicyKind, TrainArgs};
use eslm_train::run::run_training;

fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// A small GPT-2 run on the synthetic corpus.
fn small(out: &Path, select: PolicyKind, steps: u64, device: Device) -> TrainArgs {
    TrainArgs {
        model: Some("synth-tiny".into()),
        n_layer: Some(2),
        n_embd: Some(32),
        n_head: Some(2),
        synthetic_documents: Some(256),
        select: Some(select),
        steps: Some(steps),
        batch_size: Some(4),
        seq_len: Some(32),
        lr: Some(3e-3),
        warmup_steps: Some(2),
        eval_every: Some(0),
        eval_batches: Some(2),
        device: Some(device),
        out: Some(out.to_path_buf()),
        no_progress: true,
        ..Default::default()
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

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use eslm_train::checkpoint::list_checkpoints;
    use eslm_train::metrics::{read_metrics, StepRecord};

    const TOL: f32 = 1e-3;

    fn gpu_or_skip(test: &str) -> bool {
        if eslm_kernels::cuda::cuda_available() {
            true
        } else {
            println!("skipping: no CUDA device for {test}");
            false
        }
    }

    fn steps_of(out: &Path) -> Vec<StepRecord> {
        read_metrics(&out.join("metrics.jsonl")).unwrap().0
    }

    fn assert_close(what: &str, a: &[StepRecord], b: &[StepRecord]) {
        assert_eq!(a.len(), b.len(), "{what}: step counts");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.step, y.step, "{what}");
            for (name, p, q) in [
                ("loss", x.loss, y.loss),
                ("loss_kept", x.loss_kept, y.loss_kept),
            ] {
                assert!(
                    p.is_finite() && (p - q).abs() <= TOL,
                    "{what} step {} {name}: {p} vs {q}",
                    x.step
                );
            }
            println!(
                "{what} step {}: loss {} vs {} (|d| = {:.2e})",
                x.step,
                x.loss,
                y.loss,
                (x.loss - y.loss).abs()
            );
        }
    }

    /// 3 steps of CLM and of ESLM from the same seed on CUDA and on the CPU: the per-step losses agree within
    /// 1e-3 (f32 on both; the GPU's summation order differs).
    #[test]
    fn clm_and_eslm_on_cuda_match_the_cpu() {
        if !gpu_or_skip("clm_and_eslm_on_cuda_match_the_cpu") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for select in [PolicyKind::Clm, PolicyKind::Eslm] {
            let (gpu, cpu) = (
                dir.path().join(format!("{select:?}-cuda")),
                dir.path().join(format!("{select:?}-cpu")),
            );
            run_training(&small(&gpu, select, 3, Device::Cuda(0)), no_stop())
                .unwrap_or_else(|e| panic!("{select:?} on cuda: {e}"));
            run_training(&small(&cpu, select, 3, Device::Cpu), no_stop()).unwrap();
            assert_close(&format!("{select:?}"), &steps_of(&gpu), &steps_of(&cpu));
        }
    }

    /// A checkpoint written on CUDA at step 3 resumes on the CPU; steps 4..6 match the CUDA run's.
    #[test]
    fn cuda_checkpoint_resumes_on_the_cpu() {
        if !gpu_or_skip("cuda_checkpoint_resumes_on_the_cpu") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("cuda");
        let mut a = small(&full, PolicyKind::Eslm, 6, Device::Cuda(0));
        a.checkpoint_every = Some(3);
        a.keep_last = Some(3);
        run_training(&a, no_stop()).unwrap();
        let full_steps = steps_of(&full);

        let part = dir.path().join("cpu");
        let (_, three) = list_checkpoints(&full)
            .unwrap()
            .into_iter()
            .find(|(s, _)| *s == 3)
            .unwrap();
        let dst = part.join("checkpoints").join(three.file_name().unwrap());
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(&three).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        let mut b = small(&part, PolicyKind::Eslm, 6, Device::Cpu);
        b.checkpoint_every = Some(3);
        b.resume = true;
        run_training(&b, no_stop()).unwrap();
        assert_close("resume cuda -> cpu", &full_steps[3..], &steps_of(&part));
    }
}
