#!/usr/bin/env bash
# The main command of the README: set up .venv, then run the CSL demo on the embedded data on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m csl demo "$@"
