//! Times the KD row function against its f64 reference on one V = 50257 row (single thread):
//! `cargo run --release -p eslm-kernels --example kd_timing`. Figures in docs/perf.md.

use std::time::Instant;

use eslm_kernels::kd::{kd_row, kd_row_reference, KdParams};

type RowFn = fn(&[f32], &[f32], usize, KdParams, f32, &mut [f32]) -> f64;

fn main() {
    let v = 50257;
    let z: Vec<f32> = (0..v)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
        .collect();
    let u: Vec<f32> = (0..v)
        .map(|i| ((i * 104729) % 1000) as f32 * 0.01 - 5.0)
        .collect();
    let kd = KdParams {
        kd_weight: 0.5,
        temperature: 2.0,
    };
    let mut g = vec![0f32; 50304];
    let fns: [(&str, RowFn); 2] = [
        ("kd_row", kd_row::<f32>),
        ("kd_row_reference", kd_row_reference::<f32>),
    ];
    for (name, f) in fns {
        let reps = 100;
        let t0 = Instant::now();
        let mut loss = 0.0;
        for _ in 0..reps {
            loss += f(&z, &u, 3, kd, 1.0, &mut g);
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!(
            "{name}: {ms:.3} ms per row (mean loss {:.6})",
            loss / reps as f64
        );
    }
}
