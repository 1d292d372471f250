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
