#!/usr/bin/env bash
# Measures each policy's training step time relative to CLM on the same data, model and batch, interleaved
# (clm, A, B, ..., clm, A, B, ...) so that a load change hits every policy alike. Prints one line per policy with
# tokens/s per round and the ratio of mean step times (policy / clm): the `time_ratio` of an experiment spec
# (experiments/*.toml), which turns an equal wall-clock budget into steps independent of the load during the runs.
#
# Usage: scripts/step-ratios.sh [ROUNDS] [STEPS] -- COMMON TRAIN FLAGS...   (policies: one per line on stdin)
# Example:
#   printf '%s\n' "--select random --keep 0.3 --lazy-head" "--select eslm --alpha 0.7" |
#     scripts/step-ratios.sh 2 20 -- --train 'data/gutenberg/train_*.bin' --model synth-tiny --batch-size 8 --seq-len 128
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"; STEPS="${2:-20}"; shift 2 || true
[ "${1:-}" = "--" ] && shift
COMMON=("$@")
mapfile -t POLICIES
POLICIES=("--select clm" "${POLICIES[@]}")
BIN="${ESLM_TRAIN_BIN:-target/release/eslm-train}"
[ -x "$BIN" ] || cargo build --release -q -p eslm-train
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A SUM
for r in $(seq "$ROUNDS"); do
  for i in "${!POLICIES[@]}"; do
    # shellcheck disable=SC2086
    tps=$("$BIN" "${COMMON[@]}" ${POLICIES[$i]} --steps "$STEPS" --eval-every 0 --eval-batches 1 --no-progress \
          --out "$TMP/r$r-p$i" 2>/dev/null | sed -n 's/^tokens\/s: //p' | tail -1)
    SUM[$i]="${SUM[$i]:-} $tps"
  done
done
base=$(echo "${SUM[0]}" | awk '{s=0; for(i=1;i<=NF;i++) s+=1/$i; print s/NF}')
for i in "${!POLICIES[@]}"; do
  echo "${SUM[$i]}" | awk -v b="$base" -v p="${POLICIES[$i]}" \
    '{s=0; for(i=1;i<=NF;i++) s+=1/$i; printf "%-45s tokens/s:%s  time_ratio %.3f\n", p, $0, (s/NF)/b}'
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
