#!/usr/bin/env bash
# CPU scaling in one run (docs/perf.md): the same global batch trained as 1 rank × 2 threads, 2 ranks × 1 thread
# (mpirun, RAYON_NUM_THREADS=1; also with --shard-optimizer, ZeRO-1) and 1 rank × 1 thread, for ESLM (global scope) and CLM on the default tiny GPT-2
# (synth-tiny: L2 H4 C128, T128), global batch 8. Prints training tokens/s (all ranks' tokens; evaluation
# excluded) and, for 2 ranks, the share of rank 0's training time spent in the gradient reduction, with the date,
# commit and load. Usage: scripts/bench-mpi.sh [STEPS] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-30}"; REPEATS="${2:-2}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p eslm-train --features mpi --bin eslm-train >/dev/null 2>&1
BIN="$TARGET/release/eslm-train"
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD)  cpus: $(nproc)"
echo "load before: $(uptime | sed 's/.*load average: //')"
COMMON=(--steps "$STEPS" --seq-len 128 --eval-every 0 --eval-batches 1 --no-progress --quantile-scope global)
tps() { grep '^tokens/s' | awk '{print $2}'; }
share() { grep '^gradient reduction' | awk '{print $3}'; }
MPI=(mpirun -np 2 --allow-run-as-root --oversubscribe -x RAYON_NUM_THREADS=1)
for rep in $(seq 1 "$REPEATS"); do
  for select in eslm clm; do
    a=$(RAYON_NUM_THREADS=2 "$BIN" "${COMMON[@]}" --select "$select" --batch-size 8 --out "$WORK/a$rep$select" | tps)
    "${MPI[@]}" "$BIN" "${COMMON[@]}" --select "$select" --batch-size 4 --out "$WORK/b$rep$select" >"$WORK/b.log"
    b=$(tps <"$WORK/b.log"); bs=$(share <"$WORK/b.log")
    "${MPI[@]}" "$BIN" "${COMMON[@]}" --select "$select" --batch-size 4 --shard-optimizer --out "$WORK/z$rep$select" >"$WORK/z.log"
    z=$(tps <"$WORK/z.log"); zs=$(share <"$WORK/z.log")
    c=$(RAYON_NUM_THREADS=1 "$BIN" "${COMMON[@]}" --select "$select" --batch-size 8 --out "$WORK/c$rep$select" | tps)
    echo "repeat $rep $select: 1 rank x 2 threads $a tok/s | 2 ranks x 1 thread $b tok/s (reduction $bs of rank 0's time)" \
      "| 2 ranks, --shard-optimizer $z tok/s (reduction $zs) | 1 rank x 1 thread $c tok/s"
  done
done
echo "load after: $(uptime | sed 's/.*load average: //')"
