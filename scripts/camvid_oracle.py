"""The table and picture of "Perfect pseudo-labels" in docs/results/camvid.md, from the committed records of the
oracle runs (true masks as pseudo-labels, ``selection.mode=oracle``) and of the runs trained beside them: each
continuation's evaluations (``metrics_<run>.jsonl``) and its final model evaluated with BatchNorm statistics
re-estimated on 320 clean training frames (``bn_<run>.txt``, the output of ``csl eval --bn-recalibrate 320``) and on
320 training-size crops (``bn_crops_<run>.txt``, ``csl eval --bn-recalibrate 320 --bn-views crops``).

    .venv/bin/python scripts/camvid_oracle.py   # prints the Markdown table, writes camvid/miou_oracle.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csl.logging_utils import read_metrics  # noqa: E402
from csl.plots import METHOD_COLOURS, _pyplot, _save_figure  # noqa: E402
from csl.report import LABELS  # noqa: E402

RECORDS = os.path.join(ROOT, "docs", "results", "camvid")
def _earlier(folder: str) -> dict[str, str]:
    """The continuations of an earlier run (its folder) that an oracle run from the same warm-up sits beside."""
    return {"supervised": folder, "threshold": folder, "csl": folder}


# (split, seed, note, folder under docs/results/camvid, {method: folder} of runs recorded elsewhere) of each oracle
# run; a folder not there yet is left out. The note tells apart two runs of one split and seed (the same command on
# another kind of machine). An oracle run may continue the warm-up of an earlier run, which the same machine kind
# repeats bit for bit: that run's continuations are read from its own folder.
RUNS = [("1/8", 0, "", "seed0_oracle", {}), ("1/8", 1, "", "seed1_oracle", {}), ("1/8", 2, "", "seed2_oracle", {}),
        ("1/4", 0, "", "1_4_seed0_oracle", {}), ("1/4", 1, "", "1_4_seed1_oracle", {}),
        ("1/4", 1, "AMD EPYC", "1_4_seed1_amd_oracle", _earlier("1_4_seed1")),
        ("1/4", 2, "AMD EPYC", "1_4_seed2_amd_oracle", _earlier("1_4_seed2"))]
METHODS = ["warmup", "supervised", "oracle", "threshold", "csl"]
# Seed 0's warm-up kept no records of its own (docs/results/camvid.md says why); its one evaluation, from the
# experiment.log committed beside the others.
WARMUP_MIOU = {"seed0_oracle": 49.25}
# How a final model's BatchNorm statistics were re-estimated: the record's file prefix, the table's column.
RECALIBRATIONS = {"frames": ("bn_", "BatchNorm re-estimated on frames"),
                  "crops": ("bn_crops_", "on training crops")}


def recalibrated_miou(path: str) -> float | None:
    """The mIoU (%) that ``csl eval`` printed as its last line (a JSON record), None without such a file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("{")]
    return 100 * json.loads(lines[-1])["miou"] if lines else None


def name(key: tuple[str, int, str]) -> str:
    """``1/4, seed 1`` (with the run's note in brackets where it has one)."""
    split, seed, note = key
    return f"{split}, seed {seed}" + (f" ({note})" if note else "")


def load() -> dict[tuple[str, int, str], dict[str, dict]]:
    """{(split, seed, note): {method: {"iters": [...], "miou": [...] (%), "frames": % or None, "crops": % or None}}}
    of the methods on record ("frames" / "crops": the final model with its BatchNorm statistics re-estimated so)."""
    runs = {}
    for split, seed, note, own_folder, elsewhere in RUNS:
        if not os.path.isdir(os.path.join(RECORDS, own_folder)):
            continue
        row = {}
        for method in METHODS:
            folder = elsewhere.get(method, own_folder)
            path = os.path.join(RECORDS, folder, f"metrics_{method}.jsonl")
            evals = read_metrics(path, "eval") if os.path.isfile(path) else []
            if not evals and method == "warmup" and folder in WARMUP_MIOU:
                evals = [{"iter": 0, "miou": WARMUP_MIOU[folder] / 100}]
            if evals:
                row[method] = {"iters": [r["iter"] for r in evals], "miou": [100 * r["miou"] for r in evals]}
                for kind, (prefix, _) in RECALIBRATIONS.items():
                    row[method][kind] = recalibrated_miou(os.path.join(RECORDS, folder, f"{prefix}{method}.txt"))
        runs[split, seed, note] = row
    return runs


def table(runs: dict[tuple[str, int, str], dict[str, dict]]) -> str:
    lines = ["| split, seed | run | mIoU after each 100 iterations | final (best) | minus threshold, each evaluation | "
             + " | ".join(column for _, column in RECALIBRATIONS.values()) + " |",
             "| --- | --- | --- | ---: | --- |" + " ---: |" * len(RECALIBRATIONS)]
    for key, row in runs.items():
        base = row.get("threshold")
        for method, run in row.items():
            curve = ", ".join(f"{v:.1f}" for v in run["miou"])
            final = f"{run['miou'][-1]:.1f}" + (f" ({max(run['miou']):.1f})" if len(run["miou"]) > 1 else "")
            diffs = ""
            if base is not None and method not in ("warmup", "threshold") and len(run["miou"]) == len(base["miou"]):
                diffs = ", ".join(f"{a - b:+.1f}" for a, b in zip(run["miou"], base["miou"], strict=True))
            recal = " | ".join("-" if run[kind] is None else f"{run[kind]:.2f}" for kind in RECALIBRATIONS)
            lines.append(f"| {name(key)} | {LABELS[method]} | {curve} | {final} | {diffs} | {recal} |")
    return "\n".join(lines)


def picture(runs: dict[tuple[str, int, str], dict[str, dict]], out_path: str) -> str:
    """One panel per oracle run (split, seed, machine), three to a row: each continuation's val mIoU per evaluation,
    its final model with BatchNorm re-estimated to the right of the panel's last evaluation (stars: on frames, then
    diamonds: on training crops; each continuation at its own place), the warm-up as a dashed line."""
    plt = _pyplot()
    cols = min(3, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), sharey=True, squeeze=False)
    panels = axes.flatten()
    for ax in panels[len(runs):]:
        ax.set_visible(False)
    colours = METHOD_COLOURS  # as in every report picture
    # Right of a panel's last evaluation, a column of stars (frames) then one of diamonds (crops); in each, every
    # continuation at its own place (METHODS' order), so that two final models of near mIoU do not cover each other.
    # One step is a sixteenth of the panel's evaluations' span: the same width at every panel's scale.
    slots = [m for m in METHODS if m != "warmup"]
    for ax, (key, row) in zip(panels, runs.items(), strict=False):
        iters = [i for method, run in row.items() if method != "warmup" for i in run["iters"]]
        last = max(iters, default=0)
        step = (last - min(iters, default=0)) / 16 or 20  # 20 iterations where the panel has one evaluation
        for method, run in row.items():
            if method == "warmup":
                ax.axhline(run["miou"][-1], color="grey", ls="--", lw=1, label="warm-up (start of each)")
                continue
            ax.plot(run["iters"], run["miou"], "o-", color=colours[method], label=LABELS[method])
            for kind, marker, column in (("frames", "*", 2), ("crops", "D", 3 + len(slots))):
                if run[kind] is not None:
                    ax.plot(last + (column + slots.index(method)) * step, run[kind], marker,
                            ms=11 if marker == "*" else 7, color=colours[method])
        ax.set_title(f"CamVid {name(key)}")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("val mIoU (%)")
    fullest = max(zip(panels, runs.values(), strict=False), key=lambda pair: len(pair[1]))[0]
    fullest.legend(fontsize=8, loc="lower right")
    fig.supxlabel("iteration (right of the last: the final model with BatchNorm re-estimated, * on frames, "
                  "\u25c6 on training crops)")
    fig.suptitle("Perfect pseudo-labels (true masks) in the same recipe as the threshold and CSL")
    fig.tight_layout()
    return _save_figure(fig, out_path)


def main() -> None:
    runs = load()
    print(table(runs))
    print(picture(runs, os.path.join(RECORDS, "miou_oracle.png")))


if __name__ == "__main__":
    # No options: --help prints the description (and writes nothing), an unknown argument is a usage error.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
