#!/usr/bin/env bash
# The test command of the README: set up .venv, then run the whole suite on CPU.
# Triton kernels run under the interpreter; the C++ extension is built on first use (its CUDA part where a GPU is
# visible, or for sm_90 without one under CSL_EXT_CUDA=1, which .ci/run sets). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TRITON_INTERPRET=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q -ra "$@"
