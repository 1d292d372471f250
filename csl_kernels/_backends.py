"""Backend registry and resolution.

Each op has implementations registered per backend name:

- ``"reference"``: pure PyTorch, batched, float64-capable (always available).
- ``"triton"``: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"cpu"`` / ``"cuda"``: the C++/CUDA extension in ``csrc/`` (:mod:`csl_kernels.cpp`), built on the fly.

``backend="auto"`` picks the fastest available backend for the tensors' device, logs its choice once per
(op, device type) and says why a faster backend was skipped. A backend asked for by name raises
``RuntimeError`` with the reason when it cannot run. The environment variable ``CSL_BACKEND`` names the backend
that calls with ``backend="auto"`` use instead (as if named; unset, empty or ``auto``: the choice above).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

from ._env import EnvEquals, EnvValue

log = logging.getLogger("csl_kernels")
_triton_interpret = EnvEquals("TRITON_INTERPRET", "1")
_csl_backend = EnvValue("CSL_BACKEND")

BACKENDS = ("reference", "triton", "cpu", "cuda")
# Fastest first, per device type. On CUDA, pcos_weights and weighted_cross_entropy time both fused backends once
# per shape class instead (csl_kernels/_measured.py); the extension came first in every op timed on an H200 at C = 21.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Modules whose import registers the implementations of a backend.
_BACKEND_MODULES = {"triton": "csl_kernels.triton", "cpu": "csl_kernels.cpp", "cuda": "csl_kernels.cpp"}

_IMPLS: dict[str, dict[str, Callable]] = {}
_AVAILABILITY: dict[str, Callable[[torch.device], str | None]] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_AUTO_LOGGED: set[tuple[str, str]] = set()
_FORCED_LOGGED: set[tuple[str, str]] = set()  # (op, backend) that CSL_BACKEND named and was said
# Backend modules whose import finished (their implementations are all registered).
_IMPORTED: set[str] = set()
# {(op, backend, device, TRITON_INTERPRET for triton on cpu): impl} of the named backends found available: a backend
# that could run keeps running (its module stays imported, the device stays), so a repeated call is one lookup.
_NAMED: dict[tuple, Callable] = {}


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
    if module in _IMPORTED:  # not sys.modules: a module another thread is still importing is listed there
        return None
    try:
        importlib.import_module(module)  # waits while another thread imports it
    except Exception as exc:  # noqa: BLE001 - the reason is reported to the user
        _IMPORT_ERRORS[module] = f"importing {module} failed: {type(exc).__name__}: {exc}"
        return _IMPORT_ERRORS[module]
    _IMPORTED.add(module)
    return None


# Public ops whose backend runs another op's kernels: their availability and implementations are that op's.
_RUNS_KERNELS_OF = {"threshold_weights": "residual_features"}


def unavailable_reason(op: str, backend: str, device: torch.device | str) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``; otherwise a human-readable reason. ``"auto"`` always runs
    (it falls back to the reference, which runs on every device, and says so)."""
    device = torch.device(device)
    op = _RUNS_KERNELS_OF.get(op, op)
    if op not in _IMPLS:
        ops = sorted({*_IMPLS, *_RUNS_KERNELS_OF})
        return f"{op!r} is no op with backends; those are {', '.join(ops)}"
    if backend == "auto":
        return None
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}"
    if backend == "triton" and device.type == "cpu" and not _triton_interpret():
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


def log_choices_again() -> None:
    """Log each ``backend="auto"`` choice again at its next call (a new log file starts: every run's ``train.log``
    names the backends it used, also when one process trains several runs, as ``csl demo`` does)."""
    _AUTO_LOGGED.clear()
    _FORCED_LOGGED.clear()
    from . import _measured  # imports this module: imported here, not at the top

    _measured.log_choices_again()


def requested(backend: str) -> str:
    """The backend a call asks for: ``backend``, or for ``"auto"`` the one ``CSL_BACKEND`` names (a ValueError for a
    name that is not a backend)."""
    if backend != "auto":
        return backend
    forced = _csl_backend()
    if not forced or forced == "auto":
        return "auto"
    if forced not in BACKENDS:
        raise ValueError(f"CSL_BACKEND must be unset, 'auto' or one of {list(BACKENDS)}, got {forced!r}")
    return forced


def is_available(op: str, backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run ``op`` on ``device`` (:func:`unavailable_reason` says why not)."""
    return unavailable_reason(op, backend, device) is None


def resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(backend_name, impl)`` for ``op`` on ``device``. For a public op that runs another op's kernels
    (``_RUNS_KERNELS_OF``: ``threshold_weights`` runs those of ``residual_features``) that op's implementation, with
    the public op named in the ``auto`` log line and in the error.

    While ``torch.compile`` traces, the choice is made eagerly at trace time and becomes a constant of the graph
    (its checks import modules and take locks, which Dynamo cannot trace): a compiled function calling the public
    ops compiles with ``fullgraph=True`` also as the first call in a fresh process.
    """
    if torch.compiler.is_compiling():
        name = _backend_for_compile(op, backend, device.type)
        return name, _IMPLS[_RUNS_KERNELS_OF.get(op, op)][name]
    return _resolve(op, backend, device)


@torch.compiler.assume_constant_result
def _backend_for_compile(op: str, backend: str, device_type: str) -> str:
    return _resolve(op, backend, torch.device(device_type))[0]


def _resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    named = requested(backend)  # CSL_BACKEND names the backend of an auto call
    forced, backend = named != backend, named
    kernels = _RUNS_KERNELS_OF.get(op, op)
    if backend != "auto":
        key = (op, backend, device, backend == "triton" and device.type == "cpu" and _triton_interpret())
        impl = _NAMED.get(key)
        if impl is None:
            reason = unavailable_reason(op, backend, device)
            if reason is not None:
                runs = "" if kernels == op else f" runs the {kernels} kernels"
                named = " (named by CSL_BACKEND)" if forced else ""
                # a name that is no backend is the caller's mistake; a backend this machine cannot run is not
                error = ValueError if backend not in BACKENDS else RuntimeError
                raise error(f"csl_kernels.{op}{runs}: backend {backend!r}{named} is unavailable: {reason}")
            impl = _NAMED[key] = _IMPLS[kernels][backend]
        if forced and (op, backend) not in _FORCED_LOGGED:
            _FORCED_LOGGED.add((op, backend))
            log.info("csl_kernels.%s on %s: backend='auto' uses %r, as CSL_BACKEND names", op, device.type, backend)
        return backend, impl
    skipped = []
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        reason = unavailable_reason(op, candidate, device)
        if reason is None:
            key = (op, device.type)
            if key not in _AUTO_LOGGED:
                _AUTO_LOGGED.add(key)
                note = "".join(f"; skipped {name}: {why}" for name, why in skipped)
                level = logging.WARNING if skipped else logging.INFO
                name = op if kernels == op else f"{op} (the {kernels} kernels)"
                log.log(level, "csl_kernels.%s on %s: backend='auto' uses %r%s", name, device.type, candidate, note)
            return candidate, _IMPLS[kernels][candidate]
        skipped.append((candidate, reason))
    raise RuntimeError(f"csl_kernels.{op}: no backend available on {device}: {skipped}")
