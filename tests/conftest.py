"""Shared test parametrisation: every fused backend is tested against the float64 reference with the same cases.

A backend that cannot run here is skipped with its reason, unless it is named in ``CSL_REQUIRE_BACKENDS``
(comma-separated; CI sets it) — then the test fails, so a broken build cannot hide behind a skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from csl_kernels import unavailable_reason

FUSED_BACKENDS = ("triton", "cpu", "cuda")


def backend_device(backend: str) -> torch.device:
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def required_backends() -> set[str]:
    return {b.strip() for b in os.environ.get("CSL_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def require_backend(op: str, backend: str) -> torch.device:
    """Return the device to test ``backend`` on, or skip (fail if required) when it cannot run ``op``."""
    device = backend_device(backend)
    if backend == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        reason = unavailable_reason(op, backend, device)
    if reason is not None:
        if backend in required_backends():
            pytest.fail(f"required backend {backend!r} unavailable for {op}: {reason}")
        pytest.skip(f"{backend} unavailable for {op}: {reason}")
    return device


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
