"""Timing: repetitions planned from a time budget, CUDA events or perf_counter, providers interleaved, peak memory
and the copy-bandwidth floor."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

from .settings import Settings


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times_ms: list[float]) -> dict:
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
    return quantiles(time_calls(fn, buffers, n_rep, settings.device))


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
    return {name: quantiles(t) for name, t in times.items()}


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


__all__ = ["bench_fn", "bench_interleaved", "copy_bandwidth_gbps", "peak_memory", "plan_reps", "quantiles",
           "synchronize", "time_calls"]
