"""Backend registry and resolution.

Each op has implementations registered per backend name:

- ``"reference"``: pure PyTorch, batched, float64-capable (always available).
- ``"triton"``: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"cpu"`` / ``"cuda"``: the C++/CUDA extension in ``csrc/`` (:mod:`csl_kernels.cpp`), built on the fly.

``backend="auto"`` picks the fastest available backend for the tensors' device, logs its choice once per
(op, device type) and says why a faster backend was skipped. A backend asked for by name raises
``RuntimeError`` with the reason when it cannot run.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable

import torch

log = logging.getLogger("csl_kernels")

BACKENDS = ("reference", "triton", "cpu", "cuda")
# Fastest first, per device type.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# Modules whose import registers the implementations of a backend.
_BACKEND_MODULES = {"triton": "csl_kernels.triton", "cpu": "csl_kernels.cpp", "cuda": "csl_kernels.cpp"}

_IMPLS: dict[str, dict[str, Callable]] = {}
_AVAILABILITY: dict[str, Callable[[torch.device], str | None]] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_AUTO_LOGGED: set[tuple[str, str]] = set()
# Resolutions made in eager mode, reused while torch.compile traces (the checks import modules and take locks).
_RESOLVED: dict[tuple[str, str, str], tuple[str, Callable]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the implementation of ``op`` for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def register_availability(backend: str, check: Callable[[torch.device], str | None]) -> None:
    """``check(device)`` returns None when ``backend`` can run on ``device``, else the reason it cannot."""
    _AVAILABILITY[backend] = check


def _load_backend_module(backend: str) -> str | None:
    module = _BACKEND_MODULES.get(backend)
    if module is None:
        return None
    if module in _IMPORT_ERRORS:
        return _IMPORT_ERRORS[module]
    if module in sys.modules:
        return None
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - the reason is reported to the user
        _IMPORT_ERRORS[module] = f"importing {module} failed: {type(exc).__name__}: {exc}"
        return _IMPORT_ERRORS[module]
    return None


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``; otherwise a human-readable reason."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got tensors on {device}"
    reason = _load_backend_module(backend)
    if reason is not None:
        return reason
    check = _AVAILABILITY.get(backend)
    if check is not None:
        reason = check(device)
        if reason is not None:
            return reason
    if backend not in _IMPLS.get(op, {}):
        return f"the {backend} backend does not implement {op}"
    return None


def is_available(op: str, backend: str, device: torch.device | str) -> bool:
    return unavailable_reason(op, backend, torch.device(device)) is None


def resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(backend_name, impl)`` for ``op`` on ``device``.

    While ``torch.compile`` traces, the resolution made for the same ``(op, backend, device type)`` in eager mode is
    reused, so a compiled function calling the public ops has no graph break (call it once eagerly first, or name a
    backend whose checks are traceable).
    """
    key = (op, backend, device.type)
    if torch.compiler.is_compiling() and key in _RESOLVED:
        return _RESOLVED[key]
    result = _resolve(op, backend, device)
    _RESOLVED[key] = result
    return result


def _resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    if backend != "auto":
        reason = unavailable_reason(op, backend, device)
        if reason is not None:
            raise RuntimeError(f"csl_kernels.{op}: backend {backend!r} is unavailable: {reason}")
        return backend, _IMPLS[op][backend]
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        reason = unavailable_reason(op, candidate, device)
        if reason is None:
            key = (op, device.type)
            if key not in _AUTO_LOGGED:
                _AUTO_LOGGED.add(key)
                note = "".join(f"; skipped {name}: {why}" for name, why in skipped)
                level = logging.WARNING if skipped else logging.INFO
                log.log(level, "csl_kernels.%s on %s: backend='auto' uses %r%s", op, device.type, candidate, note)
            return candidate, _IMPLS[op][candidate]
        skipped.append((candidate, reason))
    raise RuntimeError(f"csl_kernels.{op}: no backend available on {device}: {skipped}")
