#!/usr/bin/env bash
# Creates (idempotently) the Python virtual environment used by the HF parity golden generator
# (scripts/make_golden.py), the HF round-trip check (scripts/check_hf_roundtrip.py) and the PyTorch
# baseline benchmark (benches/pytorch/gpt2_step.py). Everything comes from PyPI.
#
# Usage: scripts/setup-python.sh            # prints the venv's python path on the last line
# Env:   ESLM_TORCH_VENV  venv location (default: $HOME/.cache/eslm/venv-torch, outside the clone)
set -euo pipefail

VENV="${ESLM_TORCH_VENV:-$HOME/.cache/eslm/venv-torch}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c 'import torch, transformers, safetensors, numpy' >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # The default Linux wheel of torch on PyPI pulls the CUDA runtime wheels (nvidia-*); they are
    # large but harmless on a CPU-only machine (the benchmark runs on CPU).
    "$VENV/bin/python" -m pip install --quiet torch transformers safetensors numpy
fi

"$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >&2
echo "$VENV/bin/python"
