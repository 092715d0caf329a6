#!/usr/bin/env bash
# A/B step time of two eslm-train binaries (e.g. before/after a change), interleaved rounds on one machine:
# GPT-2 124M (vocabulary 50257) on the synthetic corpus, B 4 × T 64 (the benchmark config S), 14 steps per run;
# prints the median step time of steps 4..14 of each run (page faults and warm-up excluded).
#
# Usage: scripts/ab-step.sh BIN_A BIN_B [SELECT=clm] [ROUNDS=3] [extra train flags...]
# Build the two binaries with `cargo build --release -p eslm-train` at each commit and copy them aside.
set -euo pipefail
A=$1; B=$2; SEL=${3:-clm}; ROUNDS=${4:-3}; shift $(( $# < 4 ? $# : 4 ))
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  for which in A B; do
    bin=$A; [ "$which" = B ] && bin=$B
    rm -rf "$WORK/run"
    "$bin" train --model 124m --vocab-size 50257 --synthetic-documents 256 --batch-size 4 --seq-len 64 \
      --steps 14 --warmup-steps 2 --eval-every 0 --eval-batches 1 --no-progress --select "$SEL" \
      --out "$WORK/run" "$@" >/dev/null
    python3 - "$WORK/run/metrics.jsonl" "$SEL" "$which" "$r" <<'PY'
import json, statistics, sys
path, sel, which, r = sys.argv[1:]
t = [json.loads(l)["step_time_s"] for l in open(path) if '"kind":"step"' in l][3:]
print(f"{sel} {which} round {r}: median step {statistics.median(t):.4f} s")
PY
  done
done
