//! Issue 12, "messages and CLI habits", through the `eslm-train` binary and the library's config checks: float
//! flags and TOML keys refuse NaN / inf naming the flag, errors print once without a backtrace and exit 1,
//! `--help` shows defaults, Ctrl-C and SIGTERM checkpoint and exit 130, flags that do not apply to the policy
//! warn, `--resume` names its checkpoint and the flag it refuses, bad ranges are refused, `--time-budget` stops
//! cleanly. Bigram runs: fast.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use eslm_train::checkpoint::list_checkpoints;
use eslm_train::config::{parse_duration, Device, PolicyKind, RunConfig, Storage, TrainArgs};
use eslm_train::metrics::read_metrics;
use eslm_train::run::run_training;

mod common;
use common::no_stop;

const SMALL: [&str; 14] = [
    "--model",
    "bigram",
    "--synthetic-documents",
    "64",
    "-b",
    "2",
    "-t",
    "16",
    "--eval-every",
    "0",
    "--eval-batches",
    "1",
    "--no-progress",
    "--warmup-steps=1",
];

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eslm-train"));
    c.env("RUST_BACKTRACE", "1");
    c
}

fn run(args: &[&str], out: &Path) -> Output {
    bin()
        .args(SMALL)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn nan_and_inf_in_flags_and_toml_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--lr", "nan"),
        ("--alpha", "inf"),
        ("--grad-clip", "-inf"),
        ("--kd-weight", "NaN"),
    ] {
        let o = run(
            &["--steps", "1", &format!("{flag}={value}")],
            &dir.path().join("x"),
        );
        let e = stderr(&o);
        assert!(!o.status.success());
        assert!(e.contains(flag) && e.contains(value), "{flag} {value}: {e}");
    }
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, "steps = 1\nalpha = nan\n").unwrap();
    let o = run(&["--config", toml.to_str().unwrap()], &dir.path().join("y"));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("`alpha`") && e.contains("NaN"), "{e}");
}

#[test]
fn errors_print_once_without_a_backtrace_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/train_*.bin");
    let o = run(
        &["--steps", "1", "--train", missing.to_str().unwrap()],
        &dir.path().join("r"),
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        !e.contains("stack backtrace") && !e.contains("Caused by"),
        "{e}"
    );
    assert_eq!(
        e.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{e}"
    );
    assert!(e.contains("no-such-dir"), "{e}");
    // Every printed line is distinct: no message repeated as its own cause.
    let lines: Vec<&str> = e.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let tail = l
            .trim_start_matches("  caused by: ")
            .trim_start_matches("error: ");
        assert!(
            !lines[..i].iter().any(|p| p.contains(tail)),
            "repeated: {e}"
        );
    }
}

#[test]
fn help_shows_defaults() {
    for args in [vec!["--help"], vec!["train", "--help"]] {
        let o = bin().args(&args).output().unwrap();
        let h = String::from_utf8_lossy(&o.stdout);
        for needle in [
            "[default: 0.003]",
            "[default: eslm]",
            "[default: 128]",
            "[default: runs/default]",
        ] {
            assert!(h.contains(needle), "{args:?} lacks {needle}");
        }
    }
}

fn wait_for_steps(out: &Path, n: usize, child: &mut std::process::Child) {
    let t0 = Instant::now();
    loop {
        let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|t| t.matches("\"kind\":\"step\"").count())
            .unwrap_or(0);
        if lines >= n {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("the trainer exited early: {s}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_and_sigint_checkpoint_then_exit_130() {
    let dir = tempfile::tempdir().unwrap();
    for sig in ["-TERM", "-INT"] {
        let out = dir.path().join(sig.trim_start_matches('-'));
        let mut child = bin()
            .args(SMALL)
            .args(["--steps", "100000000"])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_steps(&out, 5, &mut child);
        let ok = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(130), "{sig}: {}", stderr(&o));
        let ck = list_checkpoints(&out).unwrap();
        assert_eq!(ck.len(), 1, "{sig}");
        // And it resumes from that checkpoint.
        let r = run(&["--steps", &(ck[0].0 + 2).to_string(), "--resume"], &out);
        assert!(r.status.success(), "{}", stderr(&r));
        assert!(
            stderr(&r).contains(&format!("resuming from {}", ck[0].1.display())),
            "{}",
            stderr(&r)
        );
    }
}

/// Config-file keys warn like flags when set away from their default; a `config.toml` a run wrote (every key at
/// its value) does not.
#[test]
fn inapplicable_config_keys_warn_unless_at_their_default() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mine.toml");
    std::fs::write(
        &cfg,
        "select = \"clm\"\nalpha = 0.25\nkeep = 0.5\ntemperature = 1\nsteps = 2\n",
    )
    .unwrap();
    let o = run(&["--config", cfg.to_str().unwrap()], &dir.path().join("a"));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!(
            "warning: `alpha` in {} does not apply to select = clm",
            cfg.display()
        )),
        "{e}"
    );
    assert!(!e.contains("`keep`"), "keep is at its default: {e}");
    assert!(!e.contains("`temperature`"), "1 is the default 1.0: {e}");
    // The dump a plain clm run wrote (every key, most at their defaults) as --config of another run: no warnings.
    let o = run(&["--select", "clm", "--steps", "2"], &dir.path().join("b"));
    assert!(o.status.success(), "{}", stderr(&o));
    let written = dir.path().join("b/config.toml");
    let o = run(
        &["--config", written.to_str().unwrap()],
        &dir.path().join("c"),
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(!e.contains("warning:"), "{e}");
}

#[test]
fn inapplicable_flags_warn_and_resume_names_the_changed_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let o = run(
        &[
            "--steps",
            "2",
            "--select",
            "clm",
            "--teacher",
            "x",
            "--alpha-min",
            "0.2",
        ],
        &out,
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("warning: --teacher does not apply to --select clm"),
        "{e}"
    );
    assert!(e.contains("warning: --alpha-min does not apply"), "{e}");
    let o = run(&["--steps", "4", "--resume", "--grad-accum", "3"], &out);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        e.contains("--grad-accum: the checkpoint has 1, the flags ask for 3"),
        "{e}"
    );
    assert!(!e.contains('{'), "no JSON dump: {e}");
}

fn resolve(a: TrainArgs) -> String {
    RunConfig::resolve(&a)
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string())
}

#[test]
fn bad_ranges_are_refused_naming_the_flag() {
    let base = || TrainArgs {
        model: Some("bigram".into()),
        ..Default::default()
    };
    for (a, needle) in [
        (
            TrainArgs {
                token_budget: Some(0),
                ..base()
            },
            "--token-budget",
        ),
        (
            TrainArgs {
                grad_clip: Some(-1.0),
                ..base()
            },
            "--grad-clip",
        ),
        (
            TrainArgs {
                weight_decay: Some(-0.1),
                ..base()
            },
            "--weight-decay",
        ),
        (
            TrainArgs {
                divergence_factor: Some(0.5),
                ..base()
            },
            "--divergence-factor",
        ),
        (
            TrainArgs {
                time_budget: Some("soon".into()),
                ..base()
            },
            "--time-budget",
        ),
        (
            TrainArgs {
                matmul: Some(eslm_train::config::Matmul::Bf16),
                ..base()
            },
            "--matmul bf16",
        ),
        (
            TrainArgs {
                storage: Some(Storage::Bf16),
                ..base()
            },
            "--storage bf16 stores the GPU's activations in bf16; it needs --device cuda",
        ),
        (
            TrainArgs {
                storage: Some(Storage::Bf16),
                matmul: Some(eslm_train::config::Matmul::Tf32),
                device: Some(Device::Cuda(0)),
                model: Some("tiny".into()),
                ..base()
            },
            "drop --matmul tf32",
        ),
        (
            TrainArgs {
                storage: Some(Storage::Bf16),
                select: Some(PolicyKind::EslmKd),
                device: Some(Device::Cuda(0)),
                model: Some("tiny".into()),
                ..base()
            },
            "--storage bf16 with --select eslm-kd",
        ),
    ] {
        let e = resolve(a);
        assert!(e.contains(needle), "{needle}: {e:?}");
    }
    // --seq-len beyond a preset's fixed context is refused instead of silently enlarging the model.
    let dir = tempfile::tempdir().unwrap();
    let a = TrainArgs {
        model: Some("t".into()),
        seq_len: Some(2048),
        steps: Some(1),
        out: Some(dir.path().join("t")),
        no_progress: true,
        ..Default::default()
    };
    let e = run_training(&a, no_stop()).unwrap_err().to_string();
    assert!(e.contains("--seq-len 2048") && e.contains("1024"), "{e}");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("90s").unwrap(), 90.0);
    assert_eq!(parse_duration("30m").unwrap(), 1800.0);
    assert_eq!(parse_duration("2h").unwrap(), 7200.0);
    assert_eq!(parse_duration("1h30m").unwrap(), 5400.0);
    assert_eq!(parse_duration("45").unwrap(), 45.0);
    for bad in ["", "0s", "-5m", "2x", "h", "nan", "1h30"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn time_budget_stops_cleanly_with_a_checkpoint_and_decays_the_lr() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tb");
    let a = TrainArgs {
        model: Some("bigram".into()),
        synthetic_documents: Some(64),
        batch_size: Some(2),
        seq_len: Some(16),
        steps: Some(100_000_000),
        lr: Some(0.05),
        warmup_steps: Some(0),
        eval_every: Some(0),
        eval_batches: Some(1),
        time_budget: Some("1s".into()),
        out: Some(out.clone()),
        no_progress: true,
        ..Default::default()
    };
    let t0 = Instant::now();
    let s = run_training(&a, no_stop()).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(s.time_budget_reached && !s.interrupted);
    assert!(s.val_after.is_some(), "a clean finish evaluates");
    let ck = list_checkpoints(&out).unwrap();
    assert_eq!(ck.last().unwrap().0, s.steps);
    let (steps, _) = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let last = steps.last().unwrap();
    assert!(last.wall_s >= 1.0);
    // The cosine horizon was fitted to the budget: the LR has decayed most of the way (not still at its peak, as
    // with a 10^8-step horizon).
    assert!(last.lr < 0.6 * 0.05, "lr {}", last.lr);
}
