#!/usr/bin/env bash
# The CamVid experiment of docs/results/camvid.md, from a fresh clone with ../shared beside it (CPU, ~1 hour on an
# idle 2-core machine): an ImageNet MobileNetV2 DeepLabV3+ warmed up on the 1/8 labeled frames, then continued three
# ways (supervised only, threshold 0.95, CSL) with the same schedule and seed; `csl analyze` on the warm-up model and
# on each final model; the report (tables + pictures) in $OUT/report.
#   bash scripts/camvid_experiment.sh            # seed 0 -> runs/camvid/seed0
#   SEED=1 bash scripts/camvid_experiment.sh     # another seed -> runs/camvid/seed1
#   SPLIT=1_4 bash scripts/camvid_experiment.sh  # 1/4 labeled -> runs/camvid/1_4_seed0
#   METHODS=supervised,threshold,csl,csl_no_tmp,confidence_share bash scripts/camvid_experiment.sh  # with the controls
# Started again, it reuses what is done: finished stages, a stopped one from its latest.pt, up-to-date analyses.
# Settings are environment variables: SHARED (default ../shared), SEED (0), SPLIT (1_8; e.g. 1_4), OUT (above),
# WARMUP (800 iterations, lr 0.002), ITERS (600 per method), METHODS (supervised,threshold,csl; any of csl demo's).
# It takes no arguments; -h / --help prints this header.
set -euo pipefail
case "${1:-}" in
  '') ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "camvid_experiment: unknown argument $1 (settings are environment variables, e.g. SEED=1; see --help)" >&2
     exit 2 ;;
esac
# SHARED / OUT given relative are taken from the caller's folder; the defaults are relative to the checkout.
abs() { case "$1" in /*) echo "$1" ;; *) echo "$(pwd)/$1" ;; esac; }
[ -n "${SHARED:-}" ] && SHARED=$(abs "$SHARED")
[ -n "${OUT:-}" ] && OUT=$(abs "$OUT")
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
SEED=${SEED:-0}
SPLIT=${SPLIT:-1_8}
if [ "$SPLIT" = 1_8 ]; then OUT=${OUT:-runs/camvid/seed$SEED}; else OUT=${OUT:-runs/camvid/${SPLIT}_seed$SEED}; fi
WARMUP=${WARMUP:-800}
ITERS=${ITERS:-600}
METHODS=${METHODS:-supervised,threshold,csl}
if [ ! -d "$SHARED/data/camvid" ] || [ ! -f "$SHARED/weights/mobilenet_v2-b0353104.pth" ]; then
  echo "camvid_experiment: needs $SHARED/data/camvid and $SHARED/weights/mobilenet_v2-b0353104.pth" >&2
  exit 2
fi
bash scripts/setup_env.sh
PY=.venv/bin/python
DATA=("data.root=$SHARED/data/camvid" "model.pretrained=$SHARED/weights/mobilenet_v2-b0353104.pth")
start=$(date +%s)
# The committed splits are what this writes (deterministic from the seed), and SPLIT's own if it is another.
$PY -m csl split --list "$SHARED/data/camvid/train.txt" --fractions 1/8 1/4 "${SPLIT/_//}" --seed 0 \
    --out csl/splits/camvid
$PY -m csl demo --config camvid --out "$OUT" --warmup "$WARMUP" --warmup-lr 0.002 --iters "$ITERS" \
    --methods "$METHODS" "seed=$SEED" "data.split=$SPLIT" "${DATA[@]}"
for run in warmup ${METHODS//,/ }; do
  # An analysis newer than its checkpoint is kept (a second call, e.g. with more METHODS, analyses the new runs).
  if [ "$OUT/analysis/$run/analysis.json" -nt "$OUT/$run/latest.pt" ]; then
    echo "camvid_experiment: $OUT/analysis/$run is up to date"
    continue
  fi
  $PY -m csl analyze --checkpoint "$OUT/$run/latest.pt" --out "$OUT/analysis/$run" --overwrite "${DATA[@]}"
done
$PY -m csl report "$OUT" --out "$OUT/report" --overwrite
echo "camvid_experiment: done in $(( $(date +%s) - start )) s -> $OUT"
