"""Launch configurations of the Triton kernels: tuned per GPU on first use and remembered on disk.

Each tunable launcher declares a :class:`Tunable`: a few candidate :class:`Config` s (pixels x classes per program
tile, ``num_warps``) and a default. On a CUDA device, the first call with a new key (op, dtype, classes, layout,
pixel-count bucket) runs every candidate once (compilation), times each on the call's own inputs with CUDA events
(median of 3-50 runs, :func:`timer`), keeps the fastest and writes it to a JSON cache with
one section per GPU model and Triton version, so later processes on that machine skip the timing. The choice is
logged once at INFO on the ``csl_kernels`` logger.

Environment:

- ``CSL_TRITON_AUTOTUNE``: ``1`` (default) tunes as above; ``0`` always launches the defaults.
- ``CSL_TUNING_CACHE``: the cache file (default ``$XDG_CACHE_HOME/csl/triton-tuning.json``, else
  ``~/.cache/csl/triton-tuning.json``). It is rewritten atomically; a corrupt or unreadable file is reported and
  replaced, an unwritable one only costs re-tuning in the next process.

Numerics: the feature, trusted-mask and cross-entropy gradient kernels compute every pixel independently, so every
candidate gives bitwise the same outputs. Reductions are not reordered across chunks either (a PCOS chunk is a fixed
number of pixels whatever the tile), but inside a chunk / program the order of the float64 PCOS sums and of the
cross-entropy partial losses follows the tile, so the loss and the PCOS statistics may differ in the last bits
between candidates (tests/test_triton_tuning.py bounds it). Set ``CSL_TRITON_AUTOTUNE=0`` for results that are
bitwise the same on every machine.

Float64 inputs always get one fixed configuration (``Tunable.float64``: the default unless a launcher names a smaller
tile). No timing happens while a CUDA graph is being captured (the cached choice or the default is launched), on CPU
tensors (the interpreter's timings mean nothing) or for a candidate that fails to compile (it is skipped and logged).
Every candidate is compiled for sm_90 by ``python -m csl_kernels.triton.compile_check`` and held to at most
``MAX_SPILL_BYTES`` (16 B) of spill stores per thread by tests/test_triton_compile.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import triton

from .._env import EnvEquals
from .._paths import cache_dir
from ._common import next_pow2

log = logging.getLogger("csl_kernels")

ENV_MODE = "CSL_TRITON_AUTOTUNE"
_autotune_on = EnvEquals(ENV_MODE, "1", default="1")  # the per-call test; autotune_enabled() checks the value
ENV_CACHE = "CSL_TUNING_CACHE"
CACHE_FORMAT = 1
# Time budgets per candidate (milliseconds): a few runs of a kernel of 0.1-5 ms.
WARMUP_MS = 5
REP_MS = 20

T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """``tile``: elements of one program's tile (pixels x class tile, or pixels); ``num_warps`` per program."""

    tile: int
    num_warps: int

    @property
    def name(self) -> str:
        return f"tile={self.tile},warps={self.num_warps}"

    def as_dict(self) -> dict:
        return {"tile": self.tile, "num_warps": self.num_warps}


class Tunable:
    """The candidate launch configurations of one launcher; :meth:`pick` chooses one for a call."""

    def __init__(self, name: str, default: Config, candidates: Sequence[Config], float64: Config | None = None):
        """``float64``: the configuration of float64 inputs (the accuracy path, never timed; its 8-byte values take
        twice the registers), ``default`` unless given."""
        float64 = default if float64 is None else float64
        for role, config in (("default", default), ("float64 configuration", float64)):
            if config not in candidates:
                raise ValueError(f"{name}: the {role} {config.name} is not among the candidates")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"{name}: repeated candidates")
        self.name = name
        self.default = default
        self.float64 = float64
        self.candidates = tuple(candidates)
        TUNABLES[name] = self

    def untimed(self, inputs: torch.Tensor) -> Config | None:
        """The configuration of a call that neither the cache nor a timing decides (float64 inputs, a forced
        configuration, autotuning off), else None."""
        if inputs.dtype == torch.float64:
            return self.float64
        forced = _FORCED.get(self.name)
        if forced is not None:
            return forced
        return None if autotune_enabled() else self.default

    def pick(self, key: str, inputs: torch.Tensor, launch: Callable[[Config], object]) -> Config:
        """The configuration to launch for ``key`` (a call on ``inputs``); may time ``launch(config)`` for each
        candidate."""
        fixed = self.untimed(inputs)
        if fixed is not None:
            return fixed
        device = inputs.device
        timing = tunes_on(device)
        if not (timing or caches_on(device)):
            return self.default
        section = device_section(device)
        with _LOCK:
            cached = _cached(self, section, key)
            if cached is not None:
                return cached
            if not timing:  # inside a CUDA-graph capture: the cached choice, else the default; never a timing
                return self.default
            # The timer records events on the current stream: make it the inputs' device's.
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                best, times = self._tune(section, key, launch)
            _remember(self, section, key, best, times)
            return best

    def _tune(self, section: str, key: str, launch: Callable[[Config], object]) -> tuple[Config, dict[str, float]]:
        log.info("csl_kernels: tuning %s for %s on %s: %d candidates, once per GPU model (cached in %s)", self.name,
                 key, section, len(self.candidates), cache_path())
        times: dict[Config, float] = {}
        errors: dict[Config, str] = {}
        for config in self.candidates:
            try:
                launch(config)  # compiles
                times[config] = float(timer(lambda c=config: launch(c), config))
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is skipped and reported
                errors[config] = f"{type(exc).__name__}: {exc}"
                log.warning("csl_kernels: %s candidate %s failed on %s and is skipped: %s", self.name, config.name,
                            section, errors[config])
        if not times:
            raise RuntimeError(f"{self.name}: no launch configuration ran on {section} for {key}: "
                               + "; ".join(f"{c.name}: {e}" for c, e in errors.items()))
        best = min(times, key=times.get)
        default_ms = times.get(self.default)
        log.info("csl_kernels: tuned %s for %s on %s: %s (%.4f ms; default %s %s)", self.name, key, section,
                 best.name, times[best], self.default.name,
                 "failed" if default_ms is None else f"{default_ms:.4f} ms")
        return best, {c.name: round(t, 6) for c, t in times.items()}


TUNABLES: dict[str, Tunable] = {}
_FORCED: dict[str, Config] = {}
_LOCK = threading.RLock()
# Per cache file: its sections as read from disk (plain JSON, decoded on first use).
_FILE: dict[str, dict] = {}
# Per cache file: {section: {"<tunable>|<key>": Config}}, the choices this process used or made.
_MEMORY: dict[str, dict[str, dict[str, Config]]] = {}
# Per cache file: {(section, "<tunable>|<key>"): {config name: milliseconds}} of the timings this process made.
_TIMES: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
_WARNED: set[str] = set()
# {(tunable, shape, strides, dtype, device, extra): Config} of the tuned calls this process made (tuned()).
_PICKED: dict[tuple, Config] = {}
MAX_PICKED = 4096


def autotune_enabled() -> bool:
    value = os.environ.get(ENV_MODE, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_MODE} must be 0 (always the default launch configurations) or 1 (tune on CUDA "
                         f"devices and cache the choice), got {value!r}")
    return value == "1"


def caches_on(device: torch.device) -> bool:
    """Whether calls on ``device`` use the tuning cache: CUDA devices (CPU tensors always get the default)."""
    return device.type == "cuda"


def tunes_on(device: torch.device) -> bool:
    """Whether calls on ``device`` are timed: CUDA devices, except while a CUDA graph is being captured."""
    if device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def timer(fn: Callable[[], object], config: Config) -> float:
    """Milliseconds of one ``fn()`` on the current CUDA stream: the median of enough runs to fill ``REP_MS`` (3 to
    50), after runs that fill ``WARMUP_MS``. CUDA events only: unlike ``triton.testing.do_bench`` this allocates no
    256 MB L2-flush buffer, which a training process near its memory limit may not have (the inputs tuned for are
    larger than the L2 anyway)."""
    del config
    stream = torch.cuda.current_stream()
    first = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first[0].record(stream)
    fn()
    first[1].record(stream)
    first[1].synchronize()
    estimate = max(first[0].elapsed_time(first[1]), 1e-3)
    for _ in range(min(50, int(WARMUP_MS / estimate))):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(3, min(50, int(REP_MS / estimate))))]
    for begin, end in events:
        begin.record(stream)
        fn()
        end.record(stream)
    events[-1][1].synchronize()
    times = sorted(begin.elapsed_time(end) for begin, end in events)
    return times[len(times) // 2]


def device_section(device: torch.device) -> str:
    """The cache section of ``device``: GPU model, compute capability and Triton version."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}), triton {triton.__version__}"
    return f"{device.type}, triton {triton.__version__}"


def cache_path() -> Path:
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    return cache_dir() / "triton-tuning.json"


def pixel_bucket(pixels: int) -> int:
    """Calls whose pixel counts round to the same power of two share a tuned configuration."""
    return next_pow2(max(1, int(pixels)))


def call_key(t: torch.Tensor, extra: str = "") -> str:
    """The tuning key of a call on the B x C x H x W tensor ``t``: dtype, C, memory layout, pixel-count bucket."""
    bsz, channels, h, w = t.shape
    if t.is_contiguous():
        layout = "nchw"
    elif t.is_contiguous(memory_format=torch.channels_last):
        layout = "nhwc"
    else:
        layout = "strided"
    return f"{str(t.dtype).removeprefix('torch.')},C={channels},{layout},px<={pixel_bucket(bsz * h * w)}{extra}"


def tuned(tunable: Tunable, inputs: torch.Tensor, launch: Callable[[Config], T], extra: str = "") -> T:
    """``launch(config)`` with the configuration :meth:`Tunable.pick` chooses for a call on ``inputs`` (B x C x H x W;
    ``extra`` distinguishes calls of other kinds on the same inputs).

    A call repeats the previous calls' shapes: the choice is remembered per (shape, strides, dtype, device), so a
    repeated call looks up one dict entry instead of building its cache key."""
    fast_key = (tunable.name, inputs.shape, inputs.stride(), inputs.dtype, inputs.device, extra)
    # The common call: nothing forced, autotuning on as by default, a shape seen before (one environment read and
    # one dict lookup; what is forced or the mode can change between calls, so neither is remembered).
    if not _FORCED and _autotune_on():
        config = _PICKED.get(fast_key)
        if config is not None:
            return launch(config)
    fixed = tunable.untimed(inputs)
    if fixed is not None:
        return launch(fixed)
    config = _PICKED.get(fast_key)
    if config is None:
        config = tunable.pick(call_key(inputs, extra), inputs, launch)
        # Inside a CUDA-graph capture the choice may be the untuned default: not remembered.
        if inputs.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            if len(_PICKED) >= MAX_PICKED:
                _PICKED.clear()
            _PICKED[fast_key] = config
    return launch(config)


@contextlib.contextmanager
def forced(configs: dict[str, Config] | int) -> Iterator[None]:
    """Launch fixed configurations inside the block: ``{tunable name: config}``, or an index ``i`` meaning every
    tunable's ``candidates[i % len(candidates)]`` (how the tests and the compile check reach every candidate)."""
    if isinstance(configs, int):
        configs = {name: t.candidates[configs % len(t.candidates)] for name, t in TUNABLES.items()}
    for name, config in configs.items():
        if name not in TUNABLES:
            raise KeyError(f"unknown tunable {name!r}; known: {sorted(TUNABLES)}")
        if config not in TUNABLES[name].candidates:
            raise ValueError(f"{config.name} is not a candidate of {name}")
    saved = dict(_FORCED)
    _FORCED.update(configs)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def chosen() -> dict[str, dict[str, dict]]:
    """The choices this process used or made: ``{section: {"<tunable>|<key>": {"tile", "num_warps"[, "times_ms"]}}}``
    (``times_ms``: every candidate's time, for the choices timed in this process)."""
    with _LOCK:
        path = str(cache_path())
        sections = _MEMORY.get(path, {})
        times = _TIMES.get(path, {})
        out: dict[str, dict[str, dict]] = {}
        for section, entries in sections.items():
            for key, config in entries.items():
                record = config.as_dict()
                if (section, key) in times:
                    record["times_ms"] = times[(section, key)]
                out.setdefault(section, {})[key] = record
        return out


def forget() -> None:
    """Drop what this process remembers (the file stays); the next call reads the cache file again."""
    with _LOCK:
        _FILE.clear()
        _MEMORY.clear()
        _TIMES.clear()
        _WARNED.clear()
        _PICKED.clear()


# ---------------------------------------------------------------------------------------------------------- cache


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("csl_kernels: %s", message)


def _read_file(path: Path) -> dict:
    """The file's sections as plain JSON (``{}`` when missing; reported and ignored when unreadable)."""
    try:
        text = path.read_bytes()  # bytes that are not UTF-8 fail in json.loads (a ValueError), as any invalid file
    except FileNotFoundError:
        return {}
    except OSError as exc:
        _warn_once(f"cannot read the tuning cache {path} ({exc}); tuning again")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data["sections"], dict):
            raise ValueError(f"expected {{'format': {CACHE_FORMAT}, 'sections': {{...}}}}")
        return data["sections"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        _warn_once(f"the tuning cache {path} is not valid ({exc}); it will be replaced")
        return {}


def _decode(tunable: Tunable, entry: object) -> Config | None:
    """The stored configuration if it is still one of the candidates (candidate lists change between versions)."""
    try:
        config = Config(int(entry["tile"]), int(entry["num_warps"]))
    except (TypeError, KeyError, ValueError, OverflowError):  # OverflowError: a tile of Infinity or 1e400
        return None
    return config if config in tunable.candidates else None


def _cached(tunable: Tunable, section: str, key: str) -> Config | None:
    path = str(cache_path())
    name = f"{tunable.name}|{key}"
    config = _MEMORY.get(path, {}).get(section, {}).get(name)
    if config is not None:
        return config
    if path not in _FILE:
        _FILE[path] = _read_file(Path(path))
    entries = _FILE[path].get(section)
    config = _decode(tunable, entries.get(name)) if isinstance(entries, dict) else None
    if config is not None:
        _MEMORY.setdefault(path, {}).setdefault(section, {})[name] = config
    return config


def _remember(tunable: Tunable, section: str, key: str, config: Config, times: dict[str, float]) -> None:
    path = cache_path()
    _MEMORY.setdefault(str(path), {}).setdefault(section, {})[f"{tunable.name}|{key}"] = config
    _TIMES.setdefault(str(path), {})[(section, f"{tunable.name}|{key}")] = times
    # Merge with what other processes may have written since this one read the file, then replace it atomically.
    sections = _read_file(path)
    sections.setdefault(section, {})
    if not isinstance(sections[section], dict):
        sections[section] = {}
    sections[section][f"{tunable.name}|{key}"] = {**config.as_dict(), "times_ms": times}
    payload = json.dumps({"format": CACHE_FORMAT, "sections": sections}, indent=1, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        _warn_once(f"cannot write the tuning cache {path} ({exc}); choices are kept for this process only")

