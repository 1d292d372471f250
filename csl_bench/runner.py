"""Running one op: :class:`OpSpec`, the providers of every op, every provider timed on the same inputs, and the
entry point of a per-op script."""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from csl_kernels import unavailable_reason

from .environment import environment, show_kernel_log, triton_tuning
from .inputs import rotating_buffers
from .report import check_output_path, evaluate_goals, markdown_table, suite_payload, write_json
from .settings import DTYPES, PROVIDERS, Settings, Shape, add_common_args, settings_dict, settings_from_args
from .timing import bench_fn, bench_interleaved, copy_bandwidth_gbps, peak_memory, synchronize

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

    def main(self, argv: list[str] | None = None) -> dict:
        """Entry point of the op's script (``if __name__ == "__main__": SPEC.main()``): run the op alone, print the
        table, write the JSON when ``--out`` is given."""
        parser = argparse.ArgumentParser(prog=f"python -m csl_bench.bench_{self.name}", description=self.description)
        add_common_args(parser)
        args = parser.parse_args(argv)
        show_kernel_log()
        settings = settings_from_args(args)
        if args.out is not None:
            check_output_path(args.out, args.overwrite)
        copy = copy_bandwidth_gbps(settings.device)
        settings.copy_gbps = copy["gbps"]
        records = run_op(self, settings)
        payload = suite_payload(environment(settings.device), settings_dict(settings), copy, records, [],
                                evaluate_goals(records, [], settings.device), triton_tuning())
        print()
        print(markdown_table(records))
        if args.out is not None:
            print(f"\nwrote {write_json(payload, args.out)}")
        return payload


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


def exit_status(payload: dict) -> int:
    """The exit status of a benchmark command: 1 where a provider or a training-step selection failed (its record
    says ``status: error``; the tables keep the row with the reason, and stderr names each), else 0. One that cannot
    run here (``unavailable``) is not a failure."""
    failed = [r for r in payload.get("records", []) if r.get("status") == "error"]
    for r in failed:
        print(f"error: {r['op']} {r['shape']} {r['dtype']} {r['provider']}: {r.get('reason')}", file=sys.stderr)
    failed_steps = [r for r in payload.get("train_step", []) if r.get("status") == "error"]
    for r in failed_steps:
        print(f"error: training step {r['config']} {r['selection']}: {r.get('reason')}", file=sys.stderr)
    return 1 if failed or failed_steps else 0


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


__all__ = ["OpSpec", "ProviderFn", "add_speedups", "compile_provider", "error_reason", "fused_provider", "run_op"]
