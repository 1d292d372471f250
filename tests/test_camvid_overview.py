"""scripts/camvid_overview.py and scripts/camvid_oracle.py: the tables of docs/results/camvid.md are what the committed
records give."""

from __future__ import annotations

import os

from conftest import load_script

from csl.logging_utils import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_documented_table_is_the_records_table(tmp_path):
    overview = load_script("camvid_overview")
    finals = overview.load()
    table = overview.table(finals)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()  # regenerated whenever a record changes
    assert "| 1/4, mean | 48.3 | 52.5 | 48.1 | 47.8 | 48.1 | 48.2 | -0.3 |" in table
    # A paired difference is of one split and seed: CSL minus threshold of 1/4 seed 2 from its own records.
    assert abs(finals[("1/4", 2)]["csl"] - finals[("1/4", 2)]["threshold"] - (-1.04)) < 0.01
    path = overview.picture(finals, str(tmp_path / "overview.png"))
    assert os.path.getsize(path) > 10_000


def test_the_documented_oracle_table_is_the_records_table(tmp_path):
    """The table of "Perfect pseudo-labels" is scripts/camvid_oracle.py's output over the committed records."""
    oracle = load_script("camvid_oracle")
    runs = oracle.load()
    table = oracle.table(runs)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()
    seed0, seed1, seed2 = runs["1/8", 0, ""], runs["1/8", 1, ""], runs["1/8", 2, ""]
    assert {("1/8", 0, ""), ("1/8", 1, ""), ("1/8", 2, "")} <= set(runs)
    assert {"supervised", "oracle", "threshold"} <= set(seed0) <= set(seed1)
    assert set(seed2) == {"warmup", "supervised", "oracle", "threshold", "csl"}
    assert abs(seed2["oracle"]["miou"][-1] - seed2["threshold"]["miou"][-1] - 2.27) < 0.01
    assert set(runs["1/4", 0, ""]) == {"warmup", "supervised", "oracle", "threshold", "csl"}
    assert abs(runs["1/4", 0, ""]["csl"]["miou"][-1] - runs["1/4", 0, ""]["threshold"]["miou"][-1]) < 0.01  # level
    seed1 = runs["1/4", 1, ""]  # its CSL stage stopped for time
    assert set(seed1) == {"warmup", "supervised", "oracle", "threshold"}
    assert abs(seed1["oracle"]["miou"][-1] - seed1["threshold"]["miou"][-1] - 4.19) < 0.01
    assert abs(runs["1/4", 0, ""]["oracle"]["miou"][-1] - runs["1/4", 0, ""]["threshold"]["miou"][-1] - 1.82) < 0.01
    # Beside the committed 1/4 seed 1 runs (their warm-up, repeated bit for bit): continuations read from their folder.
    amd = runs["1/4", 1, "AMD EPYC"]
    assert {"warmup", "supervised", "oracle", "threshold", "csl"} <= set(amd)
    assert amd["threshold"]["miou"] == [100 * r["miou"] for r in read_metrics(
        os.path.join(ROOT, "docs", "results", "camvid", "1_4_seed1", "metrics_threshold.jsonl"), "eval")]
    assert abs(amd["oracle"]["miou"][-1] - amd["threshold"]["miou"][-1] - 3.74) < 0.01
    assert abs(amd["oracle"]["miou"][-1] - amd["csl"]["miou"][-1] - 3.47) < 0.01
    assert abs(amd["oracle"]["crops"] - 51.83) < 0.01 and amd["threshold"]["crops"] is None
    amd2 = runs["1/4", 2, "AMD EPYC"]
    assert abs(amd2["oracle"]["miou"][-1] - amd2["threshold"]["miou"][-1] - 3.04) < 0.01
    assert abs(amd2["csl"]["miou"][-1] - amd2["threshold"]["miou"][-1] - (-1.05)) < 0.01
    # A BatchNorm-re-estimated mIoU is the last JSON line of `csl eval --bn-recalibrate 320`'s output.
    assert abs(seed0["oracle"]["frames"] - 50.75) < 0.01
    # Seed 0's warm-up kept no records: its one evaluation stands in for them.
    assert seed0["warmup"]["miou"] == [oracle.WARMUP_MIOU["seed0_oracle"]]
    path = oracle.picture(runs, str(tmp_path / "oracle.png"))
    assert os.path.getsize(path) > 10_000


def test_the_documented_confidence_table_is_the_records_table(tmp_path):
    """"When does the confidence fail?": the table is scripts/camvid_confidence.py's over the committed records, and
    its figures are the analyses' own numbers."""
    import json

    script = load_script("camvid_confidence")
    rows, short, curve = script.load()
    table = script.table(rows, short)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()
    assert [r["iter"] for r in rows] == [0, 400, 1000, 2000, 3000, 4000] and short["iter"] == 600
    folder = os.path.join(ROOT, "docs", "results", "camvid", "1_4_seed2_long_supervised")
    assert curve[-1][0] == 4000 and abs(curve[-1][1] - 59.43) < 0.01
    with open(os.path.join(folder, "analysis_iter4000.json")) as f:
        last = json.load(f)
    assert last["checkpoint_iteration"] == 4000
    gap = last["csl"]["weighted"]["accuracy"] - last["confidence_per_image_at_csl_share"]["accuracy"]
    assert abs(rows[-1]["csl_minus_conf"] - 100 * gap) < 1e-9 and -0.3 < 100 * gap < -0.1
    # the confidently wrong pixels: the 0.95 threshold keeps 6.3 % of the warm-up model's errors, 9.7 % at the end
    assert round(rows[0]["wrong_kept"], 1) == 6.3 and round(rows[-1]["wrong_kept"], 1) == 9.7
    path = script.picture(rows, curve, str(tmp_path / "confidence.png"))
    assert os.path.getsize(path) > 10_000
    # The comparison again from the iteration-4000 model: its table too is the records'.
    runs = script.load_continuations()
    assert set(runs) == {(method, seed) for method in ("supervised", "threshold", "csl") for seed in (2, 3, 4)}
    assert all(r["iters"] == [100, 200, 300, 400, 500, 600] for r in runs.values())
    # supervised only from the same model ends 2.4-3.0 points above both selections on every seed, CSL level with
    # the threshold (+0.1, +0.6, +0.3)
    gaps = [runs["supervised", seed]["miou"][-1] - runs[method, seed]["miou"][-1]
            for seed in (2, 3, 4) for method in ("threshold", "csl")]
    assert [round(g, 1) for g in gaps] == [2.7, 2.6, 3.0, 2.4, 2.9, 2.5]
    assert [round(runs["csl", seed]["miou"][-1] - runs["threshold", seed]["miou"][-1], 1) for seed in (2, 3, 4)] == [
        0.1, 0.6, 0.3]
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert script.continuation_table(runs, rows[-1]["miou"]) in f.read()
    path = script.continuation_picture(runs, rows[-1]["miou"], str(tmp_path / "from4000.png"))
    assert os.path.getsize(path) > 10_000
