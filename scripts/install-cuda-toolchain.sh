#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 compiler (nvcc, ptxas, CUB/Thrust headers, cudart, nvrtc) from PyPI into a cache
# folder outside the clone, idempotently, and prints the CUDA_HOME to use.
#
#   scripts/install-cuda-toolchain.sh          # installs (if needed), prints CUDA_HOME
#   export CUDA_HOME=$(scripts/install-cuda-toolchain.sh)
#
# Why 13.0: the GPU machines run driver 580 (CUDA 13.0), which cannot JIT PTX emitted by a newer nvcc.
# nvidia-nvvm is pinned too, or pip pulls a newer one whose PTX the 13.0 ptxas rejects.
# Users with their own CUDA toolkit set CUDA_HOME and skip this script.
set -euo pipefail

CUDA_PIN_NVCC=13.0.88
CUDA_PIN_RUNTIME=13.0.88
CUDA_PIN_CRT=13.0.88
CUDA_PIN_CCCL=13.0.85
CUDA_PIN_NVRTC=13.0.88
CUDA_PIN_NVVM=13.0.88

cache_root="${ESLM_CACHE:-$HOME/.cache/eslm}"
prefix="$cache_root/cuda-$CUDA_PIN_NVCC"
stamp="$prefix/.installed"
home="$prefix/cuda_home"

if [ ! -f "$stamp" ]; then
  echo "installing CUDA $CUDA_PIN_NVCC toolchain from PyPI into $prefix" >&2
  rm -rf "$prefix"
  mkdir -p "$prefix"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix/site" \
    "nvidia-cuda-nvcc==$CUDA_PIN_NVCC" \
    "nvidia-cuda-runtime==$CUDA_PIN_RUNTIME" \
    "nvidia-cuda-crt==$CUDA_PIN_CRT" \
    "nvidia-cuda-cccl==$CUDA_PIN_CCCL" \
    "nvidia-cuda-nvrtc==$CUDA_PIN_NVRTC" \
    "nvidia-nvvm==$CUDA_PIN_NVVM" >&2
  touch "$stamp.pip"
fi

# The wheels unpack into site/nvidia/cu13/{bin,include,lib,nvvm} (13.x layout); older layouts put each component
# under site/nvidia/<component>/. Build one CUDA_HOME of symlinks that nvcc and build scripts understand.
if [ ! -f "$stamp" ]; then
  site="$prefix/site/nvidia"
  rm -rf "$home"
  mkdir -p "$home/bin" "$home/include" "$home/lib64"
  for root in "$site"/*; do
    [ -d "$root" ] || continue
    for sub in bin include lib nvvm; do
      [ -d "$root/$sub" ] || continue
      case "$sub" in
        bin) for f in "$root/bin"/*; do ln -sf "$f" "$home/bin/"; done ;;
        include) cp -rs "$root/include/." "$home/include/" 2>/dev/null || true ;;
        lib) for f in "$root/lib"/*; do ln -sf "$f" "$home/lib64/"; done ;;
        nvvm) [ -e "$home/nvvm" ] || ln -s "$root/nvvm" "$home/nvvm" ;;
      esac
    done
  done
  [ -x "$home/bin/nvcc" ] || { echo "error: nvcc not found after install under $site" >&2; exit 1; }
  # libcudart.so without a version suffix, for linkers that want it.
  if [ ! -e "$home/lib64/libcudart.so" ]; then
    so=$(ls "$home/lib64"/libcudart.so.* 2>/dev/null | head -n1 || true)
    [ -n "$so" ] && ln -sf "$so" "$home/lib64/libcudart.so"
  fi
  "$home/bin/nvcc" --version >&2
  touch "$stamp"
fi

echo "$home"
