//! Times the collectives of `MpiCollective` on a gradient-sized f32 buffer (default 6.5 M floats, the default
//! tiny GPT-2; `mpi_bench [FLOATS] [REPEATS]`): the all-reduce of plain data parallelism and ZeRO-1's
//! reduce-scatter + all-gather. Median milliseconds per call, printed by rank 0.
//!
//! `mpirun -np 2 target/release/examples/mpi_bench 6500000 20` (build with `--features mpi`).

use std::time::Instant;

use eslm_collective::CollectiveError;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), CollectiveError> {
    let c = eslm_collective::from_env()?;
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (len, reps) = (arg(1, 6_500_000), arg(2, 20).max(1));
    let mut buf: Vec<f32> = (0..len).map(|i| (i % 1000) as f32).collect();
    let mut time = |f: &mut dyn FnMut(&mut [f32]) -> Result<(), CollectiveError>| {
        let mut t = Vec::with_capacity(reps);
        for _ in 0..reps {
            c.barrier()?;
            let t0 = Instant::now();
            f(&mut buf)?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok::<f64, CollectiveError>(median(t))
    };
    let all_reduce = time(&mut |b| c.all_reduce_sum_f32(b))?;
    let reduce_scatter = time(&mut |b| c.reduce_scatter_sum_f32(b))?;
    let all_gather = time(&mut |b| c.all_gather_f32(b))?;
    if c.is_root() {
        println!(
            "{} ranks, {len} f32, median of {reps}: all-reduce {all_reduce:.2} ms | reduce-scatter {reduce_scatter:.2} ms \
             + all-gather {all_gather:.2} ms = {:.2} ms",
            c.world_size(),
            reduce_scatter + all_gather
        );
    }
    Ok(())
}
