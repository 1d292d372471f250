"""scripts/camvid_overview.py: the at-a-glance table of docs/results/camvid.md is what the committed records give."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overview():
    path = os.path.join(ROOT, "scripts", "camvid_overview.py")
    spec = importlib.util.spec_from_file_location("camvid_overview", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_table_is_the_records_table(tmp_path):
    overview = _overview()
    finals = overview.load()
    table = overview.table(finals)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()  # regenerated whenever a record changes
    assert "| 1/4, mean | 48.3 | 52.5 | 48.1 | 47.8 | 48.1 | 48.2 | -0.3 |" in table
    # A paired difference is of one split and seed: CSL minus threshold of 1/4 seed 2 from its own records.
    assert abs(finals[("1/4", 2)]["csl"] - finals[("1/4", 2)]["threshold"] - (-1.04)) < 0.01
    path = overview.picture(finals, str(tmp_path / "overview.png"))
    assert os.path.getsize(path) > 10_000


def _oracle():
    path = os.path.join(ROOT, "scripts", "camvid_oracle.py")
    spec = importlib.util.spec_from_file_location("camvid_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_oracle_table_is_the_records_table(tmp_path):
    """The table of "Perfect pseudo-labels" is scripts/camvid_oracle.py's output over the committed records."""
    oracle = _oracle()
    runs = oracle.load()
    table = oracle.table(runs)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()
    assert set(runs) == {0, 1} and {"supervised", "oracle", "threshold"} <= set(runs[0]) <= set(runs[1])
    # The BatchNorm-re-estimated mIoU is the last JSON line of `csl eval --bn-recalibrate 320`'s output.
    assert abs(runs[0]["oracle"]["recalibrated"] - 50.75) < 0.01
    # Seed 0's warm-up kept no records: its one evaluation stands in for them.
    assert runs[0]["warmup"]["miou"] == [oracle.WARMUP_MIOU[0]]
    path = oracle.picture(runs, str(tmp_path / "oracle.png"))
    assert os.path.getsize(path) > 10_000
