"""scripts/gpu_check.sh runs end to end on a machine without a GPU (``--cpu-dry-run``) and leaves its evidence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_dry_run_leaves_summary_and_evidence(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TESTS": "tests/test_metrics.py",
           "GPU_CHECK_TRAIN_OVERRIDES": "data.crop_size=40 model.backbone=resnet18 data.synthetic.num_labeled=4 "
                                        "data.synthetic.num_unlabeled=8 data.synthetic.size=48 train.batch_size=2 "
                                        "data.num_workers=0"}
    packed = tmp_path / "device-out"  # what the device tool brings back: at most 8 files
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--pack", str(packed)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for stage in ("build", "bench_pcos", "bench_ce", "bench_cuda_plain", "auto", "host", "tests", "train_cpu"):
        assert f"| {stage} | 0 |" in summary, summary
    stages = json.loads((out / "stages.json").read_text())  # the same table for scripts
    assert stages["dry_run"] is True and stages["gpu"] == "cpu" and 0 < stages["elapsed_s"] <= stages["budget_s"]
    assert [s["stage"] for s in stages["stages"]][-1] == "train_cpu"
    assert all(s["exit"] == "0" and s["seconds"] >= 0 for s in stages["stages"]), stages
    outcomes = (out / "progress.txt").read_text().splitlines()
    assert outcomes and all(line.startswith(("PASSED", "SKIPPED")) for line in outcomes)
    assert any(line.startswith("PASSED tests/test_metrics.py::") for line in outcomes)
    assert (out / "junit.xml").is_file() and (out / "bench.json").is_file()
    ops = {r["op"] for r in json.loads((out / "bench.json").read_text())["records"]}
    assert ops == {"pcos_weights", "weighted_cross_entropy"}, ops  # the two runs merged
    # the extension again with CSL_CUDA_REGISTER_CLASSES=0: without a GPU its rows say why it did not run
    assert "cuda | unavailable: the cuda backend needs CUDA tensors" in (out / "bench-cuda-plain.log").read_text()
    auto = json.loads((out / "auto.json").read_text())["choices"]
    assert {(c["op"], c["backend"]) for c in auto} == {("pcos_weights", "cpu"), ("weighted_cross_entropy", "cpu")}
    assert all(c["median_ms"] is None for c in auto)  # nothing is timed on CPU; on a GPU both backends' medians
    host_json = json.loads((out / "host.json").read_text())
    assert host_json["environment"]["device"] == "cpu" and host_json["gpu_environment"] is None
    host = host_json["rows"]
    assert any(r["op"] == "pcos_weights" and r["provider"] == "cpu" and r["us_min"] > 0 for r in host)
    assert "| pcos_weights | cpu |" in summary and "on cuda: not measured (no CUDA device)" in summary
    assert (out / "cpp_exceptions.txt").read_text().strip().endswith(")") and "cpp-exceptions: ok" in summary
    assert "done: 6 iterations" in (out / "train.log").read_text()
    # Evidence only: the build folder and the training runs stay outside, no empty hang files are left.
    assert not list(out.rglob("*.so")) and not list(out.rglob("*.pt")) and not list(out.glob("progress.txt.hang-*"))
    # --pack: two files, the final summary and every evidence file in one archive under the folder's name.
    assert sorted(p.name for p in packed.iterdir()) == ["evidence.tgz", "summary.md"]
    assert (packed / "summary.md").read_text() == summary
    with tarfile.open(packed / "evidence.tgz") as tar:
        names = set(tar.getnames())
    assert {f"check/{p.name}" for p in out.iterdir()} <= names, sorted(names)
    assert not [n for n in names if "progress.txt.hang-" in n], sorted(names)  # the empty ones go before the pack


def test_pack_inside_the_evidence_folder_is_refused(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(tmp_path),
                           "--pack", str(tmp_path / "packed")], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "lies inside the evidence folder" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("flag", ["--out", "--pack"])
def test_a_folder_flag_without_its_folder_is_a_usage_error(flag):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", flag], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"gpu_check: {flag} needs a folder", proc.stderr


@pytest.mark.parametrize(("name", "value"), [("GPU_CHECK_TEST_RESERVE_S", "2m"), ("GPU_CHECK_PACK_EVERY_S", "0"),
                                             ("GPU_CHECK_BUDGET_S", "0"), ("GPU_CHECK_BUDGET_S", "9m")])
def test_a_setting_that_is_not_a_number_of_seconds_is_refused_before_any_stage(tmp_path, name, value):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(tmp_path / "check")], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, name: value}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and f"gpu_check: {name} must be a whole number of seconds" in proc.stderr, proc.stderr
    assert f"got '{value}'" in proc.stderr and not (tmp_path / "check").exists()


def _session_processes(sid: int) -> list[int]:
    """The pids of every process in session ``sid`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[3]) == sid:  # after the state: ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _total_seconds(summary: str) -> int:
    """The "Total N s" of a gpu_check summary."""
    return int(summary.split("Total ", 1)[1].split(" s", 1)[0])


def test_a_run_killed_with_sigkill_leaves_a_pack_written_within_its_stage(tmp_path):
    """The device tool may end the check with SIGKILL (no trap runs): the pack is rewritten every
    GPU_CHECK_PACK_EVERY_S seconds within a stage, so what comes back is at most that old."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux /proc to end every process of the check")
    out, packed = tmp_path / "check", tmp_path / "device-out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_PACK_EVERY_S": "2", "TMPDIR": str(tmp_path),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}  # a fresh build: a stage that runs long enough
    proc = subprocess.Popen(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--pack",
                             str(packed)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)

    def packed_total() -> int | None:  # the "Total N s" of the packed summary while the build stage runs
        try:
            text = (packed / "summary.md").read_text()
        except FileNotFoundError:
            return None
        if "| build | running |" not in text:
            return None
        return _total_seconds(text)

    try:
        first = total = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            total = packed_total()
            if total is not None and first is None:
                first = total
            if first is not None and total is not None and total >= first + 4:
                break  # two rewrites within the stage
            time.sleep(0.2)
        assert proc.poll() is None, f"the check ended before the test could kill it: {proc.stderr.read()[-2000:]}"
        assert first is not None and total is not None and total >= first + 4, (
            f"the pack was not rewritten within the build stage (Total {first} s, then {total} s)")
    finally:
        for _ in range(50):  # SIGKILL to the script and everything it started (the probe's compilers too)
            left = _session_processes(proc.pid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not _session_processes(proc.pid)
    # What the device tool would bring back: a whole archive and the summary of a stage still running.
    assert sorted(p.name for p in packed.iterdir()) == ["evidence.tgz", "summary.md"]
    with tarfile.open(packed / "evidence.tgz") as tar:
        names = set(tar.getnames())
        summary = tar.extractfile("check/summary.md").read().decode()
    assert {"check/env.txt", "check/build.log", "check/summary.md"} <= names, sorted(names)
    assert "| build | running |" in summary and _total_seconds(summary) >= first + 2


def test_the_cpp_error_path_marker_names_the_tests_gpu_check_leaves_out_after_a_crash():
    """Where a TORCH_CHECK failure crashes the process, scripts/gpu_check.sh deselects ``-m "not cpp_error_path"``:
    the marker is on the tests that make csl's extension raise, and on the cpu case alone of a test over backends."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
                           "-m", "cpp_error_path", "tests/test_ext.py", "tests/test_weighted_cross_entropy.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    marked = {line for line in proc.stdout.splitlines() if "::" in line}
    assert marked == {"tests/test_ext.py::test_confusion_matrix_edge_cases",
                      "tests/test_ext.py::test_clear_errors_from_the_cpp_checks",
                      "tests/test_weighted_cross_entropy.py::test_used_pixel_with_out_of_range_label[cpu]"}, marked
    assert '-m "not cpp_error_path"' in (ROOT / "scripts" / "gpu_check.sh").read_text()


def test_every_test_gpu_check_deselects_exists():
    """pytest ignores a --deselect that names no test: a renamed test would run on the GPU machine unnoticed."""
    import re

    named = re.findall(r"--deselect\s+\"?(tests/[^\s\")]+)", (ROOT / "scripts" / "gpu_check.sh").read_text())
    assert named, "gpu_check.sh deselects no test by name"
    files = sorted({n.split("::")[0] for n in named})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    collected = set(proc.stdout.split())
    assert not [n for n in named if n not in collected], (named, sorted(collected))


def test_cpp_exception_probe_past_its_limit_says_not_known():
    # Starting the child's Python alone takes longer than 0.2 s: the time-out path, without a build.
    proc = subprocess.run([sys.executable, "scripts/cpp_exception_probe.py", "--limit", "0.2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "cpp-exceptions: not known (the probe ran past its 0.2 s limit)"


def test_help_prints_the_header_comment_only():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].startswith("One command that checks a GPU machine end to end")
    assert "--cpu-dry-run" in proc.stdout and not any(line.startswith(("set ", "cd ", "#")) for line in lines)


def test_cpp_exception_probe_variants_tell_csl_from_the_machine():
    """The variants a GPU check runs (more builds, a CPU-only build of csl among them): on this machine every case
    raises, csl's own error path included, each on its own line after the minimal probe's."""
    proc = subprocess.run([sys.executable, "scripts/cpp_exception_probe.py", "--variants"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[0] == "cpp-exceptions: ok (raised: probe: expected failure)"
    names = ["csl-flags", "parallel-for", "message-args", "csl-loaded", "csl-error-path", "csl-cpu-only"]
    assert [line.split(":")[0] for line in lines[1:]] == [f"variant {name}" for name in names], lines
    assert "expected failure in a parallel region" in lines[2]
    assert "expected failure with arguments, got [1] of Float on cpu" in lines[3]
    for line in lines[5:7]:
        assert "csl::weighted_cross_entropy: label 7 of a used pixel is outside [0, 3)" in line
    assert all(": ok (raised: " in line for line in lines[1:]), lines


def test_cpp_exception_probe_reports_a_crash_with_its_native_stack(tmp_path):
    """A child that dies of SIGSEGV: its outcome names the faulting address and the native stack down to the faulting
    function (symbolized where addr2line runs), then faulthandler's Python stack."""
    probe = load_script("cpp_exception_probe")
    reporter, why_not = probe.build_reporter(str(tmp_path))
    assert reporter, why_not
    crash = "import faulthandler; faulthandler.enable()\n" + probe.PRELUDE + "import ctypes\nctypes.string_at(0)\n"
    child = probe.start(crash, [], cuda_hidden=True, env={"CSL_PROBE_REPORTER": reporter})
    what, status = probe.outcome(child, 120)
    assert status == 1 and what.startswith("CRASH (SIGSEGV) at address (nil); native stack:\n"), what
    frames = [line.strip() for line in what.splitlines()[1:] if line.startswith("    #")]
    assert frames[0].startswith("#0 crash_reporter.so +0x") and " report" in frames[0], frames
    assert any(frame.split()[1].startswith("_ctypes") for frame in frames), frames  # string_at's own library
    assert "Fatal Python error: Segmentation fault" in what and "in string_at" in what, what


def test_cpp_exception_probe_without_the_reporter_keeps_faulthandlers_report():
    probe = load_script("cpp_exception_probe")
    child = probe.start("import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)", [],
                        cuda_hidden=True, env={"CSL_PROBE_REPORTER": ""})
    what, status = probe.outcome(child, 120)
    assert status == 1 and what.startswith("CRASH (SIGSEGV):\n    Fatal Python error: Segmentation fault"), what
    assert "Extension modules" not in what and "in <module>" in what


def test_cpp_exception_probe_says_why_it_has_no_crash_reporter(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    reporter, why_not = load_script("cpp_exception_probe").build_reporter(str(tmp_path))
    assert reporter is None and "no-such-compiler did not run" in why_not


def _gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_cpp_exception_probe_children_share_one_deadline_and_stop_together(tmp_path):
    """``--limit`` bounds the whole probe: a child is waited for only until the probe's deadline; on SIGTERM every
    child still running goes with its process group (a variant's build and its compilers)."""
    probe = load_script("cpp_exception_probe")
    # A child that starts a grandchild (as a build starts its compilers) and writes the grandchild's pid.
    sleeper = ("import subprocess, sys, time\n"
               "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
               "open(sys.argv[1], 'w').write(str(g.pid)); time.sleep(120)\n")
    late = probe.start(sleeper, [str(tmp_path / "late")], cuda_hidden=True)
    t0 = time.monotonic()
    what, status = probe.outcome(late, 100, deadline=t0 + 1)
    assert (what, status) == ("not known (the probe ran past its 100 s limit)", 3) and time.monotonic() - t0 < 30
    with pytest.raises(RuntimeError, match="did not build or load within the probe's limit"):
        probe.csl_library(time.monotonic() + 0.2)  # starting Python and torch alone takes longer
    children = [probe.start(sleeper, [str(tmp_path / str(i))], cuda_hidden=True) for i in range(2)]
    for i in range(2):
        for _ in range(600):
            if (tmp_path / str(i)).exists() and (tmp_path / str(i)).read_text():
                break
            time.sleep(0.1)
    probe.stop_children()
    for i, child in enumerate(children):
        assert child.wait(timeout=30) == -signal.SIGKILL
        grandchild = int((tmp_path / str(i)).read_text())
        for _ in range(300):
            if _gone_or_zombie(grandchild):
                break
            time.sleep(0.1)
        assert _gone_or_zombie(grandchild), f"the child's own child {grandchild} still runs"
    probe.stop_children()  # nothing left running: no error
