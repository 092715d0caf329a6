//! Self-test of `MpiCollective`, run by `scripts/test-mpi.sh` under `mpirun -np 2` (any world size works): sums of
//! f32 / u32 / f64 across bucket boundaries, broadcasts from every root (lengths that differ before the call),
//! reduce-scatter and all-gather over the sharded layout (lengths that are not a multiple of the world size,
//! shards longer than a bucket, an empty buffer), a barrier, and an out-of-range root rejected as an error.
//! Prints `mpi_selftest: ok` on rank 0.

use eslm_collective::CollectiveError;

fn main() -> Result<(), CollectiveError> {
    let c = eslm_collective::from_env()?;
    let (rank, world) = (c.rank(), c.world_size());
    let mismatch = |what: &str| CollectiveError::Mismatch {
        op: "selftest",
        message: format!("rank {rank}: {what}"),
    };
    // f32: a buffer of 2.5 buckets; element i on rank r is i + r (exact in f32 for these sizes).
    let n = eslm_collective::mpi::BUCKET_BYTES / 4 * 5 / 2;
    let mut f: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 + rank as f32).collect();
    c.all_reduce_sum_f32(&mut f)?;
    let ranks_sum = (world * (world - 1) / 2) as f32;
    if f.iter()
        .enumerate()
        .any(|(i, &x)| x != world as f32 * (i % 1000) as f32 + ranks_sum)
    {
        return Err(mismatch("f32 sum"));
    }
    for len in [0, 1, 7, n + 3] {
        // Reduce-scatter: this rank's shard holds the sum; all-gather: every shard is its owner's.
        let mut g: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 + rank as f32).collect();
        c.reduce_scatter_sum_f32(&mut g)?;
        let own = eslm_collective::shard_range(len, world, rank);
        if own
            .clone()
            .any(|i| g[i] != world as f32 * (i % 1000) as f32 + ranks_sum)
        {
            return Err(mismatch(&format!("reduce-scatter of {len}")));
        }
        let mut p = vec![-1f32; len];
        for i in own {
            p[i] = (i % 977) as f32 * 0.5;
        }
        c.all_gather_f32(&mut p)?;
        if p.iter()
            .enumerate()
            .any(|(i, &x)| x != (i % 977) as f32 * 0.5)
        {
            return Err(mismatch(&format!("all-gather of {len}")));
        }
    }
    let mut u = vec![rank as u32 + 1; 4096];
    c.all_reduce_sum_u32(&mut u)?;
    if u.iter().any(|&x| x as usize != world * (world + 1) / 2) {
        return Err(mismatch("u32 sum"));
    }
    if c.sum_f64(0.5)? != 0.5 * world as f64 {
        return Err(mismatch("f64 sum"));
    }
    for root in 0..world {
        let mut b = vec![rank as u8; 3 + rank * 1000];
        c.broadcast_bytes(&mut b, root)?;
        if b.len() != 3 + root * 1000 || b.iter().any(|&x| x as usize != root) {
            return Err(mismatch("broadcast"));
        }
    }
    c.barrier()?;
    if c.broadcast_bytes(&mut Vec::new(), world).is_ok() {
        return Err(mismatch("a root outside the world was accepted"));
    }
    if rank == 0 {
        println!("mpi_selftest: ok ({world} ranks)");
    }
    Ok(())
}
