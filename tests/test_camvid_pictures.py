"""scripts/camvid_pictures.py: every picture of docs/results/camvid.md that the committed records determine is redrawn
from them, under the name the document links."""

from __future__ import annotations

import os
import re

import numpy as np
from conftest import ROOT, load_script

RECORDS = os.path.join(ROOT, "docs", "results", "camvid")


def _linked_pictures() -> set[str]:
    """The pictures under docs/results/camvid that camvid.md and the report.md files beside the records link, as paths
    relative to docs/results/camvid."""
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        linked = set(re.findall(r"\]\(camvid/([^)]+\.png)\)", f.read()))
    assert len(linked) >= 30  # the pattern still finds camvid.md's links
    for folder in os.listdir(RECORDS):
        report = os.path.join(RECORDS, folder, "report.md")
        if os.path.isfile(report):
            with open(report) as f:
                linked |= {os.path.normpath(os.path.join(folder, link))
                           for link in re.findall(r"\]\(([^)]+\.png)\)", f.read())}
    return linked


def test_every_linked_picture_the_records_determine_is_written(tmp_path):
    """main(--out): one picture per row of PICTURES, each under its committed name; every picture linked by camvid.md
    (or a report.md of its records) is either redrawn or named in NOT_REDRAWN with the reason (a new record-based
    link the script does not draw fails here)."""
    script = load_script("camvid_pictures")
    assert script.main(["--out", str(tmp_path)]) == 0
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    names = [name for name, _, _ in script.PICTURES]
    assert len(set(names)) == len(names) and written == set(names)
    assert all((tmp_path / name).stat().st_size > 10_000 for name in names)
    linked = _linked_pictures()
    assert linked - set(names) - set(script.NOT_REDRAWN) == set()
    # Both lists name committed pictures, and none is in both.
    assert all(os.path.isfile(os.path.join(RECORDS, name)) for name in [*names, *script.NOT_REDRAWN])
    assert not set(names) & set(script.NOT_REDRAWN)


def test_the_redrawn_pictures_give_the_documented_numbers(kept_figures, tmp_path):
    """Three pictures drawn from the records say what camvid.md's tables beside them say: seed 1's four runs of "A
    second seed" end at 54.8 / 51.5 / 50.3 / 49.6; seed 0's CSL keeps a mean weight (the mask ratio, dashed) of 77.3 %
    and its reliable pixels 97.2 % accurate at iteration 600; the corrected recipe's three seeds end at the final mIoUs
    of its table, the warm-up first."""
    script = load_script("camvid_pictures")
    rows = {name: (kind, source) for name, kind, source in script.PICTURES}
    for name in ("miou_seed1.png", "pseudo_labels_seed0.png", "miou_by_seed_corrected.png"):
        script.draw(name, *rows[name], script.RECORDS, str(tmp_path / "out"), str(tmp_path))
    miou, pseudo_labels, by_seed = kept_figures
    finals = {ln.get_label(): round(ln.get_ydata()[-1], 1) for ln in miou.axes[0].get_lines()}
    assert finals == {"supervised only": 54.8, "threshold 0.95 (UniMatch)": 51.5, "CSL (PCOS + TMP)": 50.3,
                      "CSL, released code's rule": 49.6}
    share, accuracy = pseudo_labels.axes[:2]
    csl = "#0072B2"  # CSL's colour in every report picture
    assert [round(100 * ln.get_ydata()[-1], 1) for ln in share.get_lines() if ln.get_color() == csl] == [66.0, 77.3]
    assert [round(100 * ln.get_ydata()[-1], 1) for ln in accuracy.get_lines() if ln.get_color() == csl] == [97.2]
    seeds = {ln.get_label(): np.round(ln.get_ydata(), 1).tolist() for ln in by_seed.axes[0].get_lines()
             if ln.get_label().startswith("seed")}
    assert seeds == {"seed 0": [50.1, 53.0, 47.7, 48.3], "seed 1": [50.1, 54.8, 51.6, 50.8],
                     "seed 2": [51.2, 52.0, 47.6, 47.5]}
