#!/usr/bin/env bash
# The main command of the README: set up .venv, then run the CSL demo on the embedded data on CPU. Arguments go to
# `csl demo`; a relative --out (or --out=DIR) is taken from the caller's folder.
set -euo pipefail
caller=$(pwd)
args=()
expect_out=0
for a in "$@"; do
  if [ "$expect_out" = 1 ]; then
    case "$a" in /*) ;; *) a="$caller/$a" ;; esac
    expect_out=0
  elif [ "$a" = --out ]; then
    expect_out=1
  elif [ "${a#--out=}" != "$a" ]; then
    v=${a#--out=}
    case "$v" in /*) ;; *) a="--out=$caller/$v" ;; esac
  fi
  args+=("$a")
done
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The demo runs on the CPU: build only the CPU part of the extension (the tests build the CUDA part too).
export CSL_EXT_CUDA=${CSL_EXT_CUDA:-0}
.venv/bin/python -m csl demo ${args[@]+"${args[@]}"}  # (an empty array is "unbound" to bash < 4.4 under set -u)
