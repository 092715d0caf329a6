#!/usr/bin/env bash
# Runs the eslm train-step benchmark (benches/train_step.rs) and the PyTorch eager baseline
# (benches/pytorch/gpt2_step.py) one after the other on the same configs, batch and thread count, and prints
# tokens/s for both plus the ratios: eslm/PyTorch throughput for CLM and ESLM, and each engine's ESLM/CLM step time.
#
# Usage: scripts/bench-vs-pytorch.sh [--configs T,S] [--steps 5] [--warmup 2] [--threads 2] [--keep 0.3]
# Env:   ESLM_TORCH_VENV (see scripts/setup-python.sh), CARGO_TARGET_DIR (as usual).
# Output: a header (date, commit, CPU, load average), both raw JSON lines, and a ratio table. Run it on a quiet
# machine: the two engines run sequentially, so a load change between them skews the eslm/PyTorch ratios (the
# ESLM/CLM ratios are robust: each engine alternates its CLM and ESLM steps).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="$(scripts/setup-python.sh 2>/dev/null | tail -1)"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') ($(nproc) cores visible)"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null) (1/5/15 min) before the run"
echo "command: scripts/bench-vs-pytorch.sh $*"

eslm_out="$(cargo bench -q --bench train_step -- "$@")"
echo "$eslm_out"
eslm_json="$(sed -n 's/^JSON //p' <<<"$eslm_out")"
torch_json="$("$PY" benches/pytorch/gpt2_step.py "$@")"
echo "eslm:    $eslm_json"
echo "pytorch: $torch_json"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null) (1/5/15 min) after the run"

"$PY" - "$eslm_json" "$torch_json" <<'EOF'
import json
import sys

e, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"\n{'config':<6} {'mode':<5} {'eslm tok/s':>11} {'torch tok/s':>12} {'eslm/torch':>11}")
for name, ec in e["configs"].items():
    pc = p["configs"].get(name)
    if pc is None:
        continue
    for mode in ("clm", "eslm"):
        et, pt = ec[mode]["tokens_per_s"], pc[mode]["tokens_per_s"]
        print(f"{name:<6} {mode:<5} {et:>11.1f} {pt:>12.1f} {et / pt:>10.2f}x")
print(f"\n{'config':<6} {'eslm ESLM/CLM step time':>24} {'torch ESLM/CLM step time':>25}")
for name, ec in e["configs"].items():
    pc = p["configs"].get(name, {})
    print(f"{name:<6} {ec['eslm_over_clm']:>24.3f} {pc.get('eslm_over_clm', float('nan')):>25.3f}")
EOF
