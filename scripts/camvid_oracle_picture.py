"""The picture of "Perfect pseudo-labels" in docs/results/camvid.md: val mIoU per evaluation of supervised only, the
oracle (true masks as pseudo-labels) and the threshold on 1/8 seed 0, from the committed records.

    .venv/bin/python scripts/camvid_oracle_picture.py   # writes docs/results/camvid/miou_seed0_oracle.png
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csl.demo import LABELS  # noqa: E402
from csl.logging_utils import read_metrics  # noqa: E402
from csl.plots import _pyplot, _save_figure  # noqa: E402

RECORDS = os.path.join(ROOT, "docs", "results", "camvid", "seed0_oracle")
WARMUP_MIOU = 49.25  # the warm-up's one evaluation (experiment.log; its own records were not kept)


def main() -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("supervised", "oracle", "threshold"):
        evals = read_metrics(os.path.join(RECORDS, f"metrics_{method}.jsonl"), "eval")
        ax.plot([r["iter"] for r in evals], [100 * r["miou"] for r in evals], "o-", label=LABELS[method])
    ax.axhline(WARMUP_MIOU, color="grey", ls="--", lw=1, label="warm-up (start of each)")
    ax.set_xlabel("iteration of the continuation")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("CamVid 1/8, seed 0: perfect pseudo-labels in the same recipe")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save_figure(fig, os.path.join(ROOT, "docs", "results", "camvid", "miou_seed0_oracle.png"))


if __name__ == "__main__":
    print(main())
