#!/usr/bin/env bash
# The main command of the README: set up .venv, then run the CSL demo on the embedded data on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The demo runs on the CPU: build only the CPU part of the extension (the tests build the CUDA part too).
export CSL_EXT_CUDA=${CSL_EXT_CUDA:-0}
.venv/bin/python -m csl demo "$@"
