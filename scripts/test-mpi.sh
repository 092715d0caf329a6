#!/usr/bin/env bash
# Data-parallel tests on CPU ranks (docs/distributed.md): builds eslm with `--features mpi` and runs, under
# `mpirun -np 2` (Open MPI; `--allow-run-as-root --oversubscribe` so it also runs as root in CI and on 1–2 cores):
#   1. the MpiCollective self-test (sums across bucket boundaries, broadcasts from every root, barrier);
#   2. the distributed global VaR threshold against the single-process one, bitwise (ties, ±0, ±inf, NaN);
#   3. 2 ranks × B/2 against 1 rank × B: per-step losses within 1e-5 and identical kept counts (clm, eslm loss and
#      entropy, ada-eslm, a tiny GPT-2), and the meaningful properties of random (per-rank streams);
#   4. resume from a checkpoint at 2 ranks is bitwise; resuming on another world size is refused;
#   4b. the sharded optimizer (ZeRO-1) against the unsharded one, and its resume;
#   5. SIGINT or SIGTERM to one rank stops every rank after the same step with a checkpoint (exit 130, as a
#      single-process run does after an interrupt);
#   6. SIGKILL of one rank ends the whole job with an error within a timeout (no rank hangs).
# Needs mpicc/mpirun (Debian: libopenmpi-dev openmpi-bin) and libclang (bindgen). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo; echo "=== test-mpi: $* ($(date -u +%H:%M:%S))"; }
fail() { echo "test-mpi: FAIL: $*" >&2; exit 1; }

command -v mpirun >/dev/null || fail "mpirun not found; HINT: apt-get install libopenmpi-dev openmpi-bin"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
MPIRUN=(mpirun -np 2 --allow-run-as-root --oversubscribe)
TIMEOUT=120 # seconds any one mpirun may take before the test fails (a hang is a failure)

step "build (--release --features mpi)"
cargo build --release -p eslm-collective --features mpi --example mpi_selftest
cargo build --release -p eslm-train --features mpi --bin eslm-train --example mpi_check
BIN="$TARGET/release/eslm-train"
CHECK="$TARGET/release/examples/mpi_check"

WORK="$(mktemp -d)"
cleanup() {
  if [ -n "${MPIRUN_PID:-}" ] && kill -0 "$MPIRUN_PID" 2>/dev/null; then kill -TERM "$MPIRUN_PID" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

step "MpiCollective self-test"
timeout "$TIMEOUT" "${MPIRUN[@]}" "$TARGET/release/examples/mpi_selftest"

step "global threshold: distributed == single process, bitwise"
timeout "$TIMEOUT" "${MPIRUN[@]}" "$CHECK" threshold

step "2 ranks × B/2 == 1 rank × B"
timeout "$TIMEOUT" "${MPIRUN[@]}" "$CHECK" parity "$WORK/parity"

step "resume at 2 ranks is bitwise"
timeout "$TIMEOUT" "${MPIRUN[@]}" "$CHECK" resume "$WORK/resume"

step "sharded optimizer (ZeRO-1) == unsharded; its resume"
timeout "$TIMEOUT" "${MPIRUN[@]}" "$CHECK" zero "$WORK/zero"

# A small run of the real binary; extra flags are appended.
TRAIN=(--model bigram --synthetic-documents 256 --batch-size 2 --seq-len 32 --no-progress --eval-every 0 --eval-batches 2)

step "--checkpoint-interval at 2 ranks: every rank agrees when a checkpoint is due"
# An interval shorter than any step: a checkpoint after every step, written once, with no rank left waiting.
timeout "$TIMEOUT" "${MPIRUN[@]}" "$BIN" "${TRAIN[@]}" --steps 4 --keep-last 10 --checkpoint-interval 0.000001 \
  --out "$WORK/interval" >/dev/null || fail "the run with --checkpoint-interval failed or hung"
got=$(ls "$WORK/interval/checkpoints" | tr '\n' ' ')
[ "$got" = "step_00000001 step_00000002 step_00000003 step_00000004 " ] || fail "checkpoints: $got"

step "resume on another world size is refused"
timeout "$TIMEOUT" "${MPIRUN[@]}" "$BIN" "${TRAIN[@]}" --steps 3 --out "$WORK/ws" >/dev/null
[ "$(grep -c '"kind":"step"' "$WORK/ws/metrics.jsonl")" = 3 ] || fail "expected 3 step lines written once by rank 0"
if "$BIN" "${TRAIN[@]}" --steps 6 --resume --out "$WORK/ws" 2>"$WORK/ws.err"; then
  fail "a 1-process resume of a 2-rank checkpoint was accepted"
fi
grep -q "written by 2 rank(s), this job has 1" "$WORK/ws.err" || { cat "$WORK/ws.err"; fail "unclear world-size error"; }
timeout "$TIMEOUT" "${MPIRUN[@]}" "$BIN" "${TRAIN[@]}" --steps 6 --resume --out "$WORK/ws" >/dev/null
[ "$(grep -c '"kind":"step"' "$WORK/ws/metrics.jsonl")" = 6 ] || fail "the 2-rank resume did not reach step 6"

# Starts a long 2-rank run in the background; sets MPIRUN_PID and RANK_PID[r] once rank 0 has logged a few steps.
start_long_run() {
  local out="$1"
  "${MPIRUN[@]}" "$BIN" "${TRAIN[@]}" --steps 100000000 --out "$out" >"$out.log" 2>&1 &
  MPIRUN_PID=$!
  RANK_PID=()
  for _ in $(seq 1 300); do
    sleep 0.1
    if [ -f "$out/metrics.jsonl" ] && [ "$(grep -c '"kind":"step"' "$out/metrics.jsonl")" -ge 5 ]; then break; fi
  done
  for p in $(pgrep -P "$MPIRUN_PID"); do
    r=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p')
    [ -n "$r" ] && RANK_PID[$r]="$p"
  done
  [ -n "${RANK_PID[0]:-}" ] && [ -n "${RANK_PID[1]:-}" ] || { cat "$out.log"; fail "ranks of mpirun $MPIRUN_PID not found"; }
}

# Waits for mpirun up to $TIMEOUT seconds; sets RC (124: it hung and was killed).
wait_mpirun() {
  local waited=0
  while kill -0 "$MPIRUN_PID" 2>/dev/null && [ "$waited" -lt $((TIMEOUT * 10)) ]; do sleep 0.1; waited=$((waited + 1)); done
  if kill -0 "$MPIRUN_PID" 2>/dev/null; then
    kill -KILL "$MPIRUN_PID" || true
    RC=124
  else
    RC=0; wait "$MPIRUN_PID" || RC=$?
  fi
  MPIRUN_PID=""
}

for sig_rank in "INT 1" "TERM 0"; do
  read -r sig rank <<<"$sig_rank"
  step "SIG$sig to rank $rank stops both ranks after the same step, with a checkpoint"
  out="$WORK/stop-$sig"
  start_long_run "$out"
  kill "-$sig" "${RANK_PID[$rank]}"
  wait_mpirun
  [ "$RC" = 130 ] || { cat "$out.log"; fail "mpirun exited with $RC (expected 130) after SIG$sig to rank $rank"; }
  grep -q "interrupted at step" "$out.log" || fail "rank 0 did not report the interruption"
  last=$(grep '"kind":"step"' "$out/metrics.jsonl" | tail -n 1 | sed 's/.*"step":\([0-9]*\).*/\1/')
  [ -d "$out/checkpoints/step_$(printf %08d "$last")" ] || fail "no checkpoint at the last step $last"
  echo "stopped at step $last with a checkpoint"
done

step "SIGKILL of rank 1 ends the job with an error within ${TIMEOUT}s"
start_long_run "$WORK/kill"
t0=$(date +%s)
kill -KILL "${RANK_PID[1]}"
wait_mpirun
[ "$RC" != 124 ] || fail "the job hung after rank 1 was killed"
[ "$RC" != 0 ] || fail "mpirun exited 0 after rank 1 was killed"
echo "mpirun exited with $RC after $(( $(date +%s) - t0 ))s"

step "all MPI tests passed"
