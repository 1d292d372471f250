"""csl analyze: selection quality numbers by hand, and the command on a tiny synthetic run (JSON + pictures)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from csl.analyze import selection_quality, summarize
from csl.cli import main

TINY = ["data.crop_size=40", "data.num_workers=0", "data.synthetic.num_labeled=4", "data.synthetic.num_unlabeled=6",
        "data.synthetic.num_val=2", "data.synthetic.size=48", "train.batch_size=2", "train.progress=false",
        "tmp.block=16"]


def test_selection_quality_by_hand():
    pred = np.array([0, 0, 1, 1, 2])
    target = np.array([0, 1, 1, 1, 0])
    correct = pred == target  # T F T T F
    q = selection_quality(np.array([1, 1, 0, 1, 0.0]), correct, pred, target, 3)
    assert q["share"] == pytest.approx(3 / 5)
    assert q["accuracy"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["per_class"]["share"] == pytest.approx([1.0, 0.5, 0.0])
    assert q["per_class"]["accuracy"][:2] == pytest.approx([0.5, 1.0]) and q["per_class"]["accuracy"][2] is None
    assert q["per_class"]["recall"][:2] == pytest.approx([1.0, 0.5]) and q["per_class"]["recall"][2] is None
    soft = selection_quality(np.array([0.5, 1, 0, 0, 0.0]), correct, pred, target, 3)
    assert soft["share"] == pytest.approx(1.5 / 5) and soft["accuracy"] == pytest.approx(0.5 / 1.5)
    assert soft["recall"] == pytest.approx(0.5 / 3)


def test_summarize_sweeps_and_matched_share():
    rng = np.random.default_rng(0)
    n = 2000
    conf = rng.uniform(0.3, 1, n).astype(np.float32)
    target = rng.integers(0, 3, n)
    pred = np.where(rng.uniform(size=n) < conf, target, (target + 1) % 3)  # confident pixels are more often right
    arrays = {"conf": conf, "dispersion": -rng.uniform(size=n), "entropy": 1 - conf, "margin": conf - 0.3,
              "w_csl": np.where(conf > 0.6, 1.0, conf), "w_class": (conf > 0.7).astype(np.float32),
              "w_released": np.where(conf > 0.5, 1.0, 0.0), "pred": pred, "target": target}
    r = summarize(arrays, 3, taus=(0.5, 0.9), shares=(0.5,))
    assert [t["tau"] for t in r["threshold"]] == [0.5, 0.9]
    assert r["threshold"][1]["share"] < r["threshold"][0]["share"]
    assert r["threshold"][1]["accuracy"] > r["threshold"][0]["accuracy"] > r["all_pixels"]["accuracy"]
    assert r["sweeps"]["entropy"][0]["share"] == pytest.approx(0.5, abs=0.01)
    # entropy = 1 - conf and margin = conf - 0.3 rank the pixels as confidence does: same selection at a share
    for name in ("entropy", "margin"):
        assert r["at_csl_share"][name]["accuracy"] == pytest.approx(r["at_csl_share"]["confidence"]["accuracy"])
    assert r["at_csl_share"]["confidence"]["share"] == pytest.approx(r["csl"]["weighted"]["share"], abs=0.01)
    assert r["csl"]["hard"]["share"] == pytest.approx((conf > 0.6).mean())
    assert r["csl_released"]["hard"]["share"] == pytest.approx((conf > 0.5).mean())
    assert r["confidence_at_released_share"]["share"] == pytest.approx((conf > 0.5).mean(), abs=0.01)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze_run")
    assert main(["train", "--config", "demo", *TINY, "train.iters=2", "train.iters_per_epoch=2",
                 f"output_dir={out}"]) == 0
    return out / "latest.pt"


def test_analyze_command_writes_json_and_pictures(checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--max-images", "3",
                 "--panels", "2"]) == 0
    printed = capsys.readouterr().out
    assert "threshold 0.95" in printed and "CSL reliable" in printed
    with open(out / "analysis.json") as f:
        r = json.load(f)
    assert r["images"] == 3 and r["split"] == "unlabeled" and r["valid_pixels"] == 3 * 48 * 48
    assert len(r["threshold"]) == 9 and {t["tau"] for t in r["threshold"]} >= {0.5, 0.95, 0.99}
    for rule in ("csl", "csl_class"):
        for kind in ("hard", "weighted"):
            q = r[rule][kind]
            assert 0 <= q["share"] <= 1 and len(q["per_class"]["recall"]) == r["num_classes"] == 4
    assert set(r["sweeps"]) == {"entropy", "margin"} and set(r["at_csl_share"]) == {"confidence", "entropy",
                                                                                       "margin"}
    assert r["all_pixels"]["share"] == 1 and r["all_pixels"]["accuracy"] == pytest.approx(r["model_accuracy"])
    names = {os.path.basename(p) for p in r["pictures"]}
    assert names == {"accuracy_recall.png", "per_class.png", "feature_plane.png", "panels.png"}
    for name in names:
        assert (out / name).stat().st_size > 5000
    # the validation images instead
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "val"), "--split", "val",
                 "--panels", "0"]) == 0
    with open(tmp_path / "val" / "analysis.json") as f:
        assert json.load(f)["images"] == 2


def test_eval_refuses_a_class_count_mismatch(checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "data.num_classes=5"]) == 2
    assert "predicts 4 classes but data.num_classes is 5" in capsys.readouterr().err
