#!/usr/bin/env bash
# The prepared GPU check for a lent GPU machine (issue 6, "Measurement on a GPU"). Builds nothing: it runs the
# binaries that scripts/build-gpu-bin.sh built here and copied into gpu-bin/ (carry it with the call).
#
#   here:   scripts/build-gpu-bin.sh
#   device: run(command="bash scripts/gpu-check.sh", carry=["gpu-bin"], timeout_s=540)
#
# Steps (whole script well under 8 minutes; each binary has its own time limit):
#   1. the GPU: nvidia-smi (name, driver, memory, clocks);
#   2. every parity test binary in gpu-bin/tests (GPU vs CPU; a skip message here means the driver was not found);
#   3. every benchmark binary in gpu-bin/benches (each prints a markdown table: per kernel, bandwidth as a
#      fraction of a device-to-device copy measured in the same run);
#   4. optional hooks for later issues: gpu-bin/extra/*.sh are run in order with the same $OUT (e.g. the GPT-2
#      124M train-step and PyTorch comparison; not written yet).
# Writes under $OUT (at most 8 files come back): gpu.txt, tests.log, bench.log, summary.md. The summary table is
# printed last, so it is in the reply's output tail.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$(mktemp -d)}"
BIN="${GPU_BIN:-gpu-bin}"
TEST_LIMIT_S="${TEST_LIMIT_S:-150}"
BENCH_LIMIT_S="${BENCH_LIMIT_S:-180}"
summary="$OUT/summary.md"
start_all=$(date +%s)

if [ ! -d "$BIN/tests" ]; then
  echo "error: $BIN/tests not found: run scripts/build-gpu-bin.sh here and carry $BIN" >&2
  exit 2
fi

{
  echo "# eslm GPU check, $(date -u +%FT%TZ)"
  [ -f "$BIN/MANIFEST" ] && sed 's/^/    /' "$BIN/MANIFEST" | head -n 2
  echo
} >"$summary"

echo "=== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
{
  echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
  echo
  echo "## Parity tests"
  echo
  echo "| binary | result | passed | failed | skipped (no driver) | s |"
  echo "|---|---|---|---|---|---|"
} >>"$summary"

fails=0
for t in "$BIN"/tests/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  echo "=== test $name"
  t0=$(date +%s)
  log="$OUT/tests.log"
  echo "##### $name" >>"$log"
  timeout "$TEST_LIMIT_S" "$t" --test-threads=1 --nocapture >>"$log" 2>&1
  rc=$?
  t1=$(date +%s)
  section=$(sed -n "/^##### $name\$/,\$p" "$log")
  passed=$(echo "$section" | grep -o '[0-9]* passed' | awk '{s+=$1} END{print s+0}')
  failed=$(echo "$section" | grep -o '[0-9]* failed' | awk '{s+=$1} END{print s+0}')
  skipped=$(echo "$section" | grep -o 'skipping: no CUDA' | wc -l)
  result=pass
  [ "$rc" -eq 124 ] && result="TIMEOUT (${TEST_LIMIT_S}s)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && result="FAIL (rc $rc)"
  [ "$rc" -ne 0 ] && fails=$((fails + 1))
  echo "| $name | $result | $passed | $failed | $skipped | $((t1 - t0)) |" >>"$summary"
  sed -n "/^##### $name\$/,\$p" "$log" | grep -E '^test |panicked|seed|skipping' | tail -n 40
done

{
  echo
  echo "## Kernel benchmarks (fraction of a device-to-device copy in the same run)"
  echo
} >>"$summary"
for b in "$BIN"/benches/*; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  echo "=== bench $name"
  echo "##### $name" >>"$OUT/bench.log"
  table="$OUT/bench_$name.md.tmp"
  ESLM_BENCH_OUT="$table" timeout "$BENCH_LIMIT_S" "$b" --bench >>"$OUT/bench.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ] && [ -s "$table" ]; then
    { echo "### $name"; echo; cat "$table"; echo; } >>"$summary"
  else
    echo "### $name: FAILED (rc $rc, see bench.log)" >>"$summary"
    fails=$((fails + 1))
  fi
  rm -f "$table"
  tail -n 30 "$OUT/bench.log"
done

if [ -d "$BIN/extra" ]; then
  for x in "$BIN"/extra/*.sh; do
    [ -f "$x" ] || continue
    echo "=== extra $(basename "$x")"
    OUT="$OUT" SUMMARY="$summary" timeout 300 bash "$x" || { echo "extra $(basename "$x") failed" >>"$summary"; fails=$((fails + 1)); }
  done
fi

echo >>"$summary"
echo "total $(( $(date +%s) - start_all )) s, failures: $fails" >>"$summary"
echo
echo "================ SUMMARY ================"
cat "$summary"
[ "$fails" -eq 0 ]
