#!/usr/bin/env bash
# The prepared GPU check for a lent GPU machine (issues 6 and 10). Builds nothing: it runs the binaries that
# scripts/build-gpu-bin.sh built here and copied into gpu-bin/ (carry it with the call).
#
#   here:   scripts/build-gpu-bin.sh
#   device: run(command="bash scripts/gpu-check.sh", carry=["gpu-bin"], timeout_s=540)
#
# Steps, in this order, within a total budget of ESLM_CHECK_BUDGET_S (default 470 s, under 8 minutes; each step's
# limit is also cut to what is left of the budget, and a step that would get under 20 s is skipped and says so):
#   1. the GPU: nvidia-smi (name, driver, memory, clocks);
#   2. every parity test binary in gpu-bin/tests with CUDA_LAUNCH_BLOCKING=1 (a kernel fault is reported at the
#      launch that caused it): cuda_parity (eslm-kernels: token stats, select, sparse CE) and cuda_backend
#      (eslm-gpt2's CUDA backend: every op and whole training steps against the CPU backend; never run yet) and
#      cuda_device (eslm-train: CLM / ESLM runs on --device cuda vs cpu, a CUDA checkpoint resumed on the CPU);
#   3. the same binaries under compute-sanitizer: memcheck, racecheck, synccheck, with ESLM_TEST_QUICK=1 (reduced
#      sizes; the sanitizer slows kernels 10-100x). compute-sanitizer comes from gpu-bin/sanitizer/*.whl (the PyPI
#      wheel nvidia-cuda-sanitizer-api, unpacked here into a temporary folder), else from PATH; without either the
#      three rows say "no compute-sanitizer";
#   4. every benchmark binary in gpu-bin/benches, each printing a markdown table: kernels_cuda (per kernel,
#      bandwidth as a fraction of a device-to-device copy measured in the same run) and train_step_cuda (GPT-2 124M,
#      T=1024: CLM, ESLM loss keep 0.5 and 0.3, hierarchical; step / CLM ratios, device memory, and the one-rank
#      NCCL all-reduce of the gradient buffer as a share of a CLM step);
#   5. optional hooks for later issues: gpu-bin/extra/*.sh, in order, with the same $OUT.
# Writes under $OUT: gpu.txt, tests.log, sanitizer-<tool>.log, bench.log, summary.md. The summary (one table of
# every step, then the benchmark tables) is printed last, so it is in the reply's output tail. Seeds of failed
# tests are in the logs ("FAILED with seed ...; replay with ESLM_TEST_SEED=...").
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BIN="${GPU_BIN:-gpu-bin}"
BUDGET_S="${ESLM_CHECK_BUDGET_S:-470}"
TEST_LIMIT_S="${TEST_LIMIT_S:-90}"
SAN_LIMIT_S="${SAN_LIMIT_S:-80}"
BENCH_LIMIT_S="${BENCH_LIMIT_S:-120}"
summary="$OUT/summary.md"
steps="$OUT/steps.md.tmp"
benches_md="$OUT/benches.md.tmp"
start_all=$(date +%s)
fails=0

if [ ! -d "$BIN/tests" ]; then
  echo "error: $BIN/tests not found: run scripts/build-gpu-bin.sh here and carry $BIN" >&2
  exit 2
fi
: >"$steps"
: >"$benches_md"

# Seconds a step may take: its own limit, cut to what is left of the budget (0 if under 20 s are left).
limit_for() {
  local want=$1 left
  left=$((BUDGET_S - ($(date +%s) - start_all)))
  [ "$left" -lt 20 ] && { echo 0; return; }
  [ "$want" -gt "$left" ] && want=$left
  echo "$want"
}

# row STEP BINARY RESULT PASSED FAILED SKIPPED SECONDS
row() { echo "| $1 | $2 | $3 | $4 | $5 | $6 | $7 |" >>"$steps"; }

# Runs one test binary (optionally under a command prefix) into LOG; adds a row; counts failures.
run_test() {
  local step=$1 t=$2 log=$3 limit=$4
  shift 4
  local name t0 rc section passed failed skipped result
  name=$(basename "$t")
  if [ "$limit" -eq 0 ]; then
    row "$step" "$name" "SKIPPED (time budget spent)" - - - 0
    return
  fi
  echo "=== $step: $name (limit ${limit}s)"
  echo "##### $step $name" >>"$log"
  t0=$(date +%s)
  timeout "$limit" "$@" "$t" --test-threads=1 --nocapture >>"$log" 2>&1
  rc=$?
  section=$(sed -n "/^##### $step $name\$/,\$p" "$log")
  passed=$(echo "$section" | grep -o '[0-9]* passed' | awk '{s+=$1} END{print s+0}')
  failed=$(echo "$section" | grep -o '[0-9]* failed' | awk '{s+=$1} END{print s+0}')
  skipped=$(echo "$section" | grep -c 'skipping: no CUDA')
  result=pass
  [ "$rc" -eq 124 ] && result="TIMEOUT (${limit}s)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && result="FAIL (rc $rc)"
  if echo "$section" | grep -q 'ERROR SUMMARY: [1-9]'; then
    result="FAIL ($(echo "$section" | grep -o 'ERROR SUMMARY: [0-9]* error[s]*' | tail -n 1))"
    rc=1
  fi
  [ "$rc" -ne 0 ] && fails=$((fails + 1))
  row "$step" "$name" "$result" "$passed" "$failed" "$skipped" $(($(date +%s) - t0))
  echo "$section" | grep -E '^test |panicked|seed|skipping|ERROR SUMMARY|=========' | tail -n 30
}

echo "=== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
# Without a GPU the parity tests still run (and skip visibly); the sanitizer and the benchmarks are not run.
have_gpu=1
nvidia-smi -L >/dev/null 2>&1 || { have_gpu=0; echo "no GPU found (nvidia-smi -L failed): sanitizer and benchmarks are not run"; }

# 2. Parity tests, launches synchronous.
for t in "$BIN"/tests/*; do
  [ -x "$t" ] || continue
  run_test "tests (CUDA_LAUNCH_BLOCKING=1)" "$t" "$OUT/tests.log" "$(limit_for "$TEST_LIMIT_S")" \
    env CUDA_LAUNCH_BLOCKING=1
done

# 3. The same under compute-sanitizer.
sanitizer=""
wheel=$(ls "$BIN"/sanitizer/*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
  san_dir=$(mktemp -d)
  if python3 -m zipfile -e "$wheel" "$san_dir" >/dev/null 2>&1 || unzip -q "$wheel" -d "$san_dir" >/dev/null 2>&1; then
    san_bin="$san_dir/nvidia/cu13/bin"
    cp -n "$san_dir"/nvidia/cu13/lib/*.so "$san_bin"/ 2>/dev/null || true
    chmod +x "$san_bin/compute-sanitizer" 2>/dev/null
    [ -x "$san_bin/compute-sanitizer" ] && sanitizer="$san_bin/compute-sanitizer"
  fi
fi
[ -z "$sanitizer" ] && sanitizer=$(command -v compute-sanitizer || true)
[ -n "$sanitizer" ] && echo "compute-sanitizer: $sanitizer ($("$sanitizer" --version 2>&1 | tail -n 1))"
for tool in memcheck racecheck synccheck; do
  for t in "$BIN"/tests/*; do
    [ -x "$t" ] || continue
    if [ "$have_gpu" -eq 0 ]; then
      row "compute-sanitizer $tool" "$(basename "$t")" "NOT RUN (no GPU)" - - - 0
      fails=$((fails + 1))
      continue
    fi
    if [ -z "$sanitizer" ]; then
      row "compute-sanitizer $tool" "$(basename "$t")" "NOT RUN (no compute-sanitizer)" - - - 0
      fails=$((fails + 1))
      continue
    fi
    run_test "compute-sanitizer $tool" "$t" "$OUT/sanitizer-$tool.log" "$(limit_for "$SAN_LIMIT_S")" \
      env ESLM_TEST_QUICK=1 "$sanitizer" --tool "$tool" --error-exitcode 99 --target-processes all
  done
done

# 4. Benchmarks (kernels, train steps).
for b in "$BIN"/benches/*; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  limit=$(limit_for "$BENCH_LIMIT_S")
  if [ "$have_gpu" -eq 0 ]; then
    row "bench" "$name" "NOT RUN (no GPU)" - - - 0
    fails=$((fails + 1))
    continue
  fi
  if [ "$limit" -eq 0 ]; then
    row "bench" "$name" "SKIPPED (time budget spent)" - - - 0
    continue
  fi
  echo "=== bench $name (limit ${limit}s)"
  echo "##### $name" >>"$OUT/bench.log"
  table="$OUT/bench_$name.md.tmp"
  t0=$(date +%s)
  ESLM_BENCH_OUT="$table" timeout "$limit" "$b" --bench >>"$OUT/bench.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ] && [ -s "$table" ]; then
    row "bench" "$name" pass - - - $(($(date +%s) - t0))
    { echo "### $name"; echo; cat "$table"; echo; } >>"$benches_md"
  else
    row "bench" "$name" "FAIL (rc $rc, see bench.log)" - - - $(($(date +%s) - t0))
    fails=$((fails + 1))
  fi
  rm -f "$table"
  tail -n 30 "$OUT/bench.log"
done

# 5. Hooks of later issues.
if [ -d "$BIN/extra" ]; then
  for x in "$BIN"/extra/*.sh; do
    [ -f "$x" ] || continue
    limit=$(limit_for 300)
    [ "$limit" -eq 0 ] && { row "extra" "$(basename "$x")" "SKIPPED (time budget spent)" - - - 0; continue; }
    echo "=== extra $(basename "$x")"
    t0=$(date +%s)
    if OUT="$OUT" SUMMARY="$benches_md" timeout "$limit" bash "$x"; then
      row "extra" "$(basename "$x")" pass - - - $(($(date +%s) - t0))
    else
      row "extra" "$(basename "$x")" FAIL - - - $(($(date +%s) - t0))
      fails=$((fails + 1))
    fi
  done
fi

{
  echo "# eslm GPU check, $(date -u +%FT%TZ)"
  [ -f "$BIN/MANIFEST" ] && sed 's/^/    /' "$BIN/MANIFEST" | head -n 2
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
  echo
  echo "| step | binary | result | passed | failed | skipped (no driver) | s |"
  echo "|---|---|---|---|---|---|---|"
  cat "$steps"
  echo
  echo "total $(($(date +%s) - start_all)) s of a ${BUDGET_S} s budget, failures: $fails"
  if [ -s "$benches_md" ]; then
    echo
    echo "## Benchmarks (kernels: fraction of a device-to-device copy in the same run; train steps: 124M, T=1024)"
    echo
    cat "$benches_md"
  fi
} >"$summary"
rm -f "$steps" "$benches_md"
echo
echo "================ SUMMARY ================"
cat "$summary"
[ "$fails" -eq 0 ]
