#!/usr/bin/env bash
# Builds, on this (CPU-only) machine, every CUDA test and benchmark binary that scripts/gpu-check.sh runs on a lent
# GPU machine, and copies them into gpu-bin/ (git-ignored; carry it with the device call: carry=["gpu-bin"]).
# The GPU machine has no network and no crates.io, so nothing is compiled there.
#
#   scripts/build-gpu-bin.sh            # -> gpu-bin/tests/<name>, gpu-bin/benches/<name>, gpu-bin/MANIFEST,
#                                       #    gpu-bin/sanitizer/<compute-sanitizer wheel>
#
# Which binaries: every integration test target named cuda_* or *_cuda (any workspace crate) and every bench
# target whose name contains "cuda", built with --features cuda in the release profile, stripped (the 64 MiB
# carry limit). Today: tests cuda_parity (eslm-kernels), cuda_backend (eslm-gpt2's CUDA backend) and cuda_device
# (eslm-train --device cuda vs cpu), benches kernels_cuda and train_step_cuda (124M train steps, NCCL). Needs nvcc: CUDA_HOME, else scripts/install-cuda-toolchain.sh is run.
#
# compute-sanitizer (memcheck, racecheck, synccheck in gpu-check.sh) is not part of the PyPI compiler wheels that
# install-cuda-toolchain.sh installs: it ships in nvidia-cuda-sanitizer-api (pinned below to the same 13.0 release
# as the compiler). The wheel (~14 MB) is downloaded once into the cache and copied, still zipped, into
# gpu-bin/sanitizer/; gpu-check.sh unpacks it on the device machine (which has no network). Set
# ESLM_NO_SANITIZER=1 to leave it out (gpu-check.sh then uses a compute-sanitizer on PATH, if any).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME="$(bash scripts/install-cuda-toolchain.sh)"
  export CUDA_HOME
fi
export PATH="$CUDA_HOME/bin:$PATH"
out=gpu-bin
rm -rf "$out"
mkdir -p "$out/tests" "$out/benches"

# Every artifact cargo reports as an executable test or bench; picks the CUDA ones.
collect() {
  python3 -c '
import json, sys, os, shutil
out = sys.argv[1]
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    target = msg["target"]
    name, kinds = target["name"], target["kind"]
    if "test" in kinds and (name.startswith("cuda_") or name.endswith("_cuda")):
        dest = os.path.join(out, "tests", name)
    elif "bench" in kinds and "cuda" in name:
        dest = os.path.join(out, "benches", name)
    else:
        continue
    shutil.copy2(msg["executable"], dest)
    print(dest)
' "$out"
}

echo "building CUDA test binaries (release, --features cuda)" >&2
cargo test --workspace --release --features cuda --no-run --message-format=json-render-diagnostics | collect "$out"
echo "building CUDA bench binaries" >&2
cargo bench --workspace --features cuda --no-run --message-format=json-render-diagnostics | collect "$out"

CUDA_PIN_SANITIZER=13.0.85
if [ "${ESLM_NO_SANITIZER:-0}" != 1 ]; then
  wheels="${ESLM_CACHE:-$HOME/.cache/eslm}/wheels"
  mkdir -p "$wheels" "$out/sanitizer"
  whl=$(ls "$wheels"/nvidia_cuda_sanitizer_api-"$CUDA_PIN_SANITIZER"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$whl" ]; then
    echo "downloading nvidia-cuda-sanitizer-api==$CUDA_PIN_SANITIZER (compute-sanitizer)" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --platform manylinux_2_25_x86_64 \
      "nvidia-cuda-sanitizer-api==$CUDA_PIN_SANITIZER" -d "$wheels" >&2 ||
      echo "warning: could not download the sanitizer wheel; gpu-check.sh will look for compute-sanitizer on PATH" >&2
    whl=$(ls "$wheels"/nvidia_cuda_sanitizer_api-"$CUDA_PIN_SANITIZER"-*.whl 2>/dev/null | head -n 1 || true)
  fi
  [ -n "$whl" ] && cp "$whl" "$out/sanitizer/"
fi

for f in "$out"/tests/* "$out"/benches/*; do
  [ -f "$f" ] || continue
  strip --strip-debug "$f" 2>/dev/null || true
done
{
  echo "built $(date -u +%FT%TZ) from commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  nvcc --version | tail -n 1
  (cd "$out" && ls -l tests benches && ls -l sanitizer 2>/dev/null || true)
} >"$out/MANIFEST"
cat "$out/MANIFEST"
du -sh "$out"
