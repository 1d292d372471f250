"""The report and analysis pictures of docs/results/camvid.md (and of the ``report.md`` files beside its records),
redrawn with the current ``csl/plots.py`` from the committed records only: no checkpoint, no image.

    .venv/bin/python scripts/camvid_pictures.py            # writes the pictures into docs/results/camvid/
    .venv/bin/python scripts/camvid_pictures.py --check    # draws them into a temporary folder and names those that
                                                           # differ from the committed ones (exit status 1 if any)
    .venv/bin/python scripts/camvid_pictures.py --out DIR  # draws them into DIR, under their committed names

Each run folder's records (``<folder>/summary.json`` and ``metrics_<run>.jsonl``) are laid out again as ``csl demo``
wrote them and read with ``csl.report.load_run``; the pictures are those of ``csl report`` (``miou_<tag>.png``,
``pseudo_labels_<tag>.png``, ``miou_by_seed.png``, drawn from ``csl.report.curves`` / ``seed_finals``),
``plot_miou_panels`` for the two schedules side by side, and ``csl analyze``'s ``accuracy_recall.png`` /
``per_class.png`` from an ``analysis_<run>.json``. Where a folder now holds runs trained after its picture was drawn
(seed0, seed1, seed1_corrected, seed2_corrected), the picture draws the runs the text around it in camvid.md names:
:data:`PICTURES` gives them.

Left as they are, and why (:data:`NOT_REDRAWN`): the panels (``*_panels.png``) and the feature plane
(``warmup_feature_plane.png``) need the model's predictions on the images, which no record keeps; ``overview.png``,
``miou_oracle.png``, ``confidence_long.png`` and ``from4000.png`` are drawn by their own scripts
(``camvid_overview.py``, ``camvid_oracle.py``, ``camvid_confidence.py``) from the same records.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csl.analyze import BASELINE_TAU  # noqa: E402
from csl.files import atomic_open  # noqa: E402
from csl.plots import (  # noqa: E402
    plot_accuracy_recall,
    plot_miou_by_seed,
    plot_miou_curves,
    plot_miou_panels,
    plot_per_class,
    plot_pseudo_label_curves,
)
from csl.report import _read_json, curves, load_run, seed_finals  # noqa: E402

RECORDS = os.path.join(ROOT, "docs", "results", "camvid")
# The demo's three methods: the runs of a section written before the controls were trained into the same folder.
DEMO = ("supervised", "threshold", "csl")

# (picture under docs/results/camvid, what it draws, its records): "miou" / "pseudo_labels" a run folder's curves,
# "by_seed" the final mIoU of several folders (one per seed), given as (folder, runs) with runs None for every run
# the folder holds; "schedules" one mIoU panel per (title, folder, runs); "accuracy_recall" / "per_class" an
# analysis JSON.
PICTURES = [
    # "Results" (1/8, seed 0, first recipe): the demo's three methods; the controls are later sections'.
    ("miou_seed0.png", "miou", ("seed0", DEMO)),
    ("pseudo_labels_seed0.png", "pseudo_labels", ("seed0", DEMO)),
    # "A second seed": the gaps table and its picture give every run of both seeds; the text above miou_seed1.png
    # gives seed 1's evaluations of supervised only, threshold, CSL and CSL with the released rule, "(picture below)".
    ("miou_by_seed.png", "by_seed", [("seed0", None), ("seed1", None)]),
    ("miou_seed1.png", "miou", ("seed1", (*DEMO, "csl_released"))),
    ("pseudo_labels_seed1.png", "pseudo_labels", ("seed1", DEMO)),  # seed1/report.md's, of the demo's methods
    # "Seed 2 / 0 / 1 with the corrected recipe": the three methods (alpha 64 and the control come later).
    ("miou_seed2_corrected.png", "miou", ("seed2_corrected", DEMO)),
    ("pseudo_labels_seed2_corrected.png", "pseudo_labels", ("seed2_corrected", DEMO)),
    ("miou_by_seed_corrected.png", "by_seed", [(f"seed{s}_corrected", DEMO) for s in (0, 1, 2)]),
    ("miou_seed0_corrected.png", "miou", ("seed0_corrected", None)),
    ("pseudo_labels_seed0_corrected.png", "pseudo_labels", ("seed0_corrected", None)),
    ("miou_seed1_corrected.png", "miou", ("seed1_corrected", DEMO)),
    ("pseudo_labels_seed1_corrected.png", "pseudo_labels", ("seed1_corrected", DEMO)),
    ("miou_seed0_rerun.png", "miou", ("seed0_rerun", None)),
    ("pseudo_labels_seed0_rerun.png", "pseudo_labels", ("seed0_rerun", None)),
    # "A longer schedule": plot_miou_panels over seed0's and seed0_1200's evaluations, the three methods of each.
    ("miou_seed0_schedules.png", "schedules", [("600 iterations per method", "seed0", DEMO),
                                               ("1200 iterations per method", "seed0_1200", None)]),
    # The 1/4 split: every run of each folder (its controls drawn with it since they were trained).
    ("miou_1_4_seed0.png", "miou", ("1_4_seed0", None)),
    ("miou_1_4_seed1.png", "miou", ("1_4_seed1", None)),
    ("pseudo_labels_1_4_seed1.png", "pseudo_labels", ("1_4_seed1", None)),
    ("miou_1_4_seed0_corrected.png", "miou", ("1_4_seed0_corrected", None)),
    ("pseudo_labels_1_4_seed0_corrected.png", "pseudo_labels", ("1_4_seed0_corrected", None)),
    ("1_4_corrected/miou_by_seed.png", "by_seed", [(f, None) for f in ("1_4_seed0_corrected", "1_4_seed1",
                                                                       "1_4_seed2")]),
    ("miou_1_4_seed2.png", "miou", ("1_4_seed2", None)),
    ("pseudo_labels_1_4_seed2.png", "pseudo_labels", ("1_4_seed2", None)),
    # The oracle runs' own reports (<folder>/report.md).
    *((f"{folder}/{kind}_seed{seed}.png", kind, (folder, None)) for folder, seed in
      (("seed1_oracle", 1), ("seed2_oracle", 2), ("1_4_seed0_oracle", 0)) for kind in ("miou", "pseudo_labels")),
    # "Selection quality on real predictions": csl analyze's pictures of seed 0's models.
    ("warmup_accuracy_recall.png", "accuracy_recall", "seed0/analysis_warmup.json"),
    ("threshold_accuracy_recall.png", "accuracy_recall", "seed0/analysis_threshold.json"),
    ("csl_accuracy_recall.png", "accuracy_recall", "seed0/analysis_csl.json"),
    ("warmup_per_class.png", "per_class", "seed0/analysis_warmup.json"),
]

# The pictures of docs/results/camvid that this script leaves as they are.
NOT_REDRAWN = {
    "warmup_panels.png": "csl analyze's panels: the model's predictions on four images",
    "csl_panels.png": "csl analyze's panels: the model's predictions on four images",
    "warmup_feature_plane.png": "csl analyze's feature plane: the model's features of one image",
    "overview.png": "drawn by scripts/camvid_overview.py",
    "miou_oracle.png": "drawn by scripts/camvid_oracle.py",
    "confidence_long.png": "drawn by scripts/camvid_confidence.py",
    "from4000.png": "drawn by scripts/camvid_confidence.py",
}


def run(records: str, folder: str, runs, work: str) -> dict:
    """The run folder ``records/folder`` laid out as ``csl demo`` wrote it (under ``work``) and read by
    ``csl.report.load_run``; with ``runs``, only those of its methods, each of which must be on record."""
    src = os.path.join(records, folder)
    out = os.path.join(work, folder)
    if not os.path.isdir(out):
        os.makedirs(out)
        shutil.copy(os.path.join(src, "summary.json"), os.path.join(out, "summary.json"))
        for name in sorted(os.listdir(src)):
            if name.startswith("metrics_") and name.endswith(".jsonl"):
                os.makedirs(os.path.join(out, name[len("metrics_"):-len(".jsonl")]))
                shutil.copy(os.path.join(src, name),
                            os.path.join(out, name[len("metrics_"):-len(".jsonl")], "metrics.jsonl"))
    loaded = load_run(out)
    if runs is not None:
        missing = [m for m in runs if m not in loaded["methods"]]
        if missing:
            raise ValueError(f"{src} has no finished run {', '.join(missing)} (metrics_<run>.jsonl)")
        loaded["methods"] = [m for m in loaded["methods"] if m in runs]
    return loaded


def draw(name: str, kind: str, source, records: str, out_dir: str, work: str) -> str:
    """Draw the picture ``name`` (a row of :data:`PICTURES`) from ``records`` into ``out_dir``; returns its path."""
    path = os.path.join(out_dir, name)
    if kind in ("miou", "pseudo_labels"):
        drawn = curves(run(records, *source, work), "eval" if kind == "miou" else "pseudo_labels")
        return (plot_miou_curves if kind == "miou" else plot_pseudo_label_curves)(drawn, path)
    if kind == "by_seed":
        return plot_miou_by_seed(seed_finals([run(records, f, runs, work) for f, runs in source]), path)
    if kind == "schedules":
        return plot_miou_panels({title: curves(run(records, f, runs, work), "eval") for title, f, runs in source},
                                path)
    if kind in ("accuracy_recall", "per_class"):
        analysis = _read_json(os.path.join(records, source))
        drawn_in = tempfile.mkdtemp(dir=work)  # csl analyze's fixed file name, then the picture's own
        written = (plot_accuracy_recall if kind == "accuracy_recall" else plot_per_class)(analysis, drawn_in,
                                                                                          BASELINE_TAU)
        with open(written, "rb") as drawn, atomic_open(path, binary=True) as f:  # whole or not at all, as the rest
            f.write(drawn.read())
        return path
    raise ValueError(f"{name}: unknown kind of picture {kind!r}")


def draw_all(out_dir: str, records: str = RECORDS) -> list[str]:
    """Every picture of :data:`PICTURES` from ``records`` into ``out_dir``; returns their paths."""
    with tempfile.TemporaryDirectory() as work:
        return [draw(name, kind, source, records, out_dir, work) for name, kind, source in PICTURES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="draw into a temporary folder and name the committed pictures that differ")
    mode.add_argument("--out", help="draw into this folder instead of docs/results/camvid")
    args = parser.parse_args(argv)
    if not args.check:
        for path in draw_all(args.out or RECORDS):
            print(path)
        return 0
    with tempfile.TemporaryDirectory() as drawn:
        draw_all(drawn)
        differ = [name for name, _, _ in PICTURES if not os.path.isfile(os.path.join(RECORDS, name))
                  or not filecmp.cmp(os.path.join(drawn, name), os.path.join(RECORDS, name), shallow=False)]
    for name in differ:
        print(f"differs from the records' drawing: docs/results/camvid/{name}")
    print(f"{len(PICTURES) - len(differ)} of {len(PICTURES)} pictures as the records draw them")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
