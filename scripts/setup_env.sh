#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install the project with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch 2.14.1 (CUDA 13.0 build) + torchvision 0.29.1: the pair this project is tested with.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
