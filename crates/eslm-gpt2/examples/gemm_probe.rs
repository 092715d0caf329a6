//! GEMM throughput probe for the shapes of a training step (wall-clock and per-CPU-second GFLOP/s, so a busy
//! machine still gives a usable per-core figure).
//!
//! `cargo run --release -p eslm-gpt2 --example gemm_probe`

use eslm_gpt2::ops::matmul::{matmul, Mat};
use std::time::Instant;

/// Process CPU time (user + system) in seconds, from /proc/self/stat (0 where unavailable).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn main() {
    let shapes: [(&str, usize, usize, usize, bool, bool); 8] = [
        // name, m, n, k, a transposed, b transposed
        ("lm_head fwd  z=h·Wᵀ", 1024, 50257, 256, false, true),
        ("lm_head dh=dz·W", 1024, 256, 50257, false, false),
        ("lm_head dW=dzᵀ·h", 50257, 256, 1024, true, false),
        ("lm_head dh K=308", 308, 256, 50257, false, false),
        ("lm_head dW K=308", 50257, 256, 308, true, false),
        ("fc fwd (T)", 1024, 1024, 256, false, true),
        ("fc fwd (S)", 256, 3072, 768, false, true),
        ("fc dW (S)", 3072, 768, 256, true, false),
    ];
    for (name, m, n, k, at, bt) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0.0f32; m * n];
        let am = if at {
            Mat::transposed(&a[..], m)
        } else {
            Mat::rows(&a[..], k)
        };
        let bm = if bt {
            Mat::transposed(&b[..], k)
        } else {
            Mat::rows(&b[..], n)
        };
        matmul(m, n, k, &mut c, n, false, am, bm);
        let reps = 3;
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let mut fl = 0.0;
        for _ in 0..reps {
            fl += matmul(m, n, k, &mut c, n, false, am, bm);
        }
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        println!(
            "{name:24} {m}x{n}x{k}: {:.1} GFLOP/s wall, {:.1} GFLOP per CPU-second",
            fl / wall / 1e9,
            fl / cpu.max(1e-9) / 1e9
        );
    }
}
