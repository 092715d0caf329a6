//! On a GPU (`--features cuda`; skipped with a printed message where no CUDA driver loads): the trainer's CLM and
//! ESLM runs on `--device cuda` against the same runs on the CPU from the same seed, a CUDA checkpoint resumed on
//! the CPU, every other policy on CUDA against the CPU, and training with TF32 / bf16 products. Named `cuda_*` so
//! that `scripts/build-gpu-bin.sh` builds it for `scripts/gpu-check.sh`; with `ESLM_TEST_QUICK=1` (the
//! compute-sanitizer passes) only one CLM step is compared and the other tests are skipped.
#![cfg(feature = "cuda")]

use std::path::Path;

use eslm_train::checkpoint::list_checkpoints;
use eslm_train::config::{Device, PolicyKind, TrainArgs};
use eslm_train::metrics::{read_metrics, StepRecord};
use eslm_train::run::run_training;

mod common;
use common::no_stop;

fn quick() -> bool {
    std::env::var("ESLM_TEST_QUICK").is_ok_and(|v| v == "1")
}

/// A small GPT-2 run on the synthetic corpus on `device`.
fn small(out: &Path, select: PolicyKind, steps: u64, device: Device) -> TrainArgs {
    TrainArgs {
        device: Some(device),
        eval_batches: Some(2),
        ..common::small_gpt2(out, select, steps)
    }
}

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
    let (policies, steps): (&[PolicyKind], u64) = if quick() {
        (&[PolicyKind::Clm], 1)
    } else {
        (&[PolicyKind::Clm, PolicyKind::Eslm], 3)
    };
    for &select in policies {
        let (gpu, cpu) = (
            dir.path().join(format!("{select:?}-cuda")),
            dir.path().join(format!("{select:?}-cpu")),
        );
        run_training(&small(&gpu, select, steps, Device::Cuda(0)), no_stop())
            .unwrap_or_else(|e| panic!("{select:?} on cuda: {e}"));
        run_training(&small(&cpu, select, steps, Device::Cpu), no_stop()).unwrap();
        assert_close(&format!("{select:?}"), &steps_of(&gpu), &steps_of(&cpu));
    }
}

/// A checkpoint written on CUDA at step 3 resumes on the CPU; steps 4..6 match the CUDA run's.
#[test]
fn cuda_checkpoint_resumes_on_the_cpu() {
    if !gpu_or_skip("cuda_checkpoint_resumes_on_the_cpu") {
        return;
    }
    if quick() {
        println!("skipping cuda_checkpoint_resumes_on_the_cpu under ESLM_TEST_QUICK=1");
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

/// Every other policy for 2 steps on CUDA against the CPU from the same seed (losses within 1e-3): hierarchical
/// (the shallow pass continued on the device: `compact_blocks`), eslm-kd (the teacher on the GPU and
/// `kernels/kd.cu`), rho1 (the reference on the GPU), ada-eslm, random, importance. The teacher / reference is a
/// 3-step CPU CLM checkpoint of the same shape.
#[test]
fn every_policy_on_cuda_matches_the_cpu() {
    if !gpu_or_skip("every_policy_on_cuda_matches_the_cpu") {
        return;
    }
    if quick() {
        println!("skipping every_policy_on_cuda_matches_the_cpu under ESLM_TEST_QUICK=1");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scorer_run = dir.path().join("scorer");
    run_training(
        &small(&scorer_run, PolicyKind::Clm, 3, Device::Cpu),
        no_stop(),
    )
    .unwrap();
    let scorer = list_checkpoints(&scorer_run).unwrap().pop().unwrap().1;
    let policies = [
        PolicyKind::Hierarchical,
        PolicyKind::EslmKd,
        PolicyKind::Rho1,
        PolicyKind::AdaEslm,
        PolicyKind::Random,
        PolicyKind::Importance,
    ];
    for select in policies {
        let run = |device: Device, name: &str| {
            let out = dir.path().join(format!("{select:?}-{name}"));
            let mut a = small(&out, select, 2, device);
            match select {
                PolicyKind::Hierarchical => a.exit_layer = Some(1),
                PolicyKind::EslmKd => a.teacher = Some(scorer.clone()),
                PolicyKind::Rho1 => a.reference = Some(scorer.clone()),
                _ => {}
            }
            run_training(&a, no_stop()).unwrap_or_else(|e| panic!("{select:?} on {name}: {e}"));
            steps_of(&out)
        };
        assert_close(
            &format!("{select:?}"),
            &run(Device::Cuda(0), "cuda"),
            &run(Device::Cpu, "cpu"),
        );
    }
}

/// CLM with TF32 and bf16 tensor-core products (`--matmul`) for 3 steps against the CPU's f32: finite losses
/// within 2e-2 (TF32) and 5e-2 (bf16) of the CPU's.
#[test]
fn tensor_core_products_train_close_to_the_cpu() {
    if !gpu_or_skip("tensor_core_products_train_close_to_the_cpu") {
        return;
    }
    if quick() {
        println!("skipping tensor_core_products_train_close_to_the_cpu under ESLM_TEST_QUICK=1");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cpu_out = dir.path().join("cpu");
    run_training(&small(&cpu_out, PolicyKind::Clm, 3, Device::Cpu), no_stop()).unwrap();
    let cpu = steps_of(&cpu_out);
    for (matmul, tol) in [
        (eslm_train::config::Matmul::Tf32, 2e-2f32),
        (eslm_train::config::Matmul::Bf16, 5e-2),
    ] {
        let out = dir.path().join(format!("{matmul:?}"));
        let mut a = small(&out, PolicyKind::Clm, 3, Device::Cuda(0));
        a.matmul = Some(matmul);
        run_training(&a, no_stop()).unwrap_or_else(|e| panic!("--matmul {matmul:?}: {e}"));
        for (x, y) in steps_of(&out).iter().zip(&cpu) {
            assert!(
                x.loss.is_finite() && (x.loss - y.loss).abs() <= tol,
                "--matmul {matmul:?} step {}: loss {} vs CPU {}",
                x.step,
                x.loss,
                y.loss
            );
        }
    }
}

/// `--storage bf16` (bf16 activations and products, f32 master weights and optimizer state) for 20 steps of CLM
/// and of ESLM against the CPU's f32 run: every step's loss finite and within 0.1 of the CPU's (bf16 drift; the
/// CPU's loss falls ≈ 0.7 over these steps, so a run that does not learn fails), and the loss falls.
#[test]
fn bf16_storage_trains_close_to_the_cpu() {
    if !gpu_or_skip("bf16_storage_trains_close_to_the_cpu") {
        return;
    }
    if quick() {
        println!("skipping bf16_storage_trains_close_to_the_cpu under ESLM_TEST_QUICK=1");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for select in [PolicyKind::Clm, PolicyKind::Eslm] {
        let cpu_out = dir.path().join(format!("{select:?}-cpu"));
        run_training(&small(&cpu_out, select, 20, Device::Cpu), no_stop()).unwrap();
        let out = dir.path().join(format!("{select:?}-bf16"));
        let mut a = small(&out, select, 20, Device::Cuda(0));
        a.storage = Some(eslm_train::config::Storage::Bf16);
        run_training(&a, no_stop()).unwrap_or_else(|e| panic!("--storage bf16 {select:?}: {e}"));
        let (gpu, cpu) = (steps_of(&out), steps_of(&cpu_out));
        assert_eq!(gpu.len(), cpu.len(), "{select:?}: steps logged");
        for (x, y) in gpu.iter().zip(&cpu) {
            assert!(
                x.loss.is_finite() && (x.loss - y.loss).abs() <= 0.1,
                "--storage bf16 {select:?} step {}: loss {} vs CPU {}",
                x.step,
                x.loss,
                y.loss
            );
        }
        let (first, last) = (gpu[0].loss, gpu[gpu.len() - 1].loss);
        assert!(
            last < first - 0.3,
            "--storage bf16 {select:?}: loss {first} -> {last}"
        );
    }
}
