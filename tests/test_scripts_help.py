"""The record scripts of scripts/ that take no options answer --help with their description and write nothing (run,
they rewrite their pictures under docs/results/camvid/); an unknown option is a usage error."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PICTURES = os.path.join(ROOT, "docs", "results", "camvid")


def _picture_times() -> dict[str, int]:
    return {name: os.stat(os.path.join(PICTURES, name)).st_mtime_ns for name in os.listdir(PICTURES)
            if name.endswith(".png")}


@pytest.mark.parametrize("script", ["camvid_confidence.py", "camvid_oracle.py", "camvid_overview.py"])
def test_record_script_help_writes_nothing(script, tmp_path):
    before = _picture_times()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "|" not in result.stdout.splitlines()[0]
    assert _picture_times() == before
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--bogus"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
