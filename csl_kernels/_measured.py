"""``backend="auto"`` on a CUDA device for the ops whose fastest backend depends on the shape (``pcos_weights``,
``weighted_cross_entropy``): each backend that can run is timed per GPU model, op and shape class (and, for
``pcos_weights``, group mode) on the call's own inputs, in :data:`TIMING_ROUNDS` interleaved rounds, and the one with
the lower median is used from then on.

Measured on an H200 (``docs/results/gpu-check/2026-11-30-h200``): at B16 C21 321 x 321 bf16 the extension's
``pcos_weights`` takes 0.29 ms and Triton's 0.70 ms, the weighted CE forward + backward 0.33 and 1.09 ms; at C = 81
(coco513) Triton's PCOS is the faster one. A fixed order would pick the slower one for one of them.

The choice is logged (INFO: with both timings when measured; a cached one at its first use in a process and in each
run's log) and kept, per GPU model, torch and Triton version, in ``$XDG_CACHE_HOME/csl/auto-backend.json``
(``CSL_AUTO_CACHE`` elsewhere), beside the Triton launch tuning. No timing happens while a CUDA graph is captured
(a cached choice is used, else the static order of ``_backends.AUTO_ORDER``) or while ``torch.compile`` traces (the
static order, not the cached choice: the cache is a file, which a trace does not read).
A backend named with ``backend=`` (or ``kernels.backend`` in the trainer) is used as it is.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from . import _backends
from ._paths import cache_dir

log = logging.getLogger("csl_kernels")

CANDIDATES = ("cuda", "triton")
# Each backend is timed this many times, the backends taking turns; the median decides. On the H200 of 2026-12-04 one
# measurement took Triton's PCOS at B16 C21 321 x 321 (0.245 ms against the extension's 0.272) while the benchmark
# timed it at 0.235-0.485 ms over six runs and the extension at 0.267-0.272.
TIMING_ROUNDS = 3
ENV_CACHE = "CSL_AUTO_CACHE"
_lock = threading.Lock()
_choices: dict[str, str] | None = None
# {(op, device, dtype, shape, variant): backend} of the calls resolved since the choices were loaded: a repeated
# call's lookup (its cache key is a string built from the GPU name, the shape class and the variant).
_by_shape: dict[tuple, str] = {}
# The same keys: what was timed for a choice made in this process (read by csl_bench.bench_auto_choice).
_measurements: dict[tuple, dict] = {}
# Cache keys whose choice this process has logged (a choice read from the cache file is logged at its first use).
_logged: set[str] = set()


def log_choices_again() -> None:
    """See :func:`csl_kernels._backends.log_choices_again`."""
    with _lock:
        _logged.clear()
        _by_shape.clear()  # the next call of each shape goes past the fast lookup, to the log


def forget_choices() -> None:
    """Drops the choices read from the cache file and the calls resolved with them: the next ``auto`` call reads
    :func:`cache_path` again (for a process that points ``CSL_AUTO_CACHE`` at another file, as
    ``csl_bench.bench_auto_choice`` does; the file is read once per process otherwise)."""
    global _choices
    with _lock:
        _choices = None
        _by_shape.clear()
        _logged.clear()


def cache_path() -> Path:
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    return cache_dir() / "auto-backend.json"


def _load() -> dict[str, str]:
    global _choices
    if _choices is None:
        _by_shape.clear()
        try:
            _choices = {k: v for k, v in json.loads(cache_path().read_text()).items() if v in CANDIDATES}
        except (OSError, ValueError, AttributeError):
            _choices = {}
    return _choices


def _store(key: str, name: str) -> None:
    choices = _load()
    choices[key] = name
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choices, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measured again in the next process
        log.debug("could not write %s: %s", path, exc)


@functools.cache
def _device_name(index: int | None) -> str:
    """The GPU model and the torch and Triton versions: a choice measured with other kernels' compilers or another
    PyTorch is measured again."""
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # noqa: BLE001 - not installed (no Triton backend), or no metadata
        triton_version = "none"
    return f"{torch.cuda.get_device_name(index)}, torch {torch.__version__}, triton {triton_version}"


def shape_class(t: torch.Tensor) -> str:
    """Calls whose dtype and class count agree and whose pixel counts round to the same power of two share a choice."""
    pixels = t.numel() // max(t.shape[1], 1)
    return f"{str(t.dtype).removeprefix('torch.')} C{t.shape[1]} px2^{max(pixels - 1, 1).bit_length()}"


def time_ms(run: Callable[[], object], device: torch.device) -> float:
    """Milliseconds per call of ``run()`` on ``device``'s current stream with the calls queued back to back, as a
    training loop makes them: the device's time, or the host's where it issues a call slower than the device runs
    it (a call timed alone on an idle stream would also count the host's work before its first launch, every
    time). 2 warm-up calls, one call to size the rounds, then the median of 3-5 rounds of up to 25 calls (about
    30 ms in all)."""
    for _ in range(2):
        run()
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)
        calls = max(1, min(25, int(6.0 / one)))
        times = []
        for _ in range(max(3, min(5, int(30.0 / (one * calls))))):
            start.record()
            for _ in range(calls):
                run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2]


def last_measurement(op: str, device: torch.device, key_tensor: torch.Tensor, variant: str = "") -> dict | None:
    """What this process measured for the last timed choice of ``op`` with ``key_tensor``'s shape and dtype (the
    arguments of :func:`resolve`): ``{"shape_class", "median_ms": {backend: ms}, "rounds_ms", "failed", "chosen"}``;
    None where nothing was timed (a cached choice, a CPU device, a named backend)."""
    return _measurements.get((op, device, key_tensor.dtype, key_tensor.shape, variant))


def last_choice(op: str, device: torch.device, key_tensor: torch.Tensor, variant: str = "") -> str | None:
    """The backend that ``backend="auto"`` took for the last call of ``op`` on ``device`` with ``key_tensor``'s shape
    and dtype (the arguments of :func:`resolve`), without timing anything; None where no such call was resolved by
    measurement (a CPU device, a named backend, fewer than two fused backends)."""
    return _by_shape.get((op, device, key_tensor.dtype, key_tensor.shape, variant))


def _capturing_on(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (not the current device's: a capture on
    another GPU must not be timed into)."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def resolve(op: str, backend: str, device: torch.device, key_tensor: torch.Tensor,
            run: Callable[[Callable], object], timer: Callable[[Callable[[], object], torch.device], float] = time_ms,
            variant: str = "") -> tuple[str, Callable]:
    """:func:`csl_kernels._backends.resolve`, but for ``backend="auto"`` on CUDA the measured faster of
    :data:`CANDIDATES` (``run(impl)`` calls ``impl`` on the op's inputs; the results of the timing calls are
    dropped). ``variant`` names options that change the op's cost (PCOS's image or class groups): calls that differ
    in it are timed and cached apart. A backend that raises on the call is skipped (WARNING, with its error) and the
    choice is then not cached."""
    if (backend != "auto" or device.type != "cuda" or torch.compiler.is_compiling()
            or _backends.requested(backend) != "auto"):  # a named backend, or one that CSL_BACKEND names
        return _backends.resolve(op, backend, device)
    fast_key = (op, device, key_tensor.dtype, key_tensor.shape, variant)
    if _choices is not None:
        name = _by_shape.get(fast_key)
        if name is not None:
            return name, _backends._IMPLS[op][name]
    available = [b for b in CANDIDATES if _backends.unavailable_reason(op, b, device) is None]
    if len(available) < 2:
        return _backends.resolve(op, backend, device)
    calls = shape_class(key_tensor) + (f" {variant}" if variant else "")
    key = f"{op} | {_device_name(device.index)} | {calls}"
    with _lock:
        name = _load().get(key)
        if name is None:
            if _capturing_on(device):  # no timing inside a capture: the static order
                return _backends.resolve(op, backend, device)
            rounds: dict[str, list[float]] = {}
            failed: dict[str, str] = {}
            for r in range(TIMING_ROUNDS):  # interleaved, the order reversed every round: a drift hits both alike
                for b in available if r % 2 == 0 else available[::-1]:
                    if b in failed:
                        continue
                    try:
                        rounds.setdefault(b, []).append(timer(lambda impl=_backends._IMPLS[op][b]: run(impl), device))
                    except Exception as exc:  # noqa: BLE001 - a backend that cannot take this call is skipped, and said so
                        failed[b] = f"{type(exc).__name__}: {exc}"
                        rounds.pop(b, None)
            timings = {b: sorted(t)[len(t) // 2] for b, t in rounds.items()}
            if not timings:
                raise RuntimeError(f"csl_kernels.{op}: backend='auto' found no backend that runs this call: "
                                   + "; ".join(f"{b}: {why}" for b, why in failed.items()))
            name = min(timings, key=timings.get)
            if len(_measurements) >= 4096:
                _measurements.clear()
            _measurements[fast_key] = {"shape_class": calls, "median_ms": timings, "rounds_ms": rounds,
                                       "failed": failed, "chosen": name}
            measured = ", ".join(f"{b} {t:.3f} ms" for b, t in sorted(timings.items(), key=lambda kv: kv[1]))
            where = key.split(" | ")[1] + f" ({calls})"
            if failed:  # not cached: other calls of this shape class may run on every backend
                log.warning("csl_kernels.%s on %s: backend='auto' uses %r, measured %s; skipped %s", op, where, name,
                            measured, "; ".join(f"{b}: {why}" for b, why in failed.items()))
            else:
                log.info("csl_kernels.%s on %s: backend='auto' uses %r, measured %s (cached in %s)", op, where, name,
                         measured, cache_path())
                _store(key, name)
        elif key not in _logged:
            log.info("csl_kernels.%s on %s: backend='auto' uses %r (measured earlier, cached in %s)", op,
                     key.split(" | ")[1] + f" ({calls})", name, cache_path())
        _logged.add(key)
        if len(_by_shape) >= 4096:
            _by_shape.clear()
        _by_shape[fast_key] = name
    return name, _backends._IMPLS[op][name]
