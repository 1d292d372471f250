#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install the project with its test tools. The install
# runs again only when pyproject.toml or setup.py changed, or the checkout moved (a stamp in .venv records them), so
# a set-up machine needs no package index for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.csl-installed
WANT="$(pwd) $(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import csl, csl_kernels, pytest" 2>/dev/null; then
  exit 0
fi
# torch 2.14.1 (CUDA 13.0 build) + torchvision 0.29.1: the pair this project is tested with (a first install
# downloads several GB; pip shows its progress).
.venv/bin/python -m pip install --progress-bar on "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$WANT" > "$STAMP"
