"""The table and picture of "Perfect pseudo-labels" in docs/results/camvid.md, from the committed records of the
oracle runs (true masks as pseudo-labels, ``selection.mode=oracle``) and of the runs trained beside them: each
continuation's evaluations (``metrics_<run>.jsonl``) and its final model evaluated with BatchNorm statistics
re-estimated on clean frames (``bn_<run>.txt``, the output of ``csl eval --bn-recalibrate 320``).

    .venv/bin/python scripts/camvid_oracle.py   # prints the Markdown table, writes camvid/miou_oracle.png
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csl.logging_utils import read_metrics  # noqa: E402
from csl.plots import _pyplot, _save_figure  # noqa: E402
from csl.report import LABELS  # noqa: E402

RECORDS = os.path.join(ROOT, "docs", "results", "camvid")
# (seed of the 1/8 split, folder under docs/results/camvid) of each oracle run.
RUNS = [(0, "seed0_oracle"), (1, "seed1_oracle"), (2, "seed2_oracle")]
METHODS = ["warmup", "supervised", "oracle", "threshold", "csl"]
# Seed 0's warm-up kept no records of its own (docs/results/camvid.md says why); its one evaluation, from the
# experiment.log committed beside the others.
WARMUP_MIOU = {0: 49.25}


def recalibrated_miou(path: str) -> float | None:
    """The mIoU (%) that ``csl eval`` printed as its last line (a JSON record), None without such a file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("{")]
    return 100 * json.loads(lines[-1])["miou"] if lines else None


def load() -> dict[int, dict[str, dict]]:
    """{seed: {method: {"iters": [...], "miou": [...] (%), "recalibrated": % or None}}} of the methods on record."""
    runs = {}
    for seed, folder in RUNS:
        row = {}
        for method in METHODS:
            path = os.path.join(RECORDS, folder, f"metrics_{method}.jsonl")
            evals = read_metrics(path, "eval") if os.path.isfile(path) else []
            if not evals and method == "warmup" and seed in WARMUP_MIOU:
                evals = [{"iter": 0, "miou": WARMUP_MIOU[seed] / 100}]
            if evals:
                row[method] = {"iters": [r["iter"] for r in evals], "miou": [100 * r["miou"] for r in evals],
                               "recalibrated": recalibrated_miou(os.path.join(RECORDS, folder, f"bn_{method}.txt"))}
        runs[seed] = row
    return runs


def table(runs: dict[int, dict[str, dict]]) -> str:
    lines = ["| 1/8 split | run | mIoU after each 100 iterations | final (best) | minus threshold, each evaluation | "
             "BatchNorm statistics re-estimated |", "| --- | --- | --- | ---: | --- | ---: |"]
    for seed, row in runs.items():
        base = row.get("threshold")
        for method, run in row.items():
            curve = ", ".join(f"{v:.1f}" for v in run["miou"])
            final = f"{run['miou'][-1]:.1f}" + (f" ({max(run['miou']):.1f})" if len(run["miou"]) > 1 else "")
            diffs = ""
            if base is not None and method not in ("warmup", "threshold") and len(run["miou"]) == len(base["miou"]):
                diffs = ", ".join(f"{a - b:+.1f}" for a, b in zip(run["miou"], base["miou"], strict=True))
            recal = "-" if run["recalibrated"] is None else f"{run['recalibrated']:.2f}"
            lines.append(f"| seed {seed} | {LABELS[method]} | {curve} | {final} | {diffs} | {recal} |")
    return "\n".join(lines)


def picture(runs: dict[int, dict[str, dict]], out_path: str) -> str:
    """One panel per seed: each continuation's val mIoU per evaluation, its BatchNorm-re-estimated final model as a
    star to the right of its last evaluation, the warm-up as a dashed line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True, squeeze=False)
    colours = dict(zip(METHODS[1:], plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, (seed, row) in zip(axes[0], runs.items(), strict=True):
        for method, run in row.items():
            if method == "warmup":
                ax.axhline(run["miou"][-1], color="grey", ls="--", lw=1, label="warm-up (start of each)")
                continue
            ax.plot(run["iters"], run["miou"], "o-", color=colours[method], label=LABELS[method])
            if run["recalibrated"] is not None:
                ax.plot(run["iters"][-1] + 40, run["recalibrated"], "*", ms=12, color=colours[method])
        ax.set_title(f"CamVid 1/8, seed {seed}")
        ax.set_xlabel("iteration (star: final model, BatchNorm re-estimated)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val mIoU (%)")
    fullest = max(zip(axes[0], runs.values(), strict=True), key=lambda pair: len(pair[1]))[0]
    fullest.legend(fontsize=8, loc="lower right")
    fig.suptitle("Perfect pseudo-labels (true masks) in the same recipe as the threshold and CSL")
    return _save_figure(fig, out_path)


def main() -> None:
    runs = load()
    print(table(runs))
    print(picture(runs, os.path.join(RECORDS, "miou_oracle.png")))


if __name__ == "__main__":
    main()
