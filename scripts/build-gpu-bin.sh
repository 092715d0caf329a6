#!/usr/bin/env bash
# Builds, on this (CPU-only) machine, every CUDA test and benchmark binary that scripts/gpu-check.sh runs on a lent
# GPU machine, and copies them into gpu-bin/ (git-ignored; carry it with the device call: carry=["gpu-bin"]).
# The GPU machine has no network and no crates.io, so nothing is compiled there.
#
#   scripts/build-gpu-bin.sh            # -> gpu-bin/tests/<name>, gpu-bin/benches/<name>, gpu-bin/MANIFEST
#
# Which binaries: every integration test target named cuda_* or *_cuda (any workspace crate) and every bench
# target whose name contains "cuda", built with --features cuda in the release profile, stripped (the 64 MiB
# carry limit). Needs nvcc: CUDA_HOME, else scripts/install-cuda-toolchain.sh is run.
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

for f in "$out"/tests/* "$out"/benches/*; do
  [ -f "$f" ] || continue
  strip --strip-debug "$f" 2>/dev/null || true
done
{
  echo "built $(date -u +%FT%TZ) from commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  nvcc --version | tail -n 1
  (cd "$out" && ls -l tests benches)
} >"$out/MANIFEST"
cat "$out/MANIFEST"
du -sh "$out"
