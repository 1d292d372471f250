"""scripts/gpu_check.sh runs end to end on a machine without a GPU (``--cpu-dry-run``) and leaves its evidence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, load_script


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
    repo, env = _fake_checkout(tmp_path)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(tmp_path / "check"),
                           "--pack", str(tmp_path / "check" / "packed")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "lies inside the evidence folder" in proc.stderr, proc.stdout + proc.stderr
    assert list(_fake_calls(tmp_path)) == ["env"]


def test_an_earlier_checks_evidence_folder_is_refused(tmp_path):
    """Results left by an earlier check in the same --out (a benchmark's JSON, junit.xml, a hang file) would be
    merged, packed and summarised as this check's where its own stage failed or was skipped."""
    repo, env = _fake_checkout(tmp_path)
    out = tmp_path / "check"
    out.mkdir()
    (out / "summary.md").write_text("# GPU check (an earlier one)\n")
    (out / "bench-ce.json").write_text("{}")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == f"gpu_check: {out} holds an earlier check's evidence (summary.md); name a new folder\n"
    assert list(_fake_calls(tmp_path)) == ["env"] and sorted(p.name for p in out.iterdir()) == [
        "bench-ce.json", "summary.md"]


@pytest.mark.parametrize("flag", ["--out", "--pack"])
def test_a_folder_flag_without_its_folder_is_a_usage_error(flag):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", flag], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"gpu_check: {flag} needs a folder", proc.stderr


@pytest.mark.parametrize(("name", "value"), [("GPU_CHECK_TEST_RESERVE_S", "2m"), ("GPU_CHECK_PACK_EVERY_S", "0"),
                                             ("GPU_CHECK_BUDGET_S", "0"), ("GPU_CHECK_BUDGET_S", "9m"),
                                             ("GPU_CHECK_PROBE_LIMIT_S", "0")])
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
    failing = tmp_path / "failing-cc"  # a compiler that runs and fails
    failing.write_text("#!/bin/sh\necho 'crash_reporter.c: error: no backtrace here' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    reporter, why_not = load_script("cpp_exception_probe").build_reporter(str(tmp_path))
    assert (reporter, why_not) == (None, f"{failing} failed: crash_reporter.c: error: no backtrace here")


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


FAKE_PYTHON = r'''
"""Stands in for the interpreter gpu_check.sh runs: names the stage from its arguments, records the call in
$FAKE_LOG (one JSON line: stage, argv, the environment the script sets) and does what FAKE_<STAGE> says:
"" ok (its --out / --junitxml file written), "exit N" that status, "hang" / "hang-ignoring-term" sleep.
FAKE_IMPORT: "ok" every module the script looks for is there, else the names of those that are (space-separated)."""
import json, os, signal, sys, time

args = sys.argv[1:]
code = args[1] if args[:1] == ["-c"] else ""
module = args[1] if args[:1] == ["-m"] else ""
if "import re, sys, torch, triton" in code:
    stage = "env"
elif code.startswith("import ") and len(code.split()) == 2:
    stage = "import"
elif "unavailable_reason" in code:
    stage = "build"
elif args[:1] == ["scripts/cpp_exception_probe.py"]:
    stage = "probe"
elif module == "csl_bench":
    stage = ("merge" if "--merge" in args else "bench_cuda_plain" if "--providers" in args
             else "bench_pcos" if "pcos_weights" in args else "bench_ce")
else:
    stage = {"csl_bench.bench_auto_choice": "auto", "csl_bench.bench_host_overhead": "host", "pytest": "tests",
             "csl": "train"}.get(module, "unknown")
keys = ("CSL_EXT_CUDA", "CSL_REQUIRE_BACKENDS", "CSL_TEST_PROGRESS", "CSL_TRITON_AUTOTUNE", "TRITON_INTERPRET",
        "CSL_CUDA_REGISTER_CLASSES", "MAX_JOBS", "CSL_BUILD_VERBOSE", "TORCH_CUDA_ARCH_LIST")
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"stage": stage, "argv": args, "env": {k: os.environ.get(k) for k in keys}}) + "\n")
what = os.environ.get("FAKE_" + stage.upper(), "")
if stage == "env":
    if what == "hang":  # a driver that does not answer
        time.sleep(600)
    if what.startswith("exit"):  # its line printed, then a failure (at exit, say)
        print("GPU=cpu")
        print("ModuleNotFoundError: No module named 'torch'", file=sys.stderr)
        sys.exit(int(what.split()[1]))
    print("GPU=" + (what or "cpu"))
    print("python 3.12.0\ntorch 2.11.0 cuda 13.0\ntriton 3.6.0")
    if what:
        print("HALF=" + os.environ.get("FAKE_HALF", "bf16"))
    sys.exit(0)
if stage == "import":  # pytest-xdist, pytest-timeout: there with FAKE_IMPORT=ok or naming them
    sys.exit(0 if what == "ok" or code.split()[1] in what.split() else 1)
print(os.environ.get("FAKE_" + stage.upper() + "_TEXT", stage + " ran"), flush=True)
if stage == "build" and os.environ.get("FAKE_BUILD_LOG"):
    folder = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "csl_fake")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "build.log"), "w") as f:
        f.write(os.environ["FAKE_BUILD_LOG"])
    open(os.path.join(folder, "lock"), "w").close()
if stage == "tests":  # as conftest.py writes them: outcomes, an empty hang file per process that exited
    progress = os.environ["CSL_TEST_PROGRESS"]
    with open(progress, "a") as f:
        f.write("PASSED tests/test_fake.py::test_one 0.01s\n")
    open(progress + ".hang-main", "w").close()
    if os.environ.get("FAKE_TESTS_HANG"):
        with open(progress + ".hang-gw0", "w") as f:
            f.write(os.environ["FAKE_TESTS_HANG"])
for flag in ("--out", "--junitxml"):
    if flag in args and stage != "train" and not what:  # a stage that fails or hangs writes no results
        with open(args[args.index(flag) + 1], "w") as f:
            json.dump({"stage": stage, "records": [{"op": stage}]}, f)
def stopped(signum, frame):
    print(stage, "stopped by SIGTERM", flush=True)
    sys.exit(143)


if what.startswith("hang"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN if what == "hang-ignoring-term" else stopped)
    time.sleep(600)
sys.exit(int(what.split()[1]) if what.startswith("exit") else 0)
'''


def _fake_checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git checkout with scripts/gpu_check.sh and a few test files, and the environment of a run whose interpreter
    is FAKE_PYTHON: the script's whole flow in seconds, without torch, as on a GPU machine where FAKE_ENV names one."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_check.sh", repo / "scripts")
    (repo / "tests").mkdir()
    for name in ("test_zoo.py", "test_gpu.py", "test_triton_compile.py", "test_metrics.py"):
        (repo / "tests" / name).write_text("")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "checked"]):
        subprocess.run([*git, *command], check=True, capture_output=True)
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    fake.chmod(0o755)
    # The caller's settings are not the GPU machine's (.ci/run exports TORCH_CUDA_ARCH_LIST=9.0, for one)
    settings = ("FAKE_", "GPU_CHECK_", "CSL_", "TRITON_", "TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(settings) and k != "OUT"}
    env.update(PYTHON=str(fake), FAKE_LOG=str(tmp_path / "calls.jsonl"), TMPDIR=str(tmp_path))
    return repo, env


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _fake_calls(tmp_path: Path) -> dict[str, list[dict]]:
    """FAKE_PYTHON's calls by stage."""
    calls: dict[str, list[dict]] = {}
    for line in (tmp_path / "calls.jsonl").read_text().splitlines():
        call = json.loads(line)
        calls.setdefault(call["stage"], []).append(call)
    return calls


def _stage_exits(out: Path) -> dict[str, str]:
    return {s["stage"]: s["exit"] for s in json.loads((out / "stages.json").read_text())["stages"]}


def _limit(log: Path) -> int:
    """The time limit a stage ran under, from its log's "== NAME (limit Ns)" line."""
    return int(log.read_text().split("(limit ", 1)[1].split("s)", 1)[0])


GPU_STAGES = ["build", "bench_pcos", "bench_ce", "bench_cuda_plain", "auto", "host", "tests", "train_auto"]


def test_an_unknown_argument_is_a_usage_error():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--outt", "x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "gpu_check: unknown argument --outt\n", proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(("fake_env", "args", "message"), [
    ("", [], "gpu_check: no CUDA device visible to "),
    ("exit 1", ["--cpu-dry-run"], "cannot import torch / triton (exit 1): ModuleNotFoundError: No module named 'tor"),
])
def test_without_a_gpu_or_torch_no_stage_runs(tmp_path, fake_env, args, message):
    repo, env = _fake_checkout(tmp_path)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", *args, "--out", str(tmp_path / "check")], cwd=repo,
                          env={**env, "FAKE_ENV": fake_env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert list(_fake_calls(tmp_path)) == ["env"] and not (tmp_path / "check").exists()


def test_a_gpu_run_packs_every_stage_into_the_device_tools_folder(tmp_path):
    """On a GPU (FAKE_ENV names one) with $OUT set by the device tool and no option: every stage in order, each given
    what the GPU run needs, the evidence in gpu-check/<date>-<GPU> and packed into $OUT, exit 0."""
    repo, env = _fake_checkout(tmp_path)
    device_out = tmp_path / "device-out"
    env.update(FAKE_ENV="NVIDIA-H100", FAKE_IMPORT="ok", OUT=str(device_out), GPU_CHECK_BUDGET_S="300")
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    [out] = (repo / "gpu-check").iterdir()
    assert out.name.endswith("-NVIDIA-H100")
    assert list(_stage_exits(out).items()) == [(stage, "0") for stage in GPU_STAGES]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (NVIDIA-H100), ") and proc.stdout.endswith(summary)
    # Which code was measured: the commit, a tree without changes (the check's own gpu-check/ folder is not one)
    head = _git(repo, "rev-parse", "HEAD")
    assert f"\nMeasured: commit {head[:12]}, tree clean; code hash " in summary, summary
    assert f"\ncommit {head}\ntree clean\ncode hash " in (out / "env.txt").read_text()
    stages = json.loads((out / "stages.json").read_text())
    assert (stages["commit"], stages["tree_clean"]) == (head, True)
    assert sorted(p.name for p in device_out.iterdir()) == ["evidence.tgz", "summary.md"]
    assert (device_out / "summary.md").read_text() == summary
    with tarfile.open(device_out / "evidence.tgz") as tar:
        assert {f"{out.name}/{p.name}" for p in out.iterdir()} <= set(tar.getnames())
    # The stages before the tests leave GPU_CHECK_TEST_RESERVE_S (200 s) of the 300 s; the tests get the rest but 70 s.
    assert 60 <= _limit(out / "build.log") <= 90 and 200 <= _limit(out / "pytest.log") <= 230
    calls = _fake_calls(tmp_path)
    [probe] = calls["probe"]
    assert probe["argv"][1:] == ["--variants", "--limit", "300"] and probe["env"]["MAX_JOBS"] == "4"
    assert calls["build"][0]["env"]["CSL_BUILD_VERBOSE"] == "1" and "'cuda'" in calls["build"][0]["argv"][1]
    # built for the GPU it runs on (csl_kernels' choice when the caller names no architectures), not a fixed sm_90
    assert {call["env"]["TORCH_CUDA_ARCH_LIST"] for calls_of in calls.values() for call in calls_of} == {None}
    assert all(call["env"]["CSL_EXT_CUDA"] is None for stage in GPU_STAGES[1:] for call in calls.get(stage, []))
    assert calls["merge"][0]["argv"][2:] == ["--merge", f"{out}/bench-pcos.json", f"{out}/bench-ce.json", "--out",
                                            f"{out}/bench.json", "--overwrite"]
    assert calls["bench_cuda_plain"][0]["env"]["CSL_CUDA_REGISTER_CLASSES"] == "0"
    for stage in ("bench_pcos", "bench_ce", "bench_cuda_plain"):
        bench_argv = calls[stage][0]["argv"]
        assert bench_argv[bench_argv.index("--dtypes"):][:3] == ["--dtypes", "bf16", "fp32"], bench_argv
    assert "HALF=" not in (out / "env.txt").read_text() and "native bfloat16" not in summary
    assert {calls[s][0]["env"]["CSL_TRITON_AUTOTUNE"] for s in ("bench_pcos", "bench_ce", "auto")} == {"1"}
    [tests] = calls["tests"]
    assert tests["env"]["CSL_REQUIRE_BACKENDS"] == "triton,cuda" and tests["env"]["TRITON_INTERPRET"] is None
    assert tests["env"]["CSL_TEST_PROGRESS"] == f"{out}/progress.txt"
    argv = tests["argv"]
    assert argv[argv.index("-n") + 1] == "14" and "-m" not in argv[2:]
    assert argv[argv.index("--timeout") + 1:argv.index("--timeout") + 4] == ["120", "--timeout-method", "thread"]
    # GPU tests first, the sm_90 compile check left out, the dry-run tests deselected by name
    files = [a for a in argv if a.startswith("tests/test_") and a.endswith(".py")]
    assert files[0] == "tests/test_gpu.py" and files[-2:] == ["tests/test_metrics.py", "tests/test_zoo.py"], files
    assert len(set(files)) == len(files) and "tests/test_triton_compile.py" not in files
    assert sum(a == "--deselect" for a in argv) == 3
    assert "Outcomes:       1 PASSED" in summary and (out / "junit.xml").is_file()
    [train] = calls["train"]
    assert {"device=cuda", "train.amp=auto", "kernels.backend=auto"} <= set(train["argv"])
    assert train["env"]["CSL_REQUIRE_BACKENDS"] is None and "train ran" in (out / "train.log").read_text()
    assert not list(tmp_path.glob("csl-gpu-check.*")), "the work folder (build, training runs) is left behind"
    assert not list(out.glob("progress.txt.hang-*")), "empty hang files are left"


def test_a_cpu_dry_run_runs_each_stage_on_the_cpu(tmp_path):
    """--cpu-dry-run: the CPU part of the extension alone (also where the caller asks for CUDA), the probe without its
    variants, the benchmark's CPU smoke suite, the tests of the CPU backends under Triton's interpreter on one process,
    CPU training steps; the default budget 3000 s."""
    repo, env = _fake_checkout(tmp_path)
    out = tmp_path / "check"
    env.update(CSL_EXT_CUDA="1", FAKE_IMPORT="ok")
    (repo / "packs").mkdir()
    (repo / "packs" / "earlier.tgz").write_text("")  # the pack folder's content is no change to the tree
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--pack", "packs"],
                          cwd=repo, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert json.loads((out / "stages.json").read_text())["tree_clean"] is True
    assert list(_stage_exits(out)) == [*GPU_STAGES[:-1], "train_cpu"]
    assert json.loads((out / "stages.json").read_text())["budget_s"] == 3000
    assert (out / "summary.md").read_text().startswith("# GPU check (cpu), ") and ", CPU dry run\n" in proc.stdout
    calls = _fake_calls(tmp_path)
    stages = ("build", "probe", *GPU_STAGES[1:-1], "train")
    assert {call["env"]["CSL_EXT_CUDA"] for stage in stages for call in calls[stage]} == {"0"}
    assert calls["probe"][0]["argv"][1:] == ["--limit", "420"] and "'cpu'" in calls["build"][0]["argv"][1]
    assert all(c["argv"][2:6] == ["--device", "cpu", "--smoke", "--skip-train"] for c in calls["bench_pcos"])
    argv = calls["host"][0]["argv"]
    assert argv[argv.index("--workers") + 1:argv.index("--worker-timeout")] == ["cpu", "baseline", "gpu"]
    [tests] = calls["tests"]
    assert tests["env"]["CSL_REQUIRE_BACKENDS"] == "cpu,triton" and tests["env"]["TRITON_INTERPRET"] == "1"
    assert tests["argv"][-2:] == ["tests/test_pcos_weights.py", "tests/test_metrics.py"]
    assert "-n" not in tests["argv"] and "--deselect" not in tests["argv"] and "--timeout" in tests["argv"]
    [train] = calls["train"]
    assert {"device=cpu", "train.amp=fp32", "kernels.backend=cpu"} <= set(train["argv"])
    assert train["env"]["TRITON_INTERPRET"] is None


def test_a_failed_stage_is_reported_the_later_stages_run_and_the_check_exits_1(tmp_path):
    """A CUDA part that did not build (its log kept, the later stages on CSL_EXT_CUDA=0), a failed benchmark (the
    other op's results merged alone), a crash of csl's error path (its tests deselected): the check goes on to the
    end, names each in the summary and exits 1."""
    repo, env = _fake_checkout(tmp_path)
    out = tmp_path / "check"
    (repo / "tests" / "test_zoo.py").write_text("# changed\n")
    (repo / "notes.txt").write_text("not committed\n")
    env.update(GPU_CHECK_TESTS="tests/test_zoo.py tests/test_metrics.py")  # a short list on a GPU too
    env.update(FAKE_TESTS_HANG="Thread 0x7f (most recent call first):")  # a worker that did not exit
    env.update(FAKE_ENV="NVIDIA-H200", FAKE_BUILD="exit 1", FAKE_BENCH_CE="exit 1", FAKE_BUILD_LOG="nvcc: error X",
               FAKE_BUILD_TEXT="extension: the CUDA part failed, building the CPU part alone",
               FAKE_PROBE_TEXT="cpp-exceptions: ok\nvariant csl-error-path: CRASH (SIGSEGV)", GPU_CHECK_BUDGET_S="300")
    # --out relative to the folder the check is started from
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--out", "check"], cwd=tmp_path, env=env,
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    exits = _stage_exits(out)
    assert list(exits) == GPU_STAGES and {s for s, e in exits.items() if e != "0"} == {"build", "bench_ce"}, exits
    summary = (out / "summary.md").read_text()
    assert "| build | 1 |" in summary and "| bench_ce | 1 |" in summary
    assert (out / "build-csl_fake.log").read_text() == "nvcc: error X"
    assert "CUDA part did not build" in summary and "Deselected: the tests marked cpp_error_path" in summary
    calls = _fake_calls(tmp_path)
    assert {call["env"]["CSL_EXT_CUDA"] for stage in GPU_STAGES[1:] for call in calls[stage.split("_auto")[0]]} == {"0"}
    assert calls["merge"][0]["argv"][3:4] == [f"{out}/bench-pcos.json"] and len(calls["merge"][0]["argv"]) == 7
    argv = calls["tests"][0]["argv"]
    assert argv[argv.index("-m", 2) + 1] == "not cpp_error_path"
    assert [a for a in argv if a.startswith("tests/test_") and a.endswith(".py")] == [
        "tests/test_zoo.py", "tests/test_metrics.py"]
    head = _git(repo, "rev-parse", "HEAD")
    assert f"\nMeasured: commit {head[:12]}, tree dirty (2 paths differ, listed in env.txt); code hash " in summary
    assert f"\ncommit {head}\ntree dirty:\n M tests/test_zoo.py\n?? notes.txt\ncode hash " in (
        out / "env.txt").read_text()
    assert json.loads((out / "stages.json").read_text())["tree_clean"] is False
    assert "A test process did not exit (stacks in progress.txt.hang-gw0):\n```\nThread 0x7f (most" in summary
    assert sorted(p.name for p in out.glob("progress.txt.hang-*")) == ["progress.txt.hang-gw0"]
    bench_log = (out / "bench.log").read_text()
    assert "bench_ce ran" in bench_log and "bench_cuda_plain ran" in bench_log


def _run_in_session(command: list[str], cwd: Path, env: dict[str, str], timeout: float, while_running=None):
    """Run ``command`` in a session of its own (``while_running(proc)`` meanwhile); afterwards wait up to 10 s for
    every process of that session to end, then kill what is left. ``(process, stdout, stderr, left)``: ``left``
    the pids that had not ended by themselves. SIGINT has its default action in the command, as in a terminal's
    foreground command: a suite started in the background (``nohup ... &``) ignores it, and a shell cannot trap a
    signal that was ignored when it started."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if while_running is not None:
            while_running(proc)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        for _ in range(100):
            left = _session_processes(proc.pid)
            if not left:
                break
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
    return proc, stdout, stderr, left


def test_a_stage_past_its_limit_is_killed_and_the_evidence_before_it_is_kept(tmp_path):
    """A benchmark that hangs and ignores SIGTERM: killed 10 s after its limit (exit 137, a failure), its output so
    far and the earlier stages' evidence kept and packed, the stages the budget no longer covers skipped, a probe still
    running at the end stopped; exit 1, nothing of the check left running."""
    repo, env = _fake_checkout(tmp_path)
    out, packed = tmp_path / "check", tmp_path / "packed"
    env.update(FAKE_ENV="NVIDIA-H100", FAKE_BENCH_PCOS="hang-ignoring-term", FAKE_PROBE="hang",
               GPU_CHECK_BUDGET_S="34", GPU_CHECK_TEST_RESERVE_S="0")
    proc, stdout, stderr, left = _run_in_session(  # --pack relative to the folder the check is started from
        ["bash", str(repo / "scripts" / "gpu_check.sh"), "--out", str(out), "--pack", "packed"], tmp_path, env,
        timeout=120)
    assert proc.returncode == 1, stdout[-3000:] + stderr[-2000:]
    exits = _stage_exits(out)
    assert exits == {"build": "0", "bench_pcos": "137", **{s: "skipped (budget)" for s in GPU_STAGES[2:]}}, exits
    seconds = {s["stage"]: s["seconds"] for s in json.loads((out / "stages.json").read_text())["stages"]}
    assert _limit(out / "bench-pcos.log") + 10 <= seconds["bench_pcos"] <= _limit(out / "bench-pcos.log") + 14
    assert "bench_pcos ran" in (out / "bench-pcos.log").read_text()
    assert "bench_pcos ran" in (out / "bench.log").read_text()
    assert "build ran" in (out / "build.log").read_text() and "python 3.12.0" in (out / "env.txt").read_text()
    assert "| bench_pcos | 137 |" in (packed / "summary.md").read_text()
    probe_lines = (out / "cpp_exceptions.txt").read_text().splitlines()  # stopped with SIGTERM (its builds go too)
    assert probe_lines == ["probe ran", "probe stopped by SIGTERM",
                           "cpp_exception_probe: still running at the end of the check, stopped"]
    assert "SIGTERM\ncpp_exception_probe: still running at the end of the check, stopped\n```" in (
        out / "summary.md").read_text()
    with tarfile.open(packed / "evidence.tgz") as tar:
        assert "bench_pcos ran" in tar.extractfile("check/bench-pcos.log").read().decode()
        assert tar.extractfile("check/summary.md").read().decode() == (out / "summary.md").read_text()
    assert not left, f"processes of the check still running after it ended: {left}"


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_running_stage_and_the_probe_and_keeps_the_summary(tmp_path, signum, status):
    """SIGTERM (the device tool's limit, ``timeout``) or SIGINT (Ctrl-C): the stage and the probe stopped, the summary
    and the pack kept, exit 128 + the signal's number."""
    repo, env = _fake_checkout(tmp_path)
    out, packed = tmp_path / "check", tmp_path / "packed"
    env.update(FAKE_ENV="NVIDIA-H100", FAKE_AUTO="hang", FAKE_PROBE="hang", GPU_CHECK_BUDGET_S="300")
    shutil.rmtree(repo / ".git")  # a copy of the tree without its history: the code hash alone says what ran

    def stop_during_auto(proc):
        for _ in range(600):
            if (out / "auto.log").is_file() and "auto ran" in (out / "auto.log").read_text():
                break
            time.sleep(0.1)
        os.kill(proc.pid, signum)

    proc, stdout, stderr, left = _run_in_session(
        ["bash", "scripts/gpu_check.sh", "--out", str(out), "--pack", str(packed)], repo, env, timeout=60,
        while_running=stop_during_auto)
    assert proc.returncode == status, stdout[-3000:] + stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "| auto | running |" in summary and "Stopped by a signal during the stage marked running." in summary
    assert "\nMeasured: commit unknown (not a git checkout); code hash " in summary, summary
    assert "auto stopped by SIGTERM" in (out / "auto.log").read_text()
    assert "probe stopped by SIGTERM" in (out / "cpp_exceptions.txt").read_text()
    assert json.loads((out / "stages.json").read_text())["commit"] is None
    assert list(_stage_exits(out).items()) == [*((s, "0") for s in GPU_STAGES[:4]), ("auto", "running")]
    assert (packed / "summary.md").read_text() == summary
    assert not left, f"the stage or the probe still ran after the check ended: {left}"
    assert not list(tmp_path.glob("csl-gpu-check.*")), "the work folder is left behind"


def test_a_failed_merge_of_the_benchmarks_is_said_and_fails_the_check(tmp_path):
    """Both benchmarks ran but their results could not be merged into bench.json: the merge's error is in bench.log,
    the summary says where each op's results are, and the check exits 1 (every stage passed)."""
    repo, env = _fake_checkout(tmp_path)
    out = tmp_path / "check"
    env.update(FAKE_ENV="NVIDIA-H100", FAKE_MERGE="exit 1", FAKE_MERGE_TEXT="merge: records of another format",
               GPU_CHECK_BUDGET_S="300")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=repo, env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert set(_stage_exits(out).values()) == {"0"}
    assert not (out / "bench.json").exists()
    assert {p.name for p in out.glob("bench-*.json")} >= {"bench-pcos.json", "bench-ce.json"}
    assert ("The merge of bench-pcos.json bench-ce.json into bench.json failed:\nmerge: records of another format\n"
            in (out / "bench.log").read_text())
    assert "were not merged into bench.json (the merge's error at the end of bench.log)" in (
        out / "summary.md").read_text()


def test_a_failed_pack_leaves_no_partial_archive_and_says_so(tmp_path):
    """tar failing (a full disk, say) after writing part of the archive: no evidence.tgz.tmp is left in the pack
    folder (the device tool brings back a few files only), the summary is still there, stderr says why."""
    repo, env = _fake_checkout(tmp_path)
    out, packed = tmp_path / "check", tmp_path / "packed"
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "tar").write_text('#!/bin/sh\necho partial > "$2"\necho "tar: write error" >&2\nexit 2\n')
    (tools / "tar").chmod(0o755)
    env.update(FAKE_ENV="NVIDIA-H100", GPU_CHECK_BUDGET_S="300", PATH=f"{tools}:{env['PATH']}")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out), "--pack", str(packed)], cwd=repo,
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in packed.iterdir()) == ["summary.md"]
    assert f"gpu_check: packing the evidence into {packed}/evidence.tgz failed (tar exit 2)" in proc.stderr


def test_cpp_exception_probe_outcomes_of_a_child_that_raises_returns_or_fails():
    probe = load_script("cpp_exception_probe")
    raises = "import sys\n" + probe.RAISES
    cases = [
        (raises.format(call="raise RuntimeError('probe: expected failure\\nC++ stack')"),
         ("ok (raised: probe: expected failure)", 0)),
        (raises.format(call="pass"), ("probe failed (exit 3): no exception: the call returned", 2)),
        (raises.format(call="raise ValueError('not a RuntimeError')"), None),
        ("import sys; print('build output'); sys.exit('ninja: build stopped')", ("probe failed (exit 1): ninja: build "
                                                                               "stopped", 2)),
        ("import sys; sys.stderr.write('c++ ' * 600); sys.exit('ninja: build stopped')",  # its last 800 characters
         ("probe failed (exit 1): " + ("c++ " * 600 + "ninja: build stopped")[-800:], 2)),
    ]
    for code, expected in cases:
        what, status = probe.outcome(probe.start(code, [], cuda_hidden=True), 60)
        if expected is None:  # another exception: its traceback's end
            assert status == 2 and what.startswith("probe failed (exit 1): Traceback") and what.endswith(
                "ValueError: not a RuntimeError"), what
        else:
            assert (what, status) == expected


def test_cpp_exception_probe_main_prints_the_minimal_outcome_first_and_exits_with_it(tmp_path, monkeypatch, capsys):
    """The minimal probe's child gets its build folder, no CUDA device and the crash reporter; its outcome is the
    first line and the exit status (a crash says what it means for the tests), the variants' lines follow."""
    probe = load_script("cpp_exception_probe")
    seen = tmp_path / "seen.json"
    monkeypatch.setattr(probe, "CHILD", probe.PRELUDE + f"""
import json, os, sys
json.dump({{"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "reporter": os.environ.get("CSL_PROBE_REPORTER")}}, open({str(seen)!r}, "w"))
""" + probe.RAISES.format(call="raise RuntimeError('probe: expected failure')"))
    calls = []
    monkeypatch.setattr(probe, "variants", lambda limit, deadline, work: calls.append((limit, work)) or ["variant x"])
    assert probe.main(["--limit", "60"]) == 0
    assert capsys.readouterr().out == "cpp-exceptions: ok (raised: probe: expected failure)\n" and not calls
    child = json.loads(seen.read_text())
    assert child["argv"][0] == probe.SOURCE and child["argv"][1].endswith("/minimal") and child["argv"][2:] == [
        "[]", "[]", ""]
    assert child["cuda"] == "" and child["reporter"].endswith("crash_reporter.so")
    assert probe.main(["--variants"]) == 0
    assert capsys.readouterr().out.splitlines() == ["cpp-exceptions: ok (raised: probe: expected failure)",
                                                    "variant x"]
    minimal = json.loads(seen.read_text())["argv"][1]
    assert calls == [(420.0, minimal.removesuffix("/minimal"))]  # the whole probe's limit, the same work folder
    monkeypatch.setattr(probe, "CHILD", probe.PRELUDE + "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert probe.main([]) == 1
    out = capsys.readouterr().out
    assert out.startswith("cpp-exceptions: CRASH (SIGSEGV) at address ") and out.rstrip().endswith(
        ": a TORCH_CHECK failure in a minimal extension kills the process; tests of C++ error paths will crash here")


def test_cpp_exception_probe_variants_each_get_their_case_and_come_out_in_order(tmp_path, monkeypatch):
    """What each variant's child is given (source, flags, library, CUDA hidden or not, environment), their lines in
    the documented order; where csl's library does not build, the two cases that need it say why they did not run."""
    probe = load_script("cpp_exception_probe")
    from csl_kernels.cpp.sources import CXX_FLAGS, LD_FLAGS

    started = []
    real_start = probe.start

    def start(code, args, cuda_hidden, env=None):
        started.append((code, args, cuda_hidden, env))  # the child says which start it was
        return real_start(f"print('raised: start {len(started) - 1}')", [], cuda_hidden)

    monkeypatch.setattr(probe, "start", start)
    monkeypatch.setattr(probe, "csl_library", lambda deadline: "/csl/_C.so")
    work = str(tmp_path)
    lines = probe.variants(60, time.monotonic() + 60, work)
    assert [line.split(": ")[0] for line in lines] == [f"variant {name}" for name in probe.VARIANTS]
    given = {line.split(": ")[0].split()[1]: started[int(line.rsplit(" ", 1)[1].rstrip(")"))] for line in lines}
    flags = [json.dumps(CXX_FLAGS), json.dumps(LD_FLAGS)]
    assert given["csl-flags"] == (probe.CHILD, [probe.SOURCE, f"{work}/flags", *flags, ""], True, None)
    assert given["parallel-for"] == (probe.CHILD, [probe.PARALLEL_SOURCE, f"{work}/parallel", *flags, ""], True, None)
    assert given["message-args"] == (probe.CHILD, [probe.MESSAGE_SOURCE, f"{work}/message", "[]", "[]", ""], True, None)
    assert given["csl-loaded"] == (probe.CHILD, [probe.SOURCE, f"{work}/loaded", "[]", "[]", "/csl/_C.so"], False, None)
    assert given["csl-error-path"] == (probe.CSL_CHILD, [str(ROOT)], False, None)
    assert given["csl-cpu-only"] == (probe.CSL_CHILD, [str(ROOT)], True, {
        "CSL_EXT_CUDA": "0", "TORCH_EXTENSIONS_DIR": f"{work}/csl_cpu_only"})

    def no_library(deadline):
        raise RuntimeError("csl's extension did not build or load: nvcc broke")

    monkeypatch.setattr(probe, "csl_library", no_library)
    lines = probe.variants(60, time.monotonic() + 60, work)
    assert [line.split(": ")[0] for line in lines] == [f"variant {name}" for name in probe.VARIANTS]
    assert lines[3:5] == [f"variant {name}: not run (csl's extension did not build or load: nvcc broke)"
                          for name in ("csl-loaded", "csl-error-path")]
    assert all(": ok (raised: start " in line for line in lines[:3] + lines[5:]), lines
    # --limit bounds the whole probe: children still running at its deadline are not waited for one limit each
    monkeypatch.setattr(probe, "start", lambda code, args, cuda_hidden, env=None: real_start(
        "import time; time.sleep(60)", [], cuda_hidden))
    monkeypatch.setattr(probe, "csl_library", lambda deadline: "/csl/_C.so")
    t0 = time.monotonic()
    lines = probe.variants(100, t0 + 1, work)
    assert lines == [f"variant {name}: not known (the probe ran past its 100 s limit)" for name in probe.VARIANTS]
    assert time.monotonic() - t0 < 20


def test_cpp_exception_probe_csl_library_is_the_last_line_its_child_prints(monkeypatch):
    probe = load_script("cpp_exception_probe")
    monkeypatch.setattr(probe, "LIBRARY_OF_CSL", "print('building csl'); print('/cache/csl/_C.so')")
    assert probe.csl_library(time.monotonic() + 60) == "/cache/csl/_C.so"
    monkeypatch.setattr(probe, "LIBRARY_OF_CSL", "import sys; print('/cache/csl/_C.so'); sys.exit('ninja failed')")
    with pytest.raises(RuntimeError, match="^csl's extension did not build or load: ninja failed$"):
        probe.csl_library(time.monotonic() + 60)


def test_cpp_exception_probe_stopped_with_sigterm_stops_its_child_and_exits_143(tmp_path):
    """gpu_check.sh ends a probe still running with SIGTERM: the child (a build, with its compilers) goes too."""
    pid_file = tmp_path / "child"
    script, child_code = ROOT / "scripts" / "cpp_exception_probe.py", (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    code = ("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('probe', {str(script)!r})\n"
            "probe = importlib.util.module_from_spec(spec); spec.loader.exec_module(probe)\n"
            f"probe.CHILD = {child_code!r}\n"
            "raise SystemExit(probe.main([]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        child = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and stdout == "", stdout + stderr
    for _ in range(300):
        if _gone_or_zombie(child):
            break
        time.sleep(0.1)
    assert _gone_or_zombie(child), f"the probe's child {child} still runs"


def test_a_budget_that_covers_no_stage_skips_each_and_exits_1(tmp_path):
    """A check that ran nothing (each stage skipped for the budget) is not a passed check."""
    repo, env = _fake_checkout(tmp_path)
    out = tmp_path / "check"
    env.update(FAKE_ENV="NVIDIA-H100", GPU_CHECK_BUDGET_S="20", GPU_CHECK_TEST_RESERVE_S="0")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=repo, env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert _stage_exits(out) == {stage: "skipped (budget)" for stage in GPU_STAGES}
    assert set(_fake_calls(tmp_path)) == {"env", "probe", "import"}  # nothing but the environment and the probe


def test_cpp_exception_probe_crash_details_keep_every_frame_the_reporter_writes_up_to_the_cap():
    """The reporter's two frame formats (a frame in a library, a frame dladdr does not place) both parse; the native
    stack stops at max_frames; faulthandler's report follows without its module list."""
    import re

    probe = load_script("cpp_exception_probe")
    formats = re.findall(r'snprintf\(line, sizeof line, "(native frame [^"]*)\\n"', probe.REPORTER_SOURCE)
    assert len(formats) == 2, formats
    in_library, unplaced = (f.replace("%lx", "%x").replace("%p", "0x%x") for f in formats)
    lines = ["native crash: signal 11 at address 0x10", in_library % (0, "/nowhere/libcsl.so", 0x2a, "csl_op"),
             unplaced % (1, 0x7F0000001000)]
    lines += [in_library % (i, "/nowhere/libtorch.so", i, "?") for i in range(2, 50)]
    lines += ["Fatal Python error: Segmentation fault", "", "Current thread 0x1 (most recent call first):",
              '  File "<string>", line 3 in <module>', "", "Extension modules: torch._C (total: 1)"]
    text = probe.crash_details("\n".join(lines), max_frames=40)
    head, *rest = text.splitlines()
    assert head == " at address 0x10; native stack:"
    assert rest[:3] == ["    #0 libcsl.so +0x2a csl_op", "    #1 ? +0x7f0000001000", "    #2 libtorch.so +0x2"]
    assert rest[39] == "    #39 libtorch.so +0x27" and not rest[40].startswith("    #")
    python_stack = ["    Fatal Python error: Segmentation fault", "    Current thread 0x1 (most recent call first):",
                    '      File "<string>", line 3 in <module>']
    assert rest[40:] == python_stack


@pytest.mark.parametrize(("present", "workers", "method", "notes"), [
    ("", False, None, ["pytest-xdist is not installed", "pytest-timeout is not installed: no time limit per test"]),
    ("pytest_timeout", False, "signal", ["pytest-xdist is not installed: the suite ran in one process"]),
    ("xdist", True, None, ["pytest-timeout is not installed: no time limit per test"]),
])
def test_a_machine_without_pytest_xdist_or_pytest_timeout_runs_the_suite_and_says_so(tmp_path, present, workers,
                                                                                      method, notes):
    """Without pytest-xdist the suite runs in one process, where a test past its limit is failed by a signal (the
    thread method would end the one process, and the suite with it); a missing plugin is said in the summary."""
    repo, env = _fake_checkout(tmp_path)
    out = tmp_path / "check"
    env.update(FAKE_ENV="NVIDIA-H100", FAKE_IMPORT=present, GPU_CHECK_BUDGET_S="300")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=repo, env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    argv = _fake_calls(tmp_path)["tests"][0]["argv"]
    assert ("-n" in argv) == workers
    if method is None:
        assert "--timeout" not in argv
    else:
        assert argv[argv.index("--timeout") + 1:argv.index("--timeout") + 4] == ["120", "--timeout-method", method]
    summary = (out / "summary.md").read_text()
    for note in notes:
        assert note in summary, summary
    assert ("pytest-xdist" in summary) != workers


def _tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + script)
    (folder / name).chmod(0o755)


def test_a_hanging_nvidia_smi_or_nvcc_is_stopped_and_said_in_env_txt(tmp_path):
    """A driver or toolkit that hangs nvidia-smi / nvcc: each stopped after GPU_CHECK_PROBE_LIMIT_S, said in env.txt,
    and the stages run (they hung the check before any summary was written)."""
    repo, env = _fake_checkout(tmp_path)
    out, tools = tmp_path / "check", tmp_path / "tools"
    _tool(tools, "nvidia-smi", "exec sleep 600\n")
    _tool(tools, "nvcc", "exec sleep 600\n")
    env.update(FAKE_ENV="NVIDIA-H100", GPU_CHECK_BUDGET_S="300", GPU_CHECK_PROBE_LIMIT_S="2",
               PATH=f"{tools}:{env['PATH']}")
    summary_while_hanging = []

    def look_while_nvidia_smi_hangs(proc):  # a kill now (the loan's end) must still leave a summary
        for _ in range(300):
            if (out / "env.txt").is_file():
                break
            time.sleep(0.05)
        summary_while_hanging.append((out / "summary.md").is_file())

    proc, stdout, stderr, left = _run_in_session(["bash", "scripts/gpu_check.sh", "--out", str(out)], repo, env,
                                                 timeout=90, while_running=look_while_nvidia_smi_hangs)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-2000:]
    assert summary_while_hanging == [True]
    env_txt = (out / "env.txt").read_text()
    assert "nvidia-smi: failed (exit 124; 124 = stopped after 2s)" in env_txt and "nvcc --version: failed (exit 124)" \
        in env_txt, env_txt
    assert list(_stage_exits(out).values()) == ["0"] * len(GPU_STAGES)
    assert not left, f"processes of the check still running after it ended: {left}"


def test_a_missing_nvidia_smi_and_nvcc_are_said_in_env_txt(tmp_path):
    repo, env = _fake_checkout(tmp_path)
    out, tools = tmp_path / "check", tmp_path / "tools"
    tools.mkdir()
    for name in ("bash", "git", "find", "sort", "xargs", "sha256sum", "cut", "date", "mkdir", "rm", "mv", "cat",
                 "grep", "sed", "head", "tail", "wc", "tr", "uniq", "sleep", "timeout", "nice", "mktemp", "dirname",
                 "basename", "seq", "tar", "gzip", "cp", "awk"):
        (tools / name).symlink_to(shutil.which(name))
    env.update(FAKE_ENV="NVIDIA-H100", GPU_CHECK_BUDGET_S="300", PATH=str(tools))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=repo, env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    env_txt = (out / "env.txt").read_text()
    assert "nvidia-smi: not on PATH\n" in env_txt and "nvcc: not on PATH\n" in env_txt, env_txt


def test_python_that_hangs_finding_the_gpu_is_stopped_before_any_stage(tmp_path):
    """torch's CUDA start hanging (a driver that does not answer): stopped after GPU_CHECK_PROBE_LIMIT_S, exit 2 with
    the reason, no stage started (the whole loan went to it before)."""
    repo, env = _fake_checkout(tmp_path)
    env.update(FAKE_ENV="hang", GPU_CHECK_PROBE_LIMIT_S="2")
    proc, stdout, stderr, left = _run_in_session(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "check")],
                                                 repo, env, timeout=60)
    assert proc.returncode == 2 and "did not import torch and find the GPU within 2s" in stderr, stderr
    assert list(_fake_calls(tmp_path)) == ["env"] and not (tmp_path / "check").exists()
    assert not left, f"processes of the check still running after it ended: {left}"


@pytest.mark.parametrize("flag", ["--out", "--pack"])
def test_a_folder_that_cannot_be_written_is_refused_before_any_stage(tmp_path, flag):
    """An evidence or pack folder that cannot be made (a read-only or full disk; here a file in its path): exit 2
    with the reason. Before, the folder's name became empty: the evidence went to / and nothing was packed."""
    repo, env = _fake_checkout(tmp_path)
    (tmp_path / "file").write_text("")
    env.update(FAKE_ENV="NVIDIA-H100", GPU_CHECK_BUDGET_S="300")
    folders = {"--out": str(tmp_path / "check"), "--pack": str(tmp_path / "packed"), flag: str(tmp_path / "file/x")}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", *(a for f in folders.items() for a in f)], cwd=repo,
                          env=env, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"folder {tmp_path}/file/x cannot be written: mkdir: " in proc.stderr, proc.stderr
    assert list(_fake_calls(tmp_path)) == ["env"]


def test_a_long_gpu_name_gives_a_folder_name_a_file_system_takes(tmp_path):
    repo, env = _fake_checkout(tmp_path)
    name = "NVIDIA-" + "H" * 300
    env.update(FAKE_ENV=name, GPU_CHECK_BUDGET_S="300")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, timeout=300, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    [out] = (repo / "gpu-check").iterdir()
    assert out.name.endswith("-" + name[:64])
    assert (out / "summary.md").read_text().startswith(f"# GPU check ({name}), ")


def test_a_copy_of_the_summary_cut_short_leaves_the_last_whole_one_in_the_pack(tmp_path):
    """cp failing part-way into the pack folder (a full disk; a kill is the same cut): the summary.md brought back
    is the last whole one, not a piece, and no temporary file is left beside it."""
    repo, env = _fake_checkout(tmp_path)
    out, packed, tools = tmp_path / "check", tmp_path / "packed", tmp_path / "tools"
    real_cp = shutil.which("cp")
    _tool(tools, "cp", f'''case "$2" in
  *summary.md*) n=$(cat "{tmp_path}/cp-count" 2>/dev/null || echo 0); echo $((n + 1)) > "{tmp_path}/cp-count"
    if [ "$n" -ge 3 ]; then echo partial > "$2"; echo "cp: No space left on device" >&2; exit 1; fi ;;
esac
exec {real_cp} "$@"
''')
    env.update(FAKE_ENV="NVIDIA-H100", GPU_CHECK_BUDGET_S="300", PATH=f"{tools}:{env['PATH']}")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out), "--pack", str(packed)], cwd=repo,
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in packed.iterdir()) == ["evidence.tgz", "summary.md"]
    kept = (packed / "summary.md").read_text()
    assert kept.startswith("# GPU check (NVIDIA-H100), ") and "| stage | exit | seconds |" in kept, kept
    assert f"gpu_check: copying summary.md into {packed} failed" in proc.stderr


def test_an_extension_without_its_cuda_part_is_said_and_the_other_stages_run(tmp_path):
    """No nvcc (or a torch that is no CUDA build): the extension is built without its CUDA part, no build of it is
    tried, so no "building the CPU part alone"; the summary says why and that the Triton stages ran."""
    repo, env = _fake_checkout(tmp_path)
    out = tmp_path / "check"
    env.update(FAKE_ENV="NVIDIA-H100", GPU_CHECK_BUDGET_S="300", FAKE_BUILD="exit 1",
               FAKE_BUILD_TEXT="extension unavailable: the C++ extension was built without its CUDA part (nvcc not "
                               "found (set CUDA_HOME)) in 30.1 s")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=repo, env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {s for s, e in _stage_exits(out).items() if e != "0"} == {"build"}
    summary = (out / "summary.md").read_text()
    assert ("The extension was built without its CUDA part (nvcc not found (set CUDA_HOME)): the cuda "
            "backend's benchmark rows say unavailable and its tests fail with that reason; the Triton and CPU stages "
            "ran.") in summary, summary


def test_a_gpu_without_native_bfloat16_is_benchmarked_in_float16(tmp_path):
    """A GPU of compute capability below 8.0 (V100, T4) has no native bfloat16 (train.amp=auto trains it in fp16):
    the benchmark times fp16 and fp32 there, and the summary says why."""
    repo, env = _fake_checkout(tmp_path)
    env.update(FAKE_ENV="Tesla-T4", FAKE_HALF="fp16", FAKE_IMPORT="ok", GPU_CHECK_BUDGET_S="300")
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    calls = _fake_calls(tmp_path)
    for stage in ("bench_pcos", "bench_ce", "bench_cuda_plain"):
        argv = calls[stage][0]["argv"]
        assert argv[argv.index("--dtypes"):][:3] == ["--dtypes", "fp16", "fp32"], argv
    assert "GPU 0 has no native bfloat16 (compute capability below 8.0): the benchmark timed fp16 and fp32." in (
        tmp_path / "out" / "summary.md").read_text()
