#!/usr/bin/env bash
# One command that checks a GPU machine end to end and leaves the evidence in one folder:
#   bash scripts/gpu_check.sh [--out DIR] [--pack DIR] [--cpu-dry-run]
# Through the device tool, which brings back at most 8 files of its $OUT: `bash scripts/gpu_check.sh --pack $OUT`
# (or no option at all: an $OUT in the environment is packed into). --pack DIR writes DIR/evidence.tgz (the whole
# evidence folder, DIR's name inside) and DIR/summary.md after every stage and every 30 s within one, so a killed
# run brings back what it had. A relative DIR is taken from the folder the command is run in; an --out DIR that holds
# an earlier check's summary.md is refused (its results would be read as this check's).
# Stages, in this order (the evidence a short GPU loan exists for first), each under its own time limit and all
# under one budget (GPU_CHECK_BUDGET_S, default 540 s: a 600 s command with room to spare; the stages before the
# tests leave GPU_CHECK_TEST_RESERVE_S, default 200 s, of it to the tests and the training), each writing into DIR as
# it goes; summary.md is rewritten the same way, so a run killed from outside still leaves one:
#   env.txt       GPU (how many visible, capability and memory of the one checked), driver, Python, torch, triton,
#                 nvcc (nvidia-smi, nvcc and the Python start that finds the GPU each stopped after
#                 GPU_CHECK_PROBE_LIMIT_S, default 60 s: a hung driver ends the check, exit 2, before any stage)
#   build.log     the C++/CUDA extension build on first use (MAX_JOBS=16; for the visible GPU's architecture unless
#                 TORCH_CUDA_ARCH_LIST says otherwise), with its time
#   cpp_exceptions.txt  whether a TORCH_CHECK failure in a minimal extension reaches Python here; where it
#                 crashes (the machine), the tests of C++ error paths (marked cpp_error_path) are deselected (each
#                 crash costs a worker restart) and the summary says so. On a GPU, variants that tell the machine
#                 from csl: on the H200 of 2026-12-04 (torch 2.11 + GCC 13.3) the minimal one raised and csl's
#                 extension crashed
#   bench-pcos.log / bench-ce.log / bench.json   python -m csl_bench on voc321 bf16 + fp32 (fp16 + fp32 below
#                 compute capability 8.0), pcos_weights and the weighted CE, every provider, Triton launch tuning on
#                 (one command per op, merged);
#                 bench-cuda-plain.*: the extension again with CSL_CUDA_REGISTER_CLASSES=0 (classes read one by one)
#   auto.log / auto.json     backend='auto' choices with the timings they were made on (voc321, coco513)
#   host.log / host.json     host-side microseconds per call of the fused ops on the GPU (tiny input, real launches)
#   pytest.log    the suite with CSL_REQUIRE_BACKENDS=triton,cuda (GPU tests first), the rest of the budget, a time
#                 limit per test (thread method: a test stuck in C code is stopped too), -rfE summary;
#   progress.txt  one line per test outcome as it happens (whole texts in progress.txt.details, the stacks of a test
#                 process that does not exit in progress.txt.hang-<worker>); junit.xml when pytest ends
#   train.log     csl train on the demo config for 6 iterations, train.amp=auto (bf16 autocast where the GPU has
#                 native bf16, else fp16), kernels.backend=auto (when >= 60 s
#                 of the budget are left; tests/test_gpu.py runs the named backends)
#   summary.md    what passed, what failed, the times
# Exit status: 0 when every stage passed and the benchmarks' results merged into bench.json, 1 otherwise, 2 for a
# wrong argument or a machine it cannot check (no GPU, no torch), 130 / 143 when stopped by Ctrl-C / SIGTERM.
# Works with the packages a GPU machine has (torch >= 2.11, triton >= 3.6, Python 3.12) and the project on PYTHONPATH
# only (no pip install, no network). --cpu-dry-run runs every stage that can run without a GPU (tests of the CPU
# backends, the benchmark's smoke suite, the CPU training steps) so the script itself is tested on CPU machines.
set -uo pipefail
CALLER=$(pwd)  # --out / --pack name folders relative to where the check is started
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
DEVICE_OUT=${OUT:-}  # the device tool's result folder, where it sets one
OUT=""
PACK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out|--pack)
      [ $# -ge 2 ] || { echo "gpu_check: $1 needs a folder" >&2; exit 2; }
      folder=$2
      case $folder in /*|'') ;; *) folder=$CALLER/$folder ;; esac
      if [ "$1" = --out ]; then OUT=$folder; else PACK=$folder; fi
      shift 2 ;;
    --cpu-dry-run) DRY=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
if [ $DRY = 1 ]; then BUDGET=${GPU_CHECK_BUDGET_S:-3000}; else BUDGET=${GPU_CHECK_BUDGET_S:-540}; fi
PACK_EVERY_S=${GPU_CHECK_PACK_EVERY_S:-30}
# The seconds the stages before the tests leave for the tests and the training (GPU_CHECK_TEST_RESERVE_S, default
# 200): a slow build or benchmark is cut at its limit instead of leaving the suite, the evidence most GPU checks are
# run for, a few seconds. 0 from the tests stage on.
RESERVE_S=${GPU_CHECK_TEST_RESERVE_S:-200}
require_seconds() {  # require_seconds NAME VALUE [positive]: exit 2 unless VALUE is a whole number (> 0 if positive)
  case $2 in
    ''|*[!0-9]*) ;;
    0) [ "${3:-}" != positive ] && return 0 ;;
    *) return 0 ;;
  esac
  echo "gpu_check: $1 must be a whole number of seconds${3:+ > 0}, got '$2'" >&2
  exit 2
}
require_seconds GPU_CHECK_BUDGET_S "$BUDGET" positive
require_seconds GPU_CHECK_TEST_RESERVE_S "$RESERVE_S"
require_seconds GPU_CHECK_PACK_EVERY_S "$PACK_EVERY_S" positive
# The limit of each look at the machine before the stages (the Python start that finds the GPU, nvidia-smi, nvcc): a
# driver that hangs them would otherwise take the whole loan and leave no summary.
PROBE_LIMIT_S=${GPU_CHECK_PROBE_LIMIT_S:-60}
require_seconds GPU_CHECK_PROBE_LIMIT_S "$PROBE_LIMIT_S" positive
DEADLINE=$((START + BUDGET))
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1  # progress lines reach the logs as they happen, also from a stage that is killed
# One Python start for the device check and the environment (a cold start of torch takes seconds).
ENV_ERR=$(mktemp)
ENV_TEXT=$(timeout -k 5 "$PROBE_LIMIT_S" "$PY" -c "
import re, sys, torch, triton
cuda = torch.cuda.is_available()
print('GPU=' + (re.sub(r'[^A-Za-z0-9._-]+', '-', torch.cuda.get_device_name(0)) if cuda else 'cpu'))
print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('triton', triton.__version__)
if cuda:
    print('GPUs visible', torch.cuda.device_count(), '- GPU 0 (the one checked): compute capability %d.%d,'
          % torch.cuda.get_device_capability(0), torch.cuda.get_device_properties(0).total_memory >> 20, 'MiB')
    print('HALF=' + ('bf16' if torch.version.hip or torch.cuda.get_device_capability(0)[0] >= 8 else 'fp16'))
" 2>"$ENV_ERR")
ENV_RC=$?
GPU=$(sed -n 's/^GPU=//p' <<< "$ENV_TEXT")
# The half precision the benchmark times: bf16, or fp16 on a GPU without native bfloat16 (compute capability < 8.0,
# where train.amp=auto trains in fp16 too)
HALF=$(sed -n 's/^HALF=//p' <<< "$ENV_TEXT")
HALF=${HALF:-bf16}
if [ $ENV_RC = 124 ] || [ $ENV_RC = 137 ]; then
  echo "gpu_check: $PY did not import torch and find the GPU within ${PROBE_LIMIT_S}s (GPU_CHECK_PROBE_LIMIT_S):" \
    "stopped; a hung driver? $(tail -n 5 "$ENV_ERR")" >&2
  exit 2
fi
if [ $ENV_RC != 0 ] || [ -z "$GPU" ]; then
  echo "gpu_check: $PY cannot import torch / triton (exit $ENV_RC): $(tail -n 5 "$ENV_ERR")" >&2
  exit 2
fi
if [ $DRY = 0 ] && [ "$GPU" = cpu ]; then
  echo "gpu_check: no CUDA device visible to $PY (use --cpu-dry-run on a machine without a GPU)" \
    "$(tail -n 3 "$ENV_ERR")" >&2
  exit 2
fi
[ -z "$OUT" ] && [ -z "$PACK" ] && [ -n "$DEVICE_OUT" ] && PACK=$DEVICE_OUT
if [ -z "$OUT" ]; then  # a second check on the same day gets a folder of its own (no earlier stage's files in it)
  OUT=gpu-check/$(date +%Y-%m-%d)-${GPU:0:64}  # a name a file system takes whatever the GPU's name
  [ -e "$OUT" ] && OUT=$OUT-$(date +%H%M%S)
fi
# An earlier check's results in the same folder (a benchmark's JSON, junit.xml, a hang file) would be merged, packed
# and summarised as this one's wherever its own stage failed or was skipped.
if [ -e "$OUT/summary.md" ] || [ -e "$OUT/stages.json" ]; then
  echo "gpu_check: $OUT holds an earlier check's evidence (summary.md); name a new folder" >&2
  exit 2
fi
writable_folder() {  # writable_folder WHAT DIR: DIR made if need be and written to once, else exit 2 before any stage
  local error
  local probe=$2/.gpu_check-write-test
  if ! error=$(mkdir -p -- "$2" 2>&1 && : 2>&1 > "$probe" && rm -f -- "$probe"); then
    echo "gpu_check: the $1 folder $2 cannot be written: ${error:-?}" >&2
    exit 2
  fi
}
writable_folder evidence "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$PACK" ]; then
  writable_folder --pack "$PACK"
  PACK=$(cd "$PACK" && pwd)
  case "$PACK/" in
    "$OUT/"*) echo "gpu_check: --pack $PACK lies inside the evidence folder $OUT; pack it elsewhere" >&2; exit 2 ;;
  esac
fi
# What was measured, for env.txt, the summary and stages.json: the commit and whether the tree differs from it (the
# check's own folders left out: its evidence is not a change); a device machine's copy may carry uncommitted changes
# or come without .git (then the code hash alone names the code).
CODE_HASH=$(cd "$ROOT" && find csrc csl_kernels csl_bench csl scripts tests -type f \( -name '*.py' -o -name '*.cpp' \
  -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.sh' \) -print0 2>/dev/null | sort -z |
  xargs -0 sha256sum | sha256sum | cut -c1-16)
OWN=()
for dir in "$OUT" "$PACK"; do
  case "$dir/" in "$ROOT/"?*) OWN+=(":(exclude)${dir#"$ROOT"/}") ;; esac
done
CHANGES=""
TREE_CLEAN=null
if COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>&1) && CHANGES=$(git -C "$ROOT" status --porcelain -- . "${OWN[@]}" 2>&1)
then
  if [ -z "$CHANGES" ]; then
    TREE_CLEAN=true; MEASURED="commit ${COMMIT:0:12}, tree clean"
  else
    TREE_CLEAN=false
    MEASURED="commit ${COMMIT:0:12}, tree dirty ($(wc -l <<< "$CHANGES") paths differ, listed in env.txt)"
  fi
else
  case $COMMIT$CHANGES in
    *"not a git repository"*) WHY="not a git checkout" ;;
    *) WHY="git: $(head -n 1 <<< "$COMMIT$CHANGES")" ;;
  esac
  MEASURED="commit unknown ($WHY)"; COMMIT=""; CHANGES=""
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
# TORCH_CUDA_ARCH_LIST is left to the caller: unset, the extension is built for the visible GPUs' architectures
# (csl_kernels/cpp/build.py), sm_90 on an H100 / H200; a fixed 9.0 left the cuda backend without a kernel image on
# any other GPU.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/csl-gpu-check.XXXXXX")  # build folder and training runs: large, not evidence
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
export CSL_TRITON_AUTOTUNE=0
# No GPU: the extension's CPU part only, also where the caller asks for the CUDA part (CI proves that build
# elsewhere; compiling it here again took the build stage past its limit on a loaded 2-core machine).
[ $DRY = 1 ] && export CSL_EXT_CUDA=0
ulimit -c 0  # a crashing test process leaves no core file
declare -A STATUS SECONDS_USED
STAGES=()
STAGE_PID=""
NOTES=()

stage() {  # stage NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what the budget leaves), record status and time
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s) - 10 - RESERVE_S))
  STAGES+=("$name")
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    STATUS[$name]="skipped (budget)"; SECONDS_USED[$name]=0
    echo "== $name: skipped, ${left}s of the budget left"
    write_summary
    return
  fi
  local t0; t0=$(date +%s)
  write_summary  # a run killed from outside (SIGKILL) still names the stage it was in
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" &  # in the background: a signal to this script is handled at once (see the trap)
  STAGE_PID=$!
  # The summary and the pack every GPU_CHECK_PACK_EVERY_S (30) s while it runs: a run killed with SIGKILL (no trap)
  # still brings back the tests' progress so far.
  local ticks=0
  while kill -0 "$STAGE_PID" 2>/dev/null; do
    sleep 1
    ticks=$((ticks + 1))
    [ $((ticks % PACK_EVERY_S)) = 0 ] && write_summary
  done
  wait "$STAGE_PID"
  local rc=$?
  STAGE_PID=""
  STATUS[$name]=$rc
  SECONDS_USED[$name]=$(( $(date +%s) - t0 ))
  echo "== $name: exit $rc in ${SECONDS_USED[$name]}s"
  write_summary
}

section() {  # section TITLE FILE PATTERN LINES [head|tail]: matching lines of FILE in a code block, if FILE exists
  [ -f "$2" ] || return 0
  echo "## $1"
  echo '```'
  grep -E "$3" "$2" | "${5:-head}" -n "$4"
  echo '```'
}

write_summary() {
  {
    echo "# GPU check ($GPU), $(date -u +%Y-%m-%dT%H:%MZ)$([ $DRY = 1 ] && echo ', CPU dry run')"
    echo
    echo "Measured: $MEASURED; code hash $CODE_HASH."
    echo
    echo "| stage | exit | seconds |"
    echo "| --- | ---: | ---: |"
    for name in "${STAGES[@]}"; do
      echo "| $name | ${STATUS[$name]:-running} | ${SECONDS_USED[$name]:--} |"
    done
    echo
    echo "Total $(( $(date +%s) - START )) s of a ${BUDGET} s budget. Exit 124 / 137 = the stage hit its time limit."
    for note in "${NOTES[@]}"; do echo; echo "$note"; done
    [ -f "$OUT/cpp_exceptions.txt" ] && { echo; echo "C++ exceptions from an extension on this machine" \
      "(scripts/cpp_exception_probe.py; variants: a minimal op built with csl's flags, thrown inside at::parallel_for," \
      "with a message of several arguments, raised beside csl's loaded library, csl's own error path with and" \
      "without its CUDA part; a crash comes with its native stack):"; echo '```'; cat "$OUT/cpp_exceptions.txt"; echo '```'; }
    if [ -f "$OUT/progress.txt" ]; then
      echo
      echo "## Tests"
      echo '```'
      [ -f "$OUT/pytest.log" ] && tail -n 3 "$OUT/pytest.log"
      echo '```'
      echo "Failed or erroring tests as they happened (progress.txt):"
      echo '```'
      grep -E '^(FAILED|ERROR)' "$OUT/progress.txt" | head -50
      echo '```'
      echo "Outcomes: $(cut -d' ' -f1 "$OUT/progress.txt" | sort | uniq -c | tr '\n' ' ')"
      for hang in "$OUT"/progress.txt.hang-*; do
        [ -s "$hang" ] && { echo "A test process did not exit (stacks in $(basename "$hang")):"; echo '```'
                            head -40 "$hang"; echo '```'; }
      done
    fi
    section "Build" "$OUT/build.log" . 2 tail
    section "Benchmark (bench-pcos.log, bench-ce.log, bench-cuda-plain.log)" "$OUT/bench.log" '^\||^CSL_CUDA' 120
    section "backend='auto' (auto.log)" "$OUT/auto.log" "backend='auto'|->" 30
    section "Host-side cost per call (host.log)" "$OUT/host.log" '^\||not measured' 20
    section "Training steps (train.log)" "$OUT/train.log" 'iter [0-9]+/|done:|error' 12 tail
  } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
  {  # the stage table for scripts: exit is a number, "running" or "skipped (budget)"
    printf '{"gpu": "%s", "commit": %s, "tree_clean": %s, "dry_run": %s, "budget_s": %s, "elapsed_s": %s, "stages": [' \
      "$GPU" "$([ -n "$COMMIT" ] && echo "\"$COMMIT\"" || echo null)" "$TREE_CLEAN" \
      "$([ $DRY = 1 ] && echo true || echo false)" "$BUDGET" "$(( $(date +%s) - START ))"
    local sep="" name
    for name in "${STAGES[@]}"; do
      printf '%s\n {"stage": "%s", "exit": "%s", "seconds": %s}' "$sep" "$name" "${STATUS[$name]:-running}" \
        "${SECONDS_USED[$name]:-null}"
      sep=","
    done
    printf ']}\n'
  } > "$OUT/stages.json.tmp" && mv "$OUT/stages.json.tmp" "$OUT/stages.json"
  pack
}

pack() {  # --pack DIR: the evidence folder as one archive and the summary beside it (files still being written
  # make tar say "file changed as we read it", exit 1, with a usable archive)
  [ -n "$PACK" ] || return 0
  tar czf "$PACK/evidence.tgz.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null
  local status=$?
  if [ $status -le 1 ]; then
    mv "$PACK/evidence.tgz.tmp" "$PACK/evidence.tgz"
  else  # no half-written archive left beside the last good one (the device tool brings back a few files only)
    rm -f "$PACK/evidence.tgz.tmp"
    echo "gpu_check: packing the evidence into $PACK/evidence.tgz failed (tar exit $status)" >&2
  fi
  # Through a temporary file as the archive: a copy cut by a kill or a full disk leaves the last whole summary.md
  if cp "$OUT/summary.md" "$PACK/summary.md.tmp" 2>/dev/null; then
    mv "$PACK/summary.md.tmp" "$PACK/summary.md"
  else
    rm -f "$PACK/summary.md.tmp"
    echo "gpu_check: copying summary.md into $PACK failed" >&2
  fi
}

on_signal() {  # stopped from outside: stop the stage, keep the summary; exit 128 + the signal's number ($1)
  [ -n "$STAGE_PID" ] && kill -TERM "$STAGE_PID" 2>/dev/null
  [ -n "${PROBE_PID:-}" ] && kill -TERM "$PROBE_PID" 2>/dev/null
  NOTES+=("Stopped by a signal during the stage marked running.")
  write_summary
  rm -rf "$WORK"
  exit "$1"
}
trap 'on_signal 143' TERM
trap 'on_signal 130' INT

# 1. Environment (a summary first: a check killed while nvidia-smi or nvcc hangs still leaves one)
write_summary
{
  date -u
  if ! command -v nvidia-smi >/dev/null; then echo "nvidia-smi: not on PATH"
  else timeout -k 5 "$PROBE_LIMIT_S" nvidia-smi 2>&1 ||
    echo "nvidia-smi: failed (exit $?; 124 = stopped after ${PROBE_LIMIT_S}s)"
  fi
  grep -v -e "^GPU=" -e "^HALF=" <<< "$ENV_TEXT"
  cat "$ENV_ERR"
  if ! command -v nvcc >/dev/null; then echo "nvcc: not on PATH"
  else timeout -k 5 "$PROBE_LIMIT_S" nvcc --version || echo "nvcc --version: failed (exit $?)"
  fi
  if [ -z "$COMMIT" ]; then echo "$MEASURED"; else echo "commit $COMMIT"; fi
  if [ -n "$CHANGES" ]; then echo "tree dirty:"; head -n 40 <<< "$CHANGES"
  elif [ -n "$COMMIT" ]; then echo "tree clean"; fi
  echo "code hash $CODE_HASH"
} > "$OUT/env.txt" 2>&1
rm -f "$ENV_ERR"
write_summary

# 2. The extension build (first use); beside it, whether a C++ exception from any extension reaches Python here
# (in the background: its build overlaps the extension's; on a loaded 2-core machine it has taken over 240 s)
if [ $DRY = 1 ]; then PROBE=(); else PROBE=(--variants); fi  # the variants: four more builds, parallel on a GPU host
# At a lower priority (its builds overlap the extension's build and the first benchmarks, whose CPU-side timings --
# eager, official, Triton's launch tuning -- should not share busy cores): MAX_JOBS=4 for csl's own build, beside three
# one-file builds, so up to 7 compiler processes at nice 10 on the 16 cores. --limit bounds the whole probe.
MAX_JOBS=4 nice -n 10 "$PY" scripts/cpp_exception_probe.py "${PROBE[@]}" --limit $((BUDGET < 420 ? BUDGET : 420)) \
  > "$OUT/cpp_exceptions.txt" 2>&1 &
PROBE_PID=$!
if [ $DRY = 1 ]; then BUILD_DEV=cpu; else BUILD_DEV=cuda; fi
CSL_BUILD_VERBOSE=1 stage build 300 "$PY" -c "
import time, torch, csl_kernels as ck
t = time.perf_counter()
dev = torch.device('$BUILD_DEV')
reason = ck.unavailable_reason('pcos_weights', '$BUILD_DEV' if '$BUILD_DEV' == 'cuda' else 'cpu', dev)
print('extension', 'ready' if reason is None else 'unavailable: ' + reason, f'in {time.perf_counter() - t:.1f} s')
raise SystemExit(0 if reason is None else 1)
" > "$OUT/build.log" 2>&1
if [ "${STATUS[build]}" != 0 ]; then
  for log in "$TORCH_EXTENSIONS_DIR"/csl*/build.log; do  # the whole error (the work folder is deleted at the end)
    [ -f "$log" ] && cp "$log" "$OUT/build-$(basename "$(dirname "$log")").log"
  done
  # A build killed at its limit leaves torch's lock file, on which every later build would wait: removed (in this
  # script's own build folder only). A failed CUDA part is not compiled again by every later process (benchmarks,
  # each test worker): the CPU part is used.
  [ "$TORCH_EXTENSIONS_DIR" = "$WORK/torch_extensions" ] && rm -f "$TORCH_EXTENSIONS_DIR"/csl*/lock
  if grep -q "building the CPU part alone" "$OUT/build.log"; then
    export CSL_EXT_CUDA=0
    NOTES+=("The extension's CUDA part did not build (build.log): the later stages ran with CSL_EXT_CUDA=0, so the cuda backend's tests fail with that reason.")
  else  # no nvcc, say: no CUDA build was tried (build.log's "extension unavailable: ... in N s" line says why)
    NO_CUDA_PART=$(sed -n 's/.*\(built without its CUDA part.*\) in [0-9.]* s$/\1/p' "$OUT/build.log" | head -n 1)
  fi
  if [ -n "${NO_CUDA_PART:-}" ]; then
    NOTES+=("The extension was $NO_CUDA_PART: the cuda backend's benchmark rows say unavailable and its tests fail"\
" with that reason; the Triton and CPU stages ran.")
  fi
fi

# 3. Benchmark: voc321, bf16 (fp16 without native bfloat16) + fp32, pcos_weights and the weighted CE, every provider;
# one command per op (a stage killed at its limit loses one op), Triton's launch tuning on, as users run it (the suite
# turns it off)
if [ $DRY = 1 ]; then
  BENCH=(--device cpu --smoke --skip-train --overwrite)
else
  BENCH=(--device cuda --shapes voc321 --dtypes "$HALF" fp32 --skip-train --rep-s 0.3 --overwrite)
  [ "$HALF" = fp16 ] && NOTES+=("GPU 0 has no native bfloat16 (compute capability below 8.0): the benchmark timed fp16 and fp32.")
fi
: > "$OUT/bench.log"
MERGE=()
for op in pcos_weights weighted_cross_entropy; do
  short=${op/weighted_cross_entropy/ce}; short=${short/pcos_weights/pcos}
  CSL_TRITON_AUTOTUNE=1 stage "bench_$short" 150 "$PY" -m csl_bench "${BENCH[@]}" --ops "$op" \
    --out "$OUT/bench-$short.json" > "$OUT/bench-$short.log" 2>&1
  cat "$OUT/bench-$short.log" >> "$OUT/bench.log"
  [ -f "$OUT/bench-$short.json" ] && MERGE+=("$OUT/bench-$short.json")
done
if [ ${#MERGE[@]} -gt 0 ] && ! "$PY" -m csl_bench --merge "${MERGE[@]}" --out "$OUT/bench.json" --overwrite \
    > "$WORK/merge.log" 2>&1; then
  { echo "The merge of ${MERGE[*]##*/} into bench.json failed:"; cat "$WORK/merge.log"; } >> "$OUT/bench.log"
  NOTES+=("The benchmark results were not merged into bench.json (the merge's error at the end of bench.log); each op's are in its bench-<op>.json.")
  MERGE_FAILED=1
fi
# The extension's kernels again with each pixel's classes read one by one (CSL_CUDA_REGISTER_CLASSES=0; the default
# loads C <= 32 together into registers): which of the two is faster here (the dry run: rows saying unavailable)
CSL_CUDA_REGISTER_CLASSES=0 stage bench_cuda_plain 90 "$PY" -m csl_bench "${BENCH[@]}" --providers cuda \
  --ops pcos_weights weighted_cross_entropy --out "$OUT/bench-cuda-plain.json" > "$OUT/bench-cuda-plain.log" 2>&1
{ echo "CSL_CUDA_REGISTER_CLASSES=0 (classes read one by one), cuda only:"; cat "$OUT/bench-cuda-plain.log"; } \
  >> "$OUT/bench.log"
write_summary

# 4. What backend='auto' chooses on the benchmark shapes, with the timings it chose on
CSL_TRITON_AUTOTUNE=1 CSL_AUTO_CACHE="$WORK/auto-backend.json" stage auto 90 "$PY" -m csl_bench.bench_auto_choice \
  --out "$OUT/auto.json" > "$OUT/auto.log" 2>&1

# 5. Host-side cost per call (csl_bench/bench_host_overhead.py): real launches on a tiny input on the GPU (its
# kernels compile first: the tiny input needs other specialisations than the benchmark's; on the H200 a cold worker
# ran past 40 s); the probe's compiler must not share the cores with it (at most 60 s more here)
for _ in $(seq 60); do
  kill -0 "$PROBE_PID" 2>/dev/null && [ $((DEADLINE - $(date +%s) - RESERVE_S)) -gt 140 ] || break
  sleep 1
done
if [ $DRY = 1 ]; then HOST=(cpu baseline gpu); else HOST=(gpu baseline); fi
stage host 130 "$PY" -m csl_bench.bench_host_overhead --calls 1000 --repeats 5 --workers "${HOST[@]}" --worker-timeout 55 \
  --out "$OUT/host.json" > "$OUT/host.log" 2>&1

# 6. The test suite: parallel, GPU tests first, a time limit per test, outcomes written as they happen
: > "$OUT/progress.txt"
DESELECT=()
if [ $DRY = 1 ]; then
  REQUIRE=cpu,triton; export TRITON_INTERPRET=1; TESTS=(tests/test_pcos_weights.py tests/test_metrics.py); WORKERS=()
else
  REQUIRE=triton,cuda; WORKERS=(-n "${GPU_CHECK_WORKERS:-14}")
  # GPU tests first: a suite cut at the budget loses the CPU-only tests, which CI runs anyway.
  FIRST=(test_gpu test_pcos_weights test_weighted_cross_entropy test_backends test_triton_tuning test_trusted_mask
         test_residual_features test_threshold_weights test_confusion_matrix test_ext test_train)
  TESTS=("${FIRST[@]/#/tests/}"); TESTS=("${TESTS[@]/%/.py}")
  # Not on a GPU machine: the sm_90 compile check, which runs the kernels under Triton's interpreter first (CI runs
  # it); the dry runs of this script (CI's; run here each would start a second check with its own builds); the
  # probe's variants as a test (stage 2 ran them; as a test they would repeat its builds beside the suite).
  for f in tests/test_*.py; do
    case " ${TESTS[*]} tests/test_triton_compile.py " in *" $f "*) ;; *) TESTS+=("$f") ;; esac
  done
  DESELECT=(--deselect tests/test_gpu_check.py::test_cpu_dry_run_leaves_summary_and_evidence
            --deselect tests/test_gpu_check.py::test_a_run_killed_with_sigkill_leaves_a_pack_written_within_its_stage
            --deselect tests/test_gpu_check.py::test_cpp_exception_probe_variants_tell_csl_from_the_machine)
  # Where the minimal probe's error or csl's own crashes the process (on the H200 of 2026-12-04 the minimal one
  # raised and csl's crashed):
  if grep -qE "^(cpp-exceptions|variant csl-error-path): CRASH" "$OUT/cpp_exceptions.txt" 2>/dev/null; then
    DESELECT+=(-m "not cpp_error_path")  # the tests that make csl's extension raise (marked in the tests)
    NOTES+=("Deselected: the tests marked cpp_error_path (a TORCH_CHECK failure crashes the process on this machine).")
  fi
fi
# A list of its own (the script's own tests: a short one), on a GPU too.
[ -n "${GPU_CHECK_TESTS:-}" ] && read -r -a TESTS <<< "$GPU_CHECK_TESTS"
if [ ${#WORKERS[@]} -gt 0 ] && ! "$PY" -c "import xdist" 2>/dev/null; then
  WORKERS=()
  NOTES+=("pytest-xdist is not installed: the suite ran in one process, which the budget may cut before its end"\
" (progress.txt says how far it got).")
fi
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  # thread: a test stuck in C code is stopped too, by ending its process; an xdist worker is replaced, but in a suite
  # of one process that would end the suite, so there a test past its limit is failed by a signal (Python code only).
  if [ ${#WORKERS[@]} -gt 0 ]; then TIMEOUT_METHOD=thread; else TIMEOUT_METHOD=signal; fi
  TIMEOUT_ARGS=(--timeout 120 --timeout-method $TIMEOUT_METHOD)
else
  NOTES+=("pytest-timeout is not installed: no time limit per test; a test that hangs holds the suite until the"\
" stage's limit.")
fi
# One CPU thread per test process: 14 workers with a thread per core each would oversubscribe the cores 14-fold and
# push the CPU-bound tests (small trainings) past the per-test limit.
# The tests' backend='auto' choices (timed by 14 workers sharing the GPU) go to a file of their own, not to the
# cache the training stage reads.
export CSL_REQUIRE_BACKENDS=$REQUIRE CSL_TEST_PROGRESS="$OUT/progress.txt" OMP_NUM_THREADS=1 \
  CSL_AUTO_CACHE="$WORK/tests-auto-backend.json"
# The tests get what the budget leaves after a minute for the training steps.
RESERVE_S=0
TEST_LIMIT=$((DEADLINE - $(date +%s) - 70))
stage tests "$TEST_LIMIT" "$PY" -m pytest -q -rfE -p no:cacheprovider -p no:randomly "${WORKERS[@]}" "${TIMEOUT_ARGS[@]}" \
  "${DESELECT[@]}" --junitxml "$OUT/junit.xml" "${TESTS[@]}" > "$OUT/pytest.log" 2>&1
unset CSL_REQUIRE_BACKENDS CSL_TEST_PROGRESS TRITON_INTERPRET OMP_NUM_THREADS CSL_AUTO_CACHE

# 7. Training steps: csl train on the demo config, 6 iterations, train.amp=auto on the GPU (bf16 where it is native,
# else fp16 with loss scaling), kernels.backend=auto
if [ $DRY = 1 ]; then DEVICE=cpu; AMP=fp32; BACKEND=cpu; LIMIT=300; else DEVICE=cuda; AMP=auto; BACKEND=auto; LIMIT=60; fi
: > "$OUT/train.log"
stage "train_$BACKEND" $LIMIT "$PY" -m csl train --config demo device=$DEVICE train.amp=$AMP \
  train.iters=6 train.iters_per_epoch=6 train.log_every=2 train.progress=false "kernels.backend=$BACKEND" \
  data.synthetic.num_val=8 ${GPU_CHECK_TRAIN_OVERRIDES:-} \
  output_dir="$WORK/train_$BACKEND" >> "$OUT/train.log" 2>&1

# 8. Summary
for _ in $(seq 30); do
  kill -0 "$PROBE_PID" 2>/dev/null && [ "$(date +%s)" -lt "$DEADLINE" ] || break
  sleep 1
done
if kill -0 "$PROBE_PID" 2>/dev/null; then  # the probe stops its children's builds on SIGTERM
  kill "$PROBE_PID" 2>/dev/null
  for _ in $(seq 20); do kill -0 "$PROBE_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$PROBE_PID" 2>/dev/null
  # Said in the file the summary shows: an outcome missing there was not reached (not lost).
  echo "cpp_exception_probe: still running at the end of the check, stopped" >> "$OUT/cpp_exceptions.txt"
fi
find "$OUT" -name 'progress.txt.hang-*' -empty -delete
write_summary
rm -rf "$WORK"
cat "$OUT/summary.md"
FAILED=0
for name in "${!STATUS[@]}"; do [ "${STATUS[$name]}" != 0 ] && FAILED=1; done
[ "${MERGE_FAILED:-0}" = 1 ] && FAILED=1
exit $FAILED
