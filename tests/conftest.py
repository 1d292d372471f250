"""Shared test parametrisation: every fused backend is tested against the float64 reference with the same cases.

A backend that cannot run here is skipped with its reason, unless it is named in ``CSL_REQUIRE_BACKENDS``
(comma-separated; CI sets it) — then the test fails, so a broken build cannot hide behind a skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import csl_kernels
from csl_kernels import unavailable_reason

FUSED_BACKENDS = ("triton", "cpu", "cuda")
# The repository's root folder (this file is tests/conftest.py); os.path.join, open and subprocess's cwd take it as is.
ROOT = Path(__file__).resolve().parent.parent
# The shared data folder (CamVid, ImageNet weights): CSL_SHARED, by default ../shared beside the repository.
SHARED = Path(os.environ.get("CSL_SHARED", ROOT.parent / "shared"))
# pytest-timeout's --timeout (scripts/gpu_check.sh gives every test 120 s), read in pytest_configure; None without it.
_PER_TEST_LIMIT_S: float | None = None

# On a GPU every new shape would otherwise be timed under each launch-configuration candidate (and written to the
# user's cache); the suite tests the defaults and every candidate explicitly (tests/test_triton_tuning.py).
os.environ.setdefault("CSL_TRITON_AUTOTUNE", "0")


def backend_device(backend: str) -> torch.device:
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def required_backends() -> set[str]:
    return {b.strip() for b in os.environ.get("CSL_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def child_limit(seconds: float) -> float:
    """How long a test waits for a child process: ``seconds``, but under a per-test time limit (pytest-timeout's
    ``--timeout``) at most that limit less 20 s, so the test kills its child itself: pytest-timeout ends the whole
    test process and leaves the child running, holding the GPU or the cores, beside the tests that follow."""
    if _PER_TEST_LIMIT_S:
        return max(1.0, min(seconds, _PER_TEST_LIMIT_S - 20))
    return seconds


def child_deadline(seconds: float) -> Callable[[], float]:
    """One deadline, :func:`child_limit` (``seconds``) from now, for all the children of a test: the returned function
    gives the seconds left for the next wait (at least 1, so a child started late still gets a moment)."""
    end = time.monotonic() + child_limit(seconds)
    return lambda: max(end - time.monotonic(), 1.0)


def pytest_configure(config):
    """``CSL_REQUIRE_BACKENDS`` is checked before any test runs: a misspelt name would require nothing, and ``cuda``
    required where no CUDA device is visible would leave the ``gpu``-marked tests skipped, not failed."""
    global _PER_TEST_LIMIT_S
    limit = config.getoption("timeout", default=None)  # None where pytest-timeout is not installed
    _PER_TEST_LIMIT_S = float(limit) if limit else None
    unknown = sorted(required_backends() - set(FUSED_BACKENDS))
    if unknown:
        raise pytest.UsageError(f"CSL_REQUIRE_BACKENDS names {unknown}, which are not backends; the fused backends "
                                f"are {', '.join(FUSED_BACKENDS)}")
    if "cuda" in required_backends() and not torch.cuda.is_available():
        raise pytest.UsageError("CSL_REQUIRE_BACKENDS requires cuda, but torch sees no CUDA device here")


def require_backend(op: str, backend: str) -> torch.device:
    """Return the device to test ``backend`` on, or skip (fail if required) when it cannot run ``op``."""
    device = backend_device(backend)
    if backend == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        reason = unavailable_reason(op, backend, device)
    if reason is not None:
        skip_or_fail(backend, f"{backend} unavailable for {op}: {reason}")
    return device


def skip_or_fail(backend: str, reason: str, *, interpreter_only: bool = False) -> None:
    """Skip a check of ``backend`` that cannot run here, or fail it where ``backend`` is in ``CSL_REQUIRE_BACKENDS``.
    ``interpreter_only``: the check needs Triton's interpreter, which a GPU machine does not need (it runs the real
    kernels), so there it only skips."""
    if backend in required_backends() and not (interpreter_only and torch.cuda.is_available()):
        pytest.fail(f"required backend {backend!r}: {reason}")
    pytest.skip(reason)


def masks(mask: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The keyword an op takes ``mask`` as: ``valid=`` for a bool mask (True = valid), else ``ignore=`` (an integer
    map with 255 = ignored, or None)."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return {"valid": mask}
    return {"ignore": mask}


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN (``torch.equal`` is False wherever both hold a NaN); +-inf must
    match as well."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (B x C x H x W, or B x H x W) in another memory layout: ``contiguous``,
    ``channels_last``, ``transposed``, ``strided``, ``class_slice``, ``batch_slice``."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if kind == "transposed":  # H and W strides swapped: rows are not evenly spaced
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":  # a stride-2 view into a larger buffer
        big = torch.zeros(*t.shape[:-2], 2 * t.shape[-2], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        view = big[..., ::2, 1::2]
        view.copy_(t)
        return view
    if kind == "class_slice" and t.dim() == 4:  # every other class of a larger tensor
        big = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
        big[:, 1::2] = t
        return big[:, 1::2]
    if kind == "batch_slice" or kind == "class_slice":  # every other image of a larger tensor
        big = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    raise ValueError(kind)


@pytest.fixture(autouse=True)
def _restore_loggers():
    """The trainer gives the ``csl`` / ``csl_kernels`` loggers their own handlers and stops propagation; undo that
    after each test, so that ``caplog`` (a root handler) sees their records in the tests that follow."""
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in ("csl", "csl_kernels")}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if h not in handlers:
                h.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(autouse=True)
def _cuda_errors_stay_with_their_test():
    yield
    check_cuda_after_test()


def check_cuda_after_test() -> None:
    """A CUDA error (an illegal address, a device assert) is reported by a later call, often in a later test, and
    leaves the process's CUDA context unusable. Synchronising after each test that used CUDA blames the test that
    caused it; under pytest-xdist the worker then ends (the controller reports this test as crashed and starts a new
    worker, so the tests after it are not failed by the lost context), with the error in CSL_TEST_PROGRESS's details
    file and on stderr."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:
        message = f"CUDA error left by this test: {exc}".strip()
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if not worker:
            pytest.fail(message + " (the CUDA context is lost: the tests after this one in this process fail too)")
        progress = os.environ.get("CSL_TEST_PROGRESS")
        if progress:
            with open(progress + ".details", "a") as f:
                f.write(f"==== CUDA error after a test in worker {worker}\n{message}\n\n")
        print(message, file=sys.stderr, flush=True)
        os._exit(3)


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request) -> str:
    """Parametrises a test over the fused backends; the test calls ``require_backend(op, backend)``."""
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """With ``CSL_TEST_PROGRESS`` set to a file, append one line per test outcome as it happens (``PASSED <nodeid>
    <seconds>s``, ``SKIPPED <nodeid> <reason>``, ``FAILED <nodeid> <E line>``, ``ERROR`` for a failed setup / teardown
    or a crashed worker) and each failure's whole text to ``<file>.details``, so a run killed by a time limit still
    tells what ran and what failed (scripts/gpu_check.sh). Under pytest-xdist the controller, which receives every
    worker's reports, writes the file."""
    path = os.environ.get("CSL_TEST_PROGRESS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.failed:
        kind = "FAILED" if report.when == "call" else "ERROR"
        message = str(getattr(report, "longreprtext", "") or "").strip().splitlines()
        detail = next((line for line in reversed(message) if line.startswith("E ")), message[-1] if message else "")
        with open(path + ".details", "a") as f:  # the whole text, which a killed run never prints
            f.write(f"==== {kind} {report.nodeid} ({report.when})\n" + "\n".join(message[-120:]) + "\n\n")
    elif report.skipped and report.when in ("setup", "call"):
        kind, longrepr = "SKIPPED", getattr(report, "longrepr", None)
        detail = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr or "")
    elif report.passed and report.when == "call":
        kind, detail = "PASSED", f"{getattr(report, 'duration', 0.0):.2f}s"
    else:
        return
    with open(path, "a") as f:
        f.write(f"{kind} {report.nodeid} {detail[:300]}\n")


def pytest_unconfigure(config):
    """With ``CSL_TEST_PROGRESS`` set, a process that has not exited 60 s after its main thread finished (a thread or
    a child process holding interpreter shutdown) writes every thread's stack to ``<progress>.hang-<worker>`` and
    exits, so the run ends and tells what held it. (An xdist worker's main thread ends when the controller lets it
    go, after its own tests, so a worker is never cut short while it waits.)"""
    path = os.environ.get("CSL_TEST_PROGRESS")
    if not path:
        return
    import faulthandler
    import threading

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    grace = float(os.environ.get("CSL_TEST_EXIT_GRACE", "60"))

    def arm() -> None:
        stream = open(f"{path}.hang-{worker}", "w")  # noqa: SIM115 - must stay open for the watchdog
        faulthandler.dump_traceback_later(grace, exit=True, file=stream)

    register = getattr(threading, "_register_atexit", None)  # runs when the main thread ends, before joining others
    if register is None:
        arm()
    else:
        register(arm)


def spy_constexpr(monkeypatch, module, kernel: str, name: str) -> list:
    """Record the constexpr ``name`` of every launch of ``module.<kernel>`` (a Triton kernel launched as
    ``kernel[grid](...)``); the launches still run."""
    seen = []
    jit = getattr(module, kernel)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs[name])
                return jit[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, kernel, Spy())
    return seen


def _run_spawned(index: int, fn, args: tuple) -> None:
    """A spawned process: a crash (SIGSEGV, SIGABRT from C++) prints every thread's Python stack (faulthandler) and
    native stack (torch's fatal-signal handler) to the captured stderr, so the failure shows where each thread was;
    then ``fn(index, *args)``."""
    import faulthandler

    import torch

    faulthandler.enable(all_threads=True)
    torch._C._set_print_stack_traces_on_fatal_signal(True)
    fn(index, *args)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now, for a test's process group (MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_join(fn, args: tuple, nprocs: int, timeout_s: float = 90.0) -> None:
    """``torch.multiprocessing.spawn`` (the spawn start method: no fork after CUDA initialisation) with a time limit:
    processes still running after ``timeout_s`` (a rank waiting for a peer that died, gloo's own limit is 30
    minutes) are terminated and the test fails, instead of holding the test process past its exit. The default is
    under the 120 s per-test limit of scripts/gpu_check.sh, whose time-out ends the worker process outright."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(_run_spawned, args=(fn, args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):  # raises when a process failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {nprocs} spawned processes did not finish within {timeout_s:g} s")
    finally:  # also when the test is stopped (its own time limit, Ctrl-C): no process outlives it
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(10)


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def written(path: Path, text: str) -> str:
    """Write ``text`` to ``path`` and return the path as a string, as the loaders under test take it."""
    path.write_text(text)
    return str(path)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """``torch.set_default_dtype(dtype)`` inside the block, the caller's default restored after it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.fixture
def kept_figures(monkeypatch) -> list:
    """The figures csl.plots draws, kept instead of written as PNG (closed after the test)."""
    from csl import plots

    kept = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: kept.append(fig) or path)
    yield kept
    plots._pyplot().close("all")


def quality(share: float, accuracy: float, recall: float) -> dict:
    """One rule's entry of an analysis: share, accuracy, recall."""
    return {"share": share, "accuracy": accuracy, "recall": recall}


def synthetic_analysis() -> dict:
    """An analysis.json content (what ``csl.analyze.run_analysis`` returns) whose every rule has its own numbers."""
    return {"threshold": [{"tau": 0.9, **quality(0.71, 0.72, 0.73)}, {"tau": 0.95, **quality(0.61, 0.62, 0.63)}],
            "csl": {"hard": quality(0.51, 0.52, 0.53), "weighted": quality(0.41, 0.42, 0.43)},
            "csl_class": {"hard": quality(0.31, 0.32, 0.33), "weighted": quality(0.21, 0.22, 0.23)},
            "csl_released": {"hard": quality(0.11, 0.12, 0.13), "weighted": quality(0.14, 0.15, 0.16)},
            "confidence_at_released_share": quality(0.17, 0.18, 0.19),
            "at_csl_share": {"confidence": quality(0.41, 0.81, 0.82), "entropy": quality(0.41, 0.83, 0.84)},
            "confidence_per_image_at_csl_share": quality(0.41, 0.85, 0.86),
            "all_pixels": quality(1.0, 0.9, 1.0), "model_accuracy": 0.9, "split": "unlabeled"}


def spec_weight(x: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, alpha: float = 8.0,
                rule: str = "paper") -> torch.Tensor:
    """Spec Sec. 2.6 (Sec. 2b for ``rule="released"``), written out: the weight of pixels with features (x, y) under
    the reliable cluster's mean ``mu`` and unbiased variance ``var`` (last dimension: confidence, dispersion;
    broadcast against x). 1 strictly above the mean confidence or strictly on the preserved side of the mean
    dispersion (paper: above, released: below), else exp(-(z0^2 + z1^2) / alpha), z = (phi - mu) / sqrt(var + 1e-8)."""
    z0 = (x - mu[..., 0]) / torch.sqrt(var[..., 0] + 1e-8)
    z1 = (y - mu[..., 1]) / torch.sqrt(var[..., 1] + 1e-8)
    preserved_side = (y < mu[..., 1]) if rule == "released" else (y > mu[..., 1])
    return torch.where((x > mu[..., 0]) | preserved_side, 1.0, torch.exp(-(z0 * z0 + z1 * z1) / alpha))


def variance_of_copies(var: torch.Tensor, count: torch.Tensor, copies: int) -> torch.Tensor:
    """The unbiased variances (``var``: ... x 2) of groups of ``count`` pixels when every pixel is repeated ``copies``
    times (copies > 1): the squared deviations sum ``copies`` times over, divided by count * copies - 1 instead of
    count - 1 (0 for one-pixel and empty groups, as their variance)."""
    n = count.double()
    return var * ((n - 1) * copies / (n * copies - 1)).clamp_min(0).unsqueeze(-1)


def repeated_row_inputs(device, classes, height, width, dtype):
    """Logits that repeat one row ``height`` times (stride 0 along H), the row's labels and weights for the CE."""
    g = torch.Generator().manual_seed(7)
    row = (torch.randn(1, classes, 1, width, generator=g) * 3).to(device=device, dtype=dtype)
    row[:, 0, :, : width // 3] += 5.0  # confident pixels beside uncertain ones: two clusters
    label = torch.randint(0, classes, (1, 1, width), generator=g).to(device)
    weight = torch.rand(1, 1, width, generator=g).to(device)
    return row, row.expand(1, classes, height, width), label, weight


def check_outputs_of_repeated_rows(backend, device, classes, height, width, dtype):
    """Every op on ``height`` copies of one row against the row alone: features and labels bitwise, PCOS statistics
    ``height`` times the row's counts with the row's means, weights within float64-sum rounding, the CE the row's
    loss with ``1 / height`` of its gradient in every row."""
    row, z, label, weight = repeated_row_inputs(device, classes, height, width, dtype)
    one, whole = (csl_kernels.residual_features(t, backend=backend) for t in (row, z))
    for a, b in zip(whole, one, strict=True):
        assert torch.equal(a[:, -1:], b) and torch.equal(a[:, :1], b)
    del whole
    one = csl_kernels.pcos_weights(row, backend=backend, return_stats=True)
    whole = csl_kernels.pcos_weights(z, backend=backend, return_stats=True)
    assert int(one.stats.count.min()) > 0  # two populated clusters
    assert torch.equal(whole.stats.count, one.stats.count * height)
    assert torch.equal(whole.stats.chosen, one.stats.chosen)
    torch.testing.assert_close(whole.stats.mu, one.stats.mu, rtol=1e-9, atol=1e-12)
    assert torch.equal(whole.label[:, -1:], one.label) and torch.equal(whole.reliable[:, -1:], one.reliable)
    torch.testing.assert_close(whole.stats.var, variance_of_copies(one.stats.var, one.stats.count, height), rtol=1e-6,
                               atol=1e-12)
    # The weights of the row's pixels under the whole image's statistics (spec Sec. 2.6), in float64.
    x, y, _ = (f.double() for f in csl_kernels.residual_features(row, backend=backend))
    c = int(whole.stats.chosen)
    expected = spec_weight(x, y, whole.stats.mu[0, c].double(), whole.stats.var[0, c].double())
    assert ((expected > 0.01) & (expected < 0.99)).any()
    for rows in (whole.weight[:, -1:], whole.weight[:, :1]):
        torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)
    del whole
    row_leaf = row.detach().requires_grad_()
    loss_row = csl_kernels.weighted_cross_entropy(row_leaf, label, weight, None, backend=backend)
    loss_row.backward()
    leaf = z.detach().requires_grad_()
    loss = csl_kernels.weighted_cross_entropy(leaf, label.expand(1, height, width), weight.expand(1, height, width),
                                              None, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, loss_row, rtol=1e-5, atol=0)
    for rows in (leaf.grad[:, :, -1:], leaf.grad[:, :, :1]):
        torch.testing.assert_close(rows.float() * height, row_leaf.grad.float(), rtol=2e-2 if dtype != torch.float32
                                   else 1e-5, atol=1e-6)
