"""Shared benchmark machinery: shapes, inputs, provider registry, timing, memory, bandwidth floor, JSON/markdown."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from csl_kernels import IGNORE_INDEX, unavailable_reason

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Every provider is reported for every op, in this order; one that cannot run is listed with its reason.
PROVIDERS = ("official", "eager", "compile", "triton", "cuda", "cpu")
FUSED = ("triton", "cuda", "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    classes: int
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.batch * self.height * self.width

    def dims(self) -> dict:
        return {"B": self.batch, "C": self.classes, "H": self.height, "W": self.width}


SHAPES = {
    "gpu": (Shape("voc321", 16, 21, 321, 321), Shape("voc513", 8, 21, 513, 513),
            Shape("city801", 4, 19, 801, 801), Shape("coco513", 8, 81, 513, 513)),
    # The CPU goal shape of issue 3 and a smaller one.
    "cpu": (Shape("cpu321", 4, 21, 321, 321), Shape("cpu161", 2, 21, 161, 161)),
    "smoke": (Shape("smoke", 2, 5, 17, 19),),
}
SUITE_DTYPES = {"gpu": ("fp32", "bf16"), "cpu": ("fp32", "bf16"), "smoke": ("fp32",)}


@dataclass
class Settings:
    """What one run measures: the device, the suite (gpu | cpu | smoke), shapes, dtypes, timing budget."""

    device: torch.device
    suite: str
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    providers: tuple[str, ...] = PROVIDERS
    use_compile: bool = True
    warmup_s: float = 0.1
    rep_s: float = 0.5
    min_reps: int = 3
    max_reps: int = 200
    copy_gbps: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


# ----------------------------------------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="shape names (gpu: voc321 voc513 city801 coco513; cpu: cpu321 cpu161; smoke) or "
                             "custom BxCxHxW, e.g. 4x21x321x321")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                        help="restrict the providers that run (the others are listed as not selected)")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, short timing (CI)")
    parser.add_argument("--no-compile", action="store_true", help="list the compile provider as skipped")
    parser.add_argument("--rep-s", type=float, default=None, help="timing budget per provider in seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")


def parse_shape(text: str) -> Shape:
    for suite in SHAPES.values():
        for shape in suite:
            if shape.name == text:
                return shape
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", text)
    if not match:
        known = sorted({s.name for suite in SHAPES.values() for s in suite})
        raise SystemExit(f"--shapes: unknown shape {text!r}; expected one of {known} or BxCxHxW")
    b, c, h, w = (int(g) for g in match.groups())
    return Shape(text, b, c, h, w)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    suite = "smoke" if args.smoke else ("gpu" if device.type == "cuda" else "cpu")
    shapes = tuple(parse_shape(s) for s in args.shapes) if args.shapes else SHAPES[suite]
    dtypes = tuple(args.dtypes) if args.dtypes else SUITE_DTYPES[suite]
    rep_s = args.rep_s if args.rep_s is not None else {"gpu": 1.0, "cpu": 1.0, "smoke": 0.0}[suite]
    settings = Settings(
        device=device, suite=suite, shapes=shapes, dtypes=dtypes,
        providers=tuple(args.providers) if args.providers else PROVIDERS,
        use_compile=not args.no_compile and not args.smoke,
        warmup_s=0.0 if suite == "smoke" else 0.1, rep_s=rep_s,
        min_reps=1 if suite == "smoke" else (10 if device.type == "cuda" else 3),
        max_reps=1 if suite == "smoke" else 200,
    )
    return settings


# ------------------------------------------------------------------------------------------------------- inputs


def make_logits(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Segmentation-like logits: blobs of classes, confident regions and ambiguous ones (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape.batch, shape.classes, shape.height, shape.width
    cells = torch.randint(0, c, (b, 1, h // 24 + 1, w // 24 + 1), generator=g).float()
    label = F.interpolate(cells, size=(h, w), mode="nearest").long()
    margin = F.interpolate(torch.rand(b, 1, h // 16 + 2, w // 16 + 2, generator=g), size=(h, w),
                           mode="bilinear", align_corners=False) * 12.0
    logits = torch.randn(b, c, h, w, generator=g) * 1.5
    logits.scatter_add_(1, label, margin)
    return logits.to(device=device, dtype=dtype)


def make_ignore(shape: Shape, device: torch.device) -> torch.Tensor:
    """int64 ``B x H x W`` as UniMatch's data loaders give it: 255 on a padded right/bottom border of odd images."""
    ignore = torch.zeros(shape.batch, shape.height, shape.width, dtype=torch.int64)
    ignore[1::2, :, shape.width - shape.width // 8:] = IGNORE_INDEX
    ignore[1::2, shape.height - shape.height // 10:, :] = IGNORE_INDEX
    return ignore.to(device)


def clone_inputs(inputs: tuple) -> tuple:
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            out.append(y.requires_grad_(x.requires_grad))
        else:
            out.append(x)
    return tuple(out)


def tensor_bytes(inputs: tuple) -> int:
    return sum(x.numel() * x.element_size() for x in inputs if isinstance(x, torch.Tensor))


def rotating_buffers(inputs: tuple, device: torch.device) -> list[tuple]:
    """Enough independent copies of the inputs that cycling through them defeats the GPU L2 cache."""
    if device.type != "cuda":
        return [inputs]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    size = max(1, tensor_bytes(inputs))
    count = min(8, max(2, math.ceil(4 * l2 / size)))
    free, _ = torch.cuda.mem_get_info(device)
    count = max(1, min(count, int(0.3 * free // size)))
    return [inputs] + [clone_inputs(inputs) for _ in range(count - 1)]


# ------------------------------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*cmd: str) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    dirty = _git("status", "--porcelain", "--", "csl_kernels", "csrc", "bench", "csl")
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_runtime": torch.version.cuda,
        "cuda_driver_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_name": cpu_name(),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def show_kernel_log() -> None:
    """Print the kernels' log lines (backend choices, fallbacks, launch-configuration tuning) while benchmarks run."""
    logger = logging.getLogger("csl_kernels")
    if not any(getattr(h, "_bench_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  [%(name)s] %(message)s"))
        handler._bench_handler = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def triton_tuning() -> dict:
    """How the Triton kernels were launched in this process: autotune mode, cache file and every configuration
    chosen (with each candidate's time where this process timed them; csl_kernels/triton/tuning.py)."""
    try:
        from csl_kernels.triton import tuning
    except ImportError as exc:
        return {"error": str(exc)}
    return {"autotune": os.environ.get(tuning.ENV_MODE, "1"), "cache": str(tuning.cache_path()),
            "chosen": tuning.chosen()}


# ------------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times_ms: list[float]) -> dict:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"median": q[1], "q20": q[0], "q80": q[2], "min": float(t.min()), "mean": float(t.mean()),
            "reps": len(times_ms)}


def plan_reps(fn: Callable, buffers: list[tuple], settings: Settings) -> tuple[int, int]:
    """``(n_warmup, n_rep)`` from one timed call and the time budget, the way ``triton.testing.do_bench`` does."""
    synchronize(settings.device)
    start = time.perf_counter()
    fn(*buffers[0])
    synchronize(settings.device)
    estimate = max(time.perf_counter() - start, 1e-6)
    n_warmup = min(50, int(settings.warmup_s / estimate)) if settings.warmup_s > 0 else 0
    n_rep = max(settings.min_reps, min(settings.max_reps, int(settings.rep_s / estimate)))
    return n_warmup, n_rep


def time_calls(fn: Callable, buffers: list[tuple], count: int, device: torch.device, offset: int = 0) -> list[float]:
    """Milliseconds of ``count`` calls ``fn(*buffers[i % len])``: CUDA events on GPU, perf_counter on CPU.

    The input buffers rotate so the cache does not flatter."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for i, (begin, end) in enumerate(events):
            args = buffers[(offset + i) % len(buffers)]
            begin.record()
            fn(*args)
            end.record()
        torch.cuda.synchronize(device)
        return [b.elapsed_time(e) for b, e in events]
    times = []
    for i in range(count):
        args = buffers[(offset + i) % len(buffers)]
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_fn(fn: Callable, buffers: list[tuple], settings: Settings) -> dict:
    """Median and 20/80 quantiles (ms) of one function after warm-up."""
    n_warmup, n_rep = plan_reps(fn, buffers, settings)
    time_calls(fn, buffers, n_warmup, settings.device)
    return _quantiles(time_calls(fn, buffers, n_rep, settings.device))


def bench_interleaved(fns: dict[str, Callable], buffers: list[tuple], settings: Settings, rounds: int = 5
                      ) -> dict[str, dict]:
    """Time several providers side by side: after each one's warm-up, ``rounds`` rounds in which every provider
    runs its share of repetitions, so a change of load on a shared machine hits them all alike."""
    plans = {}
    for name, fn in fns.items():
        n_warmup, n_rep = plan_reps(fn, buffers, settings)
        time_calls(fn, buffers, n_warmup, settings.device)
        plans[name] = n_rep
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            share = plans[name] // rounds + (1 if r < plans[name] % rounds else 0)
            if share:
                times[name] += time_calls(fn, buffers, share, settings.device, offset=len(times[name]))
    return {name: _quantiles(t) for name, t in times.items()}


def peak_memory(fn: Callable, args: tuple, device: torch.device) -> dict:
    """CUDA: peak bytes allocated during one call, in total and above what was allocated before it (inputs)."""
    if device.type != "cuda":
        return {"peak_bytes": None, "extra_bytes": None,
                "note": "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)"}
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return {"peak_bytes": int(peak), "extra_bytes": int(peak - base)}


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> dict:
    """Measured copy bandwidth (read + write bytes per second), the floor every op is compared with."""
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    settings = Settings(device=device, suite="", shapes=(), dtypes=(), warmup_s=0.05, rep_s=0.5, min_reps=5,
                        max_reps=100)
    timing = bench_fn(lambda s, d: d.copy_(s), [(src, dst)], settings)
    del src, dst
    gbps = 2 * nbytes / (timing["median"] * 1e-3) / 1e9
    return {"gbps": gbps, "bytes": nbytes, "time_ms": timing["median"],
            "what": "device-to-device copy, read + write bytes" if device.type == "cuda" else "CPU memcpy"}


# --------------------------------------------------------------------------------------------------- op runner


ProviderFn = Callable[..., Any]


@dataclass
class OpSpec:
    """One benchmarked op. ``providers(settings, shape)`` returns name -> callable, or name -> reason string.

    Every callable takes the op's inputs and returns a tuple of tensors normalised across providers, so
    ``compare(out, eager_out, inputs)`` can report the deviation from the reference backend.
    """

    name: str
    make_inputs: Callable[[Shape, torch.dtype, torch.device], tuple]
    floor_bytes: Callable[[Shape, torch.dtype], int]
    providers: Callable[[Settings, Shape], dict[str, ProviderFn | str]]
    compare: Callable[[tuple, tuple, tuple], dict]
    description: str = ""


def fused_provider(op: str, backend: str, settings: Settings, shape: Shape, call: Callable[[str], ProviderFn]
                   ) -> ProviderFn | str:
    """The public API with ``backend=...``, or the reason it cannot run here (never silently dropped)."""
    device = settings.device
    if backend == "triton" and device.type == "cpu" and settings.suite != "smoke":
        return ("triton on CPU tensors runs only under the interpreter (TRITON_INTERPRET=1), which is not a "
                "performance path; it is exercised by --smoke only")
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        return reason
    return call(backend)


def compile_provider(settings: Settings, build: Callable[[], ProviderFn]) -> ProviderFn | str:
    if not settings.use_compile:
        return "torch.compile skipped (--smoke or --no-compile)"
    torch._dynamo.reset()  # fresh caches per shape and dtype, so the recompile limit is never hit
    return build()


def error_reason(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:500]


def run_op(spec: OpSpec, settings: Settings, log: Callable[[str], None] = print) -> list[dict]:
    records = []
    for shape in settings.shapes:
        for dtype_name in settings.dtypes:
            dtype = DTYPES[dtype_name]
            inputs = spec.make_inputs(shape, dtype, settings.device)
            buffers = rotating_buffers(inputs, settings.device)
            floor = spec.floor_bytes(shape, dtype)
            providers = spec.providers(settings, shape)
            base = {"op": spec.name, "shape": shape.name, "dims": shape.dims(), "dtype": dtype_name,
                    "floor_bytes": floor, "n_buffers": len(buffers)}
            eager_out = None
            eager = providers.get("eager")
            if callable(eager):
                try:
                    eager_out = eager(*inputs)
                except Exception as exc:  # noqa: BLE001 - recorded below as the eager provider's error
                    eager_out = None
                    log(f"  eager failed: {error_reason(exc)}")
            ready: dict[str, Callable] = {}
            by_name: dict[str, dict] = {}
            for name in PROVIDERS:
                record = dict(base, provider=name)
                by_name[name] = record
                records.append(record)
                impl = providers.get(name, "not implemented for this op")
                if name not in settings.providers:
                    impl = "not selected (--providers)"
                if isinstance(impl, str):
                    record.update(status="unavailable", reason=impl)
                    log(f"{spec.name:24s} {shape.name:8s} {dtype_name:4s} {name:8s} unavailable: {impl}")
                    continue
                try:
                    synchronize(settings.device)
                    t0 = time.perf_counter()
                    out = impl(*inputs)
                    synchronize(settings.device)
                    record["first_call_s"] = time.perf_counter() - t0
                    if eager_out is not None:
                        record["vs_eager"] = spec.compare(out, eager_out, inputs)
                    del out
                    record["memory"] = peak_memory(impl, inputs, settings.device)
                    ready[name] = impl
                except Exception as exc:  # noqa: BLE001 - a failing provider is reported, never dropped
                    record.update(status="error", reason=error_reason(exc))
                    log(f"{spec.name:24s} {shape.name:8s} {dtype_name:4s} {name:8s} error: {record['reason']}")
            try:
                timings = bench_interleaved(ready, buffers, settings)
            except Exception as exc:  # noqa: BLE001 - find the provider that fails when timed alone
                timings = {}
                for name, impl in ready.items():
                    try:
                        timings[name] = bench_fn(impl, buffers, settings)
                    except Exception as exc_one:  # noqa: BLE001
                        by_name[name].update(status="error", reason=error_reason(exc_one))
                log(f"  interleaved timing failed ({error_reason(exc)}); timed one by one")
            for name, timing in timings.items():
                record = by_name[name]
                median = timing["median"]
                achieved = floor / (median * 1e-3) / 1e9
                record.update(status="ok", time_ms=timing, gbps=achieved)
                if settings.copy_gbps:
                    record["pct_copy_bw"] = 100.0 * achieved / settings.copy_gbps
                    record["x_floor"] = settings.copy_gbps / achieved
                log(f"{spec.name:24s} {shape.name:8s} {dtype_name:4s} {name:8s} {median:10.3f} ms "
                    f"[{timing['q20']:.3f}, {timing['q80']:.3f}]")
            del inputs, buffers, providers, eager_out
            gc.collect()
            if settings.is_cuda:
                torch.cuda.empty_cache()
    add_speedups(records)
    return records


def add_speedups(records: list[dict]) -> None:
    """Ratios of the official / eager / compile median time to each provider's, within (op, shape, dtype)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    for group in groups.values():
        for r in group.values():
            if r.get("status") != "ok":
                continue
            for base in ("official", "eager", "compile"):
                other = group.get(base)
                if other is not None and other.get("status") == "ok":
                    r[f"x_{base}"] = other["time_ms"]["median"] / r["time_ms"]["median"]


# ----------------------------------------------------------------------------------------------------- goals


def goal(name: str, measured: float | None, target: float, higher_is_better: bool, where: str,
         unit: str = "x") -> dict:
    met = None if measured is None else (measured >= target if higher_is_better else measured <= target)
    return {"goal": name, "where": where, "measured": measured, "target": target, "unit": unit,
            "higher_is_better": higher_is_better, "met": met}


def evaluate_goals(records: list[dict], train_records: list[dict], device: torch.device) -> list[dict]:
    """The issue's H100 goals, evaluated on whatever device this run used (marked in the output)."""
    goals = []
    fused_here = [b for b in FUSED if (b != "cpu") == (device.type == "cuda")]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    for (op, shape, dtype), group in by_key.items():
        for backend in fused_here:
            r = group.get(backend)
            if r is None or r.get("status") != "ok":
                continue
            where = f"{shape} {dtype} {backend}"
            if op == "pcos_weights":
                goals.append(goal("PCOS >= 100x official", r.get("x_official"), 100.0, True, where))
                goals.append(goal("PCOS >= 3x compile", r.get("x_compile"), 3.0, True, where))
                goals.append(goal("PCOS within 1.5x of the copy-bandwidth floor", r.get("x_floor"), 1.5, False,
                                  where))
            elif op == "weighted_cross_entropy":
                goals.append(goal("weighted CE fwd+bwd >= 2x eager F.cross_entropy (official)",
                                  r.get("x_official"), 2.0, True, where))
                off = group.get("official", {})
                mem, off_mem = r.get("memory", {}).get("extra_bytes"), off.get("memory", {}).get("extra_bytes")
                ratio = mem / off_mem if mem is not None and off_mem else None
                goals.append(goal("weighted CE peak memory <= 1/3 of eager F.cross_entropy (official)", ratio,
                                  1 / 3, False, where, unit="of official"))
    for r in train_records:
        if r.get("status") != "ok" or r["selection"] not in fused_here:
            continue
        where = f"{r['config']} {r['selection']}"
        goals.append(goal("CSL-specific work <= 3% of the step", r.get("csl_share_pct"), 3.0, False, where,
                          unit="%"))
        goals.append(goal("step >= 1.2x faster than with official selection", r.get("x_official"), 1.2, True,
                          where))
    return goals


# ---------------------------------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def markdown_table(records: list[dict]) -> str:
    head = ("| op | shape | dtype | provider | median ms [q20, q80] | peak extra MiB | GB/s | % copy BW | x official "
            "| x eager | x compile | max abs dev vs eager |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r.get("status") != "ok":
            why = r.get("reason", "")
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | "
                         f"{r.get('status')}: {why} | | | | | | | |")
            continue
        t = r["time_ms"]
        dev = r.get("vs_eager", {})
        dev_txt = ", ".join(f"{k} {_fmt(v)}" for k, v in dev.items())
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['provider']} | {t['median']:.3f} "
            f"[{t['q20']:.3f}, {t['q80']:.3f}] | {_fmt(_mib(r['memory'].get('extra_bytes')), '.1f')} | "
            f"{_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('pct_copy_bw'), '.1f')} | {_fmt(r.get('x_official'))} | "
            f"{_fmt(r.get('x_eager'))} | {_fmt(r.get('x_compile'))} | {dev_txt} |")
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """One row per (op, shape, dtype): every provider's median ms side by side (n/a = unavailable, see the JSON)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    head = "| op | shape | dtype | " + " | ".join(f"{p} ms" for p in PROVIDERS) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (op, shape, dtype), group in groups.items():
        cells = []
        for p in PROVIDERS:
            r = group.get(p, {})
            cells.append(f"{r['time_ms']['median']:.3g}" if r.get("status") == "ok" else
                         ("error" if r.get("status") == "error" else "n/a"))
        lines.append(f"| {op} | {shape} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_table(train_records: list[dict]) -> str:
    head = ("| config | selection | step ms [q20, q80] | CSL-specific ms | CSL share % | peak MiB | x official "
            "| note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in train_records:
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r['selection']} | {r.get('status')}: {r.get('reason', '')} | | | | | |")
            continue
        t = r["step_ms"]
        lines.append(
            f"| {r['config']} | {r['selection']} | {t['median']:.1f} [{t['q20']:.1f}, {t['q80']:.1f}] | "
            f"{r['csl_ms']['median']:.2f} | {r['csl_share_pct']:.2f} | {_fmt(_mib(r.get('peak_bytes')), '.0f')} | "
            f"{_fmt(r.get('x_official'))} | {r.get('note', '')} |")
    return "\n".join(lines)


def goals_table(goals: list[dict]) -> str:
    lines = ["| goal | where | measured | target | met |", "|---|---|---|---|---|"]
    for g in goals:
        sign = ">=" if g["higher_is_better"] else "<="
        met = "n/a" if g["met"] is None else ("met" if g["met"] else "missed")
        lines.append(f"| {g['goal']} | {g['where']} | {_fmt(g['measured'])} {g['unit']} | {sign} "
                     f"{_fmt(g['target'])} | {met} |")
    return "\n".join(lines)


def default_output_path(device: torch.device, suffix: str = "") -> Path:
    date = _dt.date.today().isoformat()
    return RESULTS_DIR / f"{date}-{device_slug(device)}{suffix}.json"


def write_json(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    return path


def settings_dict(settings: Settings) -> dict:
    return {"suite": settings.suite, "shapes": [dict(name=s.name, **s.dims()) for s in settings.shapes],
            "dtypes": list(settings.dtypes), "providers": list(settings.providers),
            "use_compile": settings.use_compile, "warmup_s": settings.warmup_s, "rep_s": settings.rep_s,
            "min_reps": settings.min_reps, "max_reps": settings.max_reps}


def run_single_op(spec: OpSpec, argv: list[str] | None = None) -> dict:
    """Entry point of a per-op script: run the op alone, print the table, write the JSON when ``--out`` is given."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.bench_{spec.name}", description=spec.description)
    add_common_args(parser)
    args = parser.parse_args(argv)
    show_kernel_log()
    settings = settings_from_args(args)
    settings.copy_gbps = copy_bandwidth_gbps(settings.device)["gbps"]
    records = run_op(spec, settings)
    payload = {"environment": environment(settings.device), "settings": settings_dict(settings),
               "copy_bandwidth_gbps": settings.copy_gbps, "records": records,
               "goals": evaluate_goals(records, [], settings.device), "triton_tuning": triton_tuning()}
    print()
    print(markdown_table(records))
    if args.out is not None:
        print(f"\nwrote {write_json(payload, args.out)}")
    return payload
