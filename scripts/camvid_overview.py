"""The at-a-glance table and picture of docs/results/camvid.md, from the committed records of every CamVid run with
the corrected recipe (each run's last evaluation in ``docs/results/camvid/<folder>/metrics_<method>.jsonl``).

    .venv/bin/python scripts/camvid_overview.py   # prints the Markdown table, writes camvid/overview.png

The picture draws each method's final mIoU minus the threshold baseline's final mIoU of the same split and seed (the
paired difference: the seeds move the levels by several points, the differences much less), one marker per run, each
run at its own place beside the method's (1/8 split left, 1/4 right, seeds in order).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csl.logging_utils import read_metrics  # noqa: E402
from csl.plots import _pyplot, _save_figure  # noqa: E402
from csl.report import LABELS  # noqa: E402

RECORDS = os.path.join(ROOT, "docs", "results", "camvid")
# (split, seed, folder under docs/results/camvid): the runs with the corrected recipe.
RUNS = [("1/8", 0, "seed0_corrected"), ("1/8", 1, "seed1_corrected"), ("1/8", 2, "seed2_corrected"),
        ("1/4", 0, "1_4_seed0_corrected"), ("1/4", 1, "1_4_seed1"), ("1/4", 2, "1_4_seed2")]
METHODS = ["warmup", "supervised", "threshold", "csl", "csl_no_tmp", "confidence_share"]
BASELINE = "threshold"
# The picture's places of the runs beside each method's tick (x units, one per method): the middle of a split's runs,
# and the step between two seeds of one split (wider than a marker at the picture's width).
SPLIT_SHIFT, SEED_STEP = 0.2, 0.08


def final_miou(path: str) -> float | None:
    """The mIoU (%) of the last evaluation in a metrics.jsonl, None without one."""
    evals = read_metrics(path, "eval")
    return 100 * evals[-1]["miou"] if evals else None


def load() -> dict[tuple[str, int], dict[str, float]]:
    finals = {}
    for split, seed, folder in RUNS:
        row = {}
        for method in METHODS:
            path = os.path.join(RECORDS, folder, f"metrics_{method}.jsonl")
            if os.path.isfile(path) and (miou := final_miou(path)) is not None:
                row[method] = miou
        finals[(split, seed)] = row
    return finals


def table(finals: dict[tuple[str, int], dict[str, float]]) -> str:
    cells = lambda row, m: f"{row[m]:.1f}" if m in row else "-"  # noqa: E731
    # CSL minus threshold of one run; None where either is not on record (a stage stopped for time)
    paired = lambda row: row["csl"] - row[BASELINE] if "csl" in row and BASELINE in row else None  # noqa: E731
    lines = ["| split, seed | " + " | ".join(LABELS[m] for m in METHODS) + " | CSL minus threshold |",
             "| --- |" + " ---: |" * (len(METHODS) + 1)]
    for (split, seed), row in finals.items():
        diff = "-" if paired(row) is None else f"{paired(row):+.1f}"
        lines.append(f"| {split}, seed {seed} | " + " | ".join(cells(row, m) for m in METHODS) + f" | {diff} |")
    for split in dict.fromkeys(s for s, _ in finals):
        rows = [row for (s, _), row in finals.items() if s == split]
        means = []
        for m in METHODS:
            # A mean over fewer seeds than the others' would compare other levels: only over every seed.
            values = [row[m] for row in rows if m in row]
            means.append(f"{sum(values) / len(values):.1f}" if len(values) == len(rows) else "-")
        diffs = [paired(row) for row in rows]
        mean_diff = "-" if None in diffs else f"{sum(diffs) / len(diffs):+.1f}"  # as the means: every seed or none
        lines.append(f"| {split}, mean | " + " | ".join(means) + f" | {mean_diff} |")
    return "\n".join(lines)


def picture(finals: dict[tuple[str, int], dict[str, float]], out_path: str) -> str:
    plt = _pyplot()
    methods = [m for m in METHODS if m not in ("warmup", BASELINE)]
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # Each run at its own place beside the method's: the 1/8 split left of it, the 1/4 split right, a split's seeds
    # SEED_STEP apart in the order of their numbers, so that no two runs' markers cover each other.
    dodge = {}
    for split in dict.fromkeys(s for s, _ in finals):
        seeds = sorted(seed for s, seed in finals if s == split)
        centre = -SPLIT_SHIFT if split == "1/8" else SPLIT_SHIFT
        dodge.update({(split, seed): centre + (k - (len(seeds) - 1) / 2) * SEED_STEP for k, seed in enumerate(seeds)})
    for (split, seed), row in finals.items():
        if BASELINE not in row:  # nothing to draw a difference to
            continue
        marker = "o" if split == "1/8" else "s"
        xs = [i + dodge[split, seed] for i, m in enumerate(methods) if m in row]
        ys = [row[m] - row[BASELINE] for m in methods if m in row]
        ax.plot(xs, ys, marker, ms=6, color=colours[seed], alpha=0.85, label=f"{split} split, seed {seed}")
    ax.axhline(0, color="black", lw=0.8, label=f"{LABELS[BASELINE]} (0 by definition)")
    ax.set_xticks(range(len(methods)), [LABELS[m].replace(" (", "\n(") for m in methods], fontsize=8)
    ax.set_ylabel(f"final val mIoU minus {LABELS[BASELINE].split(' (')[0]}\n(points, same split and seed)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    return _save_figure(fig, out_path)


def main() -> None:
    finals = load()
    print(table(finals))
    print(picture(finals, os.path.join(RECORDS, "overview.png")))


if __name__ == "__main__":
    # No options: --help prints the description (and writes nothing), an unknown argument is a usage error.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
