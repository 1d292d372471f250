"""The record scripts of scripts/ that take no options answer --help with their description and write nothing (run,
they rewrite their pictures under docs/results/camvid/); an unknown option is a usage error."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

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


def test_camvid_experiment_help_runs_nothing(tmp_path):
    """`bash scripts/camvid_experiment.sh --help` prints its header (with the settings it reads from the environment)
    and exits; any argument is refused, since the experiment (an hour) takes its settings from the environment only.
    SHARED names a folder without the data, so a script that ignored its arguments would stop at that check instead
    of training."""
    script = os.path.join(ROOT, "scripts", "camvid_experiment.sh")
    env = {**os.environ, "SHARED": str(tmp_path / "no-shared")}
    result = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The CamVid experiment of docs/results/camvid.md")
    for setting in ("SHARED", "SEED", "SPLIT", "OUT", "WARMUP", "ITERS", "METHODS"):
        assert setting in result.stdout
    assert result.stderr == "" and not os.listdir(tmp_path)
    bad = subprocess.run(["bash", script, "--seed", "1"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env=env)
    assert bad.returncode == 2
    assert "camvid_experiment: unknown argument --seed" in bad.stderr
