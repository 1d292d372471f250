"""The suite's own harness (tests/conftest.py): outcomes written as they happen, the exit watchdog, CUDA errors
blamed on the test that left them."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import ROOT


def test_failures_are_written_as_they_happen(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import conftest

    path = tmp_path / "progress.txt"
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # as the controller: under xdist this runs in a worker
    monkeypatch.setenv("CSL_TEST_PROGRESS", str(path))
    text = "def test_x():\n>       assert 1 == 2\nE       assert 1 == 2\n\ntests/test_x.py:3: AssertionError"
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, when="call", nodeid="tests/test_x.py::test_x",
                                                      longreprtext=text))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, passed=True, skipped=False, when="call",
                                                      nodeid="tests/test_x.py::ok", longreprtext="", duration=1.5))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, passed=True, skipped=False, when="setup",
                                                      nodeid="tests/test_x.py::ok", longreprtext="", duration=0.1))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, when="setup", nodeid="tests/test_x.py::fx",
                                                      longreprtext="E   RuntimeError: boom"))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, passed=False, skipped=True, when="setup",
                                                      nodeid="tests/test_x.py::gpu", longreprtext="",
                                                      longrepr=("x.py", 3, "Skipped: needs a CUDA device")))
    assert path.read_text().splitlines() == ["FAILED tests/test_x.py::test_x E       assert 1 == 2",
                                             "PASSED tests/test_x.py::ok 1.50s",
                                             "ERROR tests/test_x.py::fx E   RuntimeError: boom",
                                             "SKIPPED tests/test_x.py::gpu Skipped: needs a CUDA device"]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # a worker writes nothing: its controller does
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, when="call", nodeid="tests/test_x.py::w",
                                                      longreprtext="E x"))
    assert len(path.read_text().splitlines()) == 4
    details = (tmp_path / "progress.txt.details").read_text()
    assert "==== FAILED tests/test_x.py::test_x (call)" in details and "tests/test_x.py:3: AssertionError" in details


def test_a_process_held_after_the_run_dumps_its_stacks_and_exits(tmp_path):
    """The exit watchdog: a non-daemon thread that never ends would hold the interpreter forever; with
    CSL_TEST_PROGRESS set the process writes its stacks and exits after the grace time."""
    import subprocess
    import sys

    script = ("import sys, threading, time; sys.path.insert(0, 'tests'); import conftest; "
              "conftest.pytest_unconfigure(None); time.sleep(2); "  # armed only when the main thread ends
              "threading.Thread(target=lambda: time.sleep(600), name='stuck').start()")
    path = tmp_path / "progress.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CSL_TEST_PROGRESS": str(path), "CSL_TEST_EXIT_GRACE": "1",
           "PYTEST_XDIST_WORKER": "gw7"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          timeout=60, capture_output=True, text=True)
    assert proc.returncode != 0
    dump = (tmp_path / "progress.txt.hang-gw7").read_text()
    assert dump.startswith("Timeout (0:00:01)!") and "in _shutdown" in dump and "in <lambda>" in dump, dump


def test_a_cuda_error_is_blamed_on_the_test_that_left_it(tmp_path, monkeypatch):
    """After a test that used CUDA, a pending CUDA error fails that test (one process) or ends the xdist worker with
    the error written down (the lost context would fail every later test of the worker)."""
    import conftest

    synced = []

    def synchronize():
        synced.append(True)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    conftest.check_cuda_after_test()  # CUDA never used by the test: nothing to check
    assert not synced
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="CUDA error left by this test: .*illegal memory access"):
        conftest.check_cuda_after_test()
    exits = []
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setenv("CSL_TEST_PROGRESS", str(tmp_path / "progress.txt"))
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    conftest.check_cuda_after_test()
    assert exits == [3]
    assert "CUDA error after a test in worker gw3" in (tmp_path / "progress.txt.details").read_text()


@pytest.mark.parametrize("required, interpreter_only, cuda, outcome", [
    ("cpu", False, False, "skip"),  # triton not required: a skip with the reason
    ("cpu,triton", False, False, "fail"),
    ("cpu,triton", False, True, "fail"),
    ("cpu,triton", True, False, "fail"),  # the interpreter is the only way to run it here
    ("cpu,triton", True, True, "skip"),  # a GPU machine runs the real kernels instead
])
def test_skip_or_fail_fails_where_the_backend_is_required(monkeypatch, required, interpreter_only, cuda, outcome):
    import conftest

    monkeypatch.setenv("CSL_REQUIRE_BACKENDS", required)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="no interpreter here"):
        conftest.skip_or_fail("triton", "no interpreter here", interpreter_only=interpreter_only)


def test_child_limit_stays_under_the_per_test_time_limit(monkeypatch):
    """Under pytest-timeout's --timeout a test's child is given at most that limit less 20 s (the test kills it,
    rather than being ended with the child still running); without a per-test limit, what the test asks for."""
    from types import SimpleNamespace

    import conftest

    monkeypatch.setattr(conftest, "_PER_TEST_LIMIT_S", conftest._PER_TEST_LIMIT_S)  # restored after the test
    options = {"timeout": 120.0}
    conftest.pytest_configure(SimpleNamespace(getoption=lambda name, default=None: options.get(name, default)))
    assert conftest.child_limit(600) == 100 and conftest.child_limit(30) == 30
    # The children of one test share one such limit: each wait gets what is left of it, at least 1 s.
    time_left = conftest.child_deadline(600)
    assert 99 < time_left() <= 100
    options.clear()  # pytest-timeout not installed (the option does not exist) or no --timeout given
    conftest.pytest_configure(SimpleNamespace(getoption=lambda name, default=None: options.get(name, default)))
    assert conftest.child_limit(600) == 600
    assert conftest.child_deadline(0.01)() == 1


def test_variance_of_copies_is_the_variance_of_the_repeated_pixels():
    from conftest import variance_of_copies

    g = torch.Generator().manual_seed(0)
    groups = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (0, 1, 2, 7)]
    var = torch.stack([p.var(dim=0) if len(p) > 1 else torch.zeros(2, dtype=torch.float64) for p in groups])
    count = torch.tensor([len(p) for p in groups])
    expected = torch.stack([p.repeat(5, 1).var(dim=0) if len(p) > 1 else torch.zeros(2, dtype=torch.float64)
                            for p in groups])
    torch.testing.assert_close(variance_of_copies(var, count, 5), expected, rtol=1e-12, atol=0)


def test_spec_weight_is_the_reference_backends_weight():
    from conftest import spec_weight

    import csl_kernels

    z = torch.randn(1, 5, 9, 13, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    for rule in ("paper", "released"):
        out = csl_kernels.pcos_weights(z, rule=rule, backend="reference", return_stats=True)
        x, y, _ = csl_kernels.residual_features(z, rule=rule, backend="reference")
        c = int(out.stats.chosen)
        expected = spec_weight(x, y, out.stats.mu[0, c], out.stats.var[0, c], rule=rule)
        assert ((expected > 0) & (expected < 1)).any() and (expected == 1).any()
        torch.testing.assert_close(out.weight.double(), expected, rtol=1e-6, atol=1e-7)
