"""Host-side cost of one call: the Python and dispatcher layers from the public call to the last kernel launch.

    python -m csl_bench.bench_host_overhead [--calls 2000] [--workers triton cpu baseline gpu] [--out x.json]

On a GPU the host issues the launches while the GPU runs them; a call whose host side takes longer than its kernels
leaves the GPU waiting. This times the host side alone, without a GPU:

- ``triton``: CPU tensors under ``TRITON_INTERPRET=1`` with every Triton launch replaced by a no-op that counts it.
  What is timed is what this package owns: input checks, the backend choice, the custom-op / autograd layers, the
  tuning lookup, allocations and the launch arguments. Triton's own launcher (argument binding, specialization key,
  driver call) is not in it: that needs a GPU.
- ``cpu``: the C++ extension on a tiny input (B2 C3 4x5: its kernels take well under a microsecond), i.e. the
  Python layers, the dispatcher and the allocations of the extension's ops.
- ``on cuda`` (where a GPU is visible): real launches of ``triton`` and ``cuda`` on the same tiny input on the GPU,
  timed up to a synchronisation per round; the kernels are so small that the GPU keeps up, so this is the whole host
  side, Triton's launcher and the CUDA caching allocator included.
- ``empty triton kernel`` (on cuda): one launch of a kernel that does nothing, with as many arguments as PCOS's
  feature kernel: Triton's own launcher (binding, specialization key, driver call), what each of a call's launches
  costs beyond this package's Python.
- the Triton weighted CE's forward and backward launchers alone (triton worker): with the baselines, where the
  host time of a forward + backward call goes (launchers, the autograd.Function, checks and backend choice).
- baselines on the same input: ``F.cross_entropy`` forward + backward (what UniMatch's loss costs at least: its
  host side is the floor any loss called from PyTorch pays), a ``torch.library.custom_op`` that does nothing, and
  the forward + ``backward()`` of a ``torch.autograd.Function`` that does nothing (what a loss defined in Python
  pays before its own code: the autograd engine's start, the node, the gradient accumulated into the leaf); each
  op worker times it too, beside its calls, and reports the weighted CE's forward + backward less it, round by
  round (what the op adds to a training step's ``backward()``, which starts the engine once for all the step's
  losses).

Each row: microseconds per call, the minimum and the median of ``--repeats`` rounds of ``--calls`` calls (the
minimum is the figure: the rest is other load; a worker's rows take turns round by round), and the kernel launches
of one call (triton). The calls are what a
training step makes: ``pcos_weights(logits, ignore)`` with an integer ignore map, and the weighted CE's forward +
``backward()`` on logits that require grad.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPE = (2, 3, 4, 5)
WORKERS = ("triton", "cpu", "baseline", "gpu")
WORKER_TIMEOUT_S = 900  # one row's process (a first extension build is included): a stuck one is reported


def _warmup_calls(calls: int) -> int:
    return max(50, calls // 10)


def _rounds(fns: dict, calls: int, repeats: int, sync=None) -> dict[str, list[float]]:
    """Microseconds per call of each of ``fns`` (name -> function): ``repeats`` rounds of ``calls`` calls each, the
    functions taking turns round by round, so that a slow spell of the machine hits every row alike rather than one
    row's rounds."""
    for fn in fns.values():
        for _ in range(_warmup_calls(calls)):
            fn()
    if sync:
        sync()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if sync:
                sync()
            out[name].append((time.perf_counter() - start) / calls * 1e6)
    return out


def _launches(fns: dict, count) -> dict[str, int]:
    """Kernel launches of one call of each of ``fns`` (``count()``: launches so far)."""
    out = {}
    for name, fn in fns.items():
        before = count()
        fn()
        out[name] = count() - before
    return out


class _EmptyFunction(torch.autograd.Function):
    """Saves its input, returns it as the gradient: a loss written in Python with no kernel at all."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return ctx.saved_tensors[0]


EMPTY_FUNCTION = "empty autograd.Function fwd+bwd"
BEYOND_EMPTY = "weighted_cross_entropy fwd+bwd beyond an empty autograd.Function"


def _row(op: str, provider: str, times: list[float], launches: float | None = None) -> dict:
    return {"op": op, "provider": provider, "us_min": round(min(times), 2),
            "us_median": round(statistics.median(times), 2), "launches_per_call": launches}


def _inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    b, c, h, w = SHAPE
    logits = torch.randn(SHAPE, generator=g)
    ignore = torch.zeros((b, h, w), dtype=torch.uint8)
    ignore[0, 0, 0] = 255
    label = torch.randint(0, c, (b, h, w), generator=g)
    weight = torch.rand((b, h, w), generator=g)
    return tuple(t.to(device) for t in (logits, ignore, label, weight))


def _op_rows(provider: str, calls: int, repeats: int, count=None, device: str = "cpu") -> list[dict]:
    import csl_kernels

    logits, ignore, label, weight = _inputs(device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    leaf = logits.clone().requires_grad_(True)

    def pcos():
        csl_kernels.pcos_weights(logits, ignore, backend=provider)

    def ce():
        csl_kernels.weighted_cross_entropy(leaf, label, weight, ignore, backend=provider).backward()

    def ce_forward():
        csl_kernels.weighted_cross_entropy(logits, label, weight, ignore, backend=provider)

    fns = {"pcos_weights": pcos, "weighted_cross_entropy fwd+bwd": ce,
           "weighted_cross_entropy fwd (no grad)": ce_forward}
    # The same process times an empty autograd.Function: what backward() costs any loss written in Python.
    times = _rounds({**fns, EMPTY_FUNCTION: lambda: _EmptyFunction.apply(leaf).backward()}, calls, repeats, sync)
    launches = _launches(fns, count) if count else {}  # after the warm-up: the steady state
    name = provider if device == "cpu" else f"{provider} on cuda"
    rows = [_row(op, name, times[op], launches.get(op)) for op in fns]
    beyond = [a - b for a, b in zip(times["weighted_cross_entropy fwd+bwd"], times[EMPTY_FUNCTION], strict=True)]
    return rows + [_row(BEYOND_EMPTY, name, beyond, launches.get("weighted_cross_entropy fwd+bwd"))]


def _worker_triton(calls: int, repeats: int) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton worker runs under TRITON_INTERPRET=1 (the main process sets it)")
    import csl_kernels.triton as triton_backend

    problem = triton_backend._interpreter_problem()  # runs a real kernel once, before launches are stubbed
    if problem is not None:
        raise RuntimeError(problem)
    from triton.runtime.interpreter import InterpretedFunction

    launched = [0]

    def no_launch(self, grid):
        def launch(*args, **kwargs):
            launched[0] += 1
        return launch

    InterpretedFunction.__getitem__ = no_launch
    return _op_rows("triton", calls, repeats, lambda: launched[0]) + _launcher_rows(calls, repeats,
                                                                                    lambda: launched[0])


def _launcher_rows(calls: int, repeats: int, count) -> list[dict]:
    """The Triton weighted CE's forward and backward launchers called directly (no checks, backend choice or
    autograd): with the empty autograd.Function baseline, where a forward + backward call's host time goes."""
    from csl_kernels.triton import weighted_cross_entropy as wce

    logits, ignore, label, weight = _inputs()
    valid = ignore  # as the public call passes it: the ignore map itself, compared in the kernels
    _, lse, n_valid = wce.weighted_cross_entropy_launch(logits, label, weight, valid)
    grad_loss = torch.ones(())
    fns = {"weighted_cross_entropy forward launcher alone":
           lambda: wce.weighted_cross_entropy_launch(logits, label, weight, valid),
           "weighted_cross_entropy backward launcher alone":
           lambda: wce.weighted_cross_entropy_backward_launch(grad_loss, logits, label, weight, valid, lse, n_valid)}
    times = _rounds(fns, calls, repeats)
    launches = _launches(fns, count)
    return [_row(op, "triton", times[op], launches[op]) for op in fns]


def _worker_cpu(calls: int, repeats: int) -> list[dict]:
    return _op_rows("cpu", calls, repeats)


def _worker_baseline(calls: int, repeats: int) -> list[dict]:
    import torch.nn.functional as F

    logits, ignore, label, weight = _inputs()
    leaf = logits.clone().requires_grad_(True)

    def cross_entropy():
        F.cross_entropy(leaf, label).backward()

    def cross_entropy_forward():
        F.cross_entropy(logits, label)

    @torch.library.custom_op("csl_bench::nothing", mutates_args=())
    def nothing(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(())

    @nothing.register_fake
    def _(x):
        return x.new_empty(())

    fns = {"F.cross_entropy fwd+bwd": cross_entropy, "F.cross_entropy fwd (no grad)": cross_entropy_forward,
           "empty custom_op call": lambda: nothing(logits),
           EMPTY_FUNCTION: lambda: _EmptyFunction.apply(leaf).backward()}
    times = _rounds(fns, calls, repeats)
    return [_row(op, "torch", times[op]) for op in fns]


def empty_launch_row(device: str, calls: int, repeats: int) -> dict:
    """Microseconds of one launch of a kernel that does nothing, with 8 tensor, 10 integer and 2 constexpr
    arguments (PCOS's feature kernel has 8, 10 and 11)."""
    from csl_bench._empty_kernel import empty_kernel

    tensors = [torch.zeros(16, device=device) for _ in range(8)]
    ints = [103041, 321, 21, 2163861, 103041, 321, 1, 1, 101, 32]

    def launch():
        empty_kernel[(4, 2)](*tensors, *ints, FLAG=True, BLOCK=32)

    sync = torch.cuda.synchronize if device == "cuda" else None
    provider = "triton on cuda" if device == "cuda" else "triton (interpreter)"
    op = "empty triton kernel (8 tensors, 10 ints)"
    return _row(op, provider, _rounds({op: launch}, calls, repeats, sync)[op], 1)


def _worker_gpu(calls: int, repeats: int) -> list[dict]:
    """Real launches on a CUDA device: with kernels this small the GPU keeps up, so a call's wall time is its host
    time, Triton's launcher and the caching allocator included."""
    import torch.nn.functional as F

    import csl_kernels

    if not torch.cuda.is_available():
        return [{"op": "-", "provider": "on cuda", "unavailable": "no CUDA device"}]
    rows = []
    for provider in ("triton", "cuda"):
        reason = csl_kernels.unavailable_reason("pcos_weights", provider, torch.device("cuda"))
        if reason is not None:
            rows.append({"op": "-", "provider": f"{provider} on cuda", "unavailable": reason})
            continue
        rows.extend(_op_rows(provider, calls, repeats, device="cuda"))
    if csl_kernels.unavailable_reason("pcos_weights", "triton", torch.device("cuda")) is None:
        rows.append(empty_launch_row("cuda", calls, repeats))
    logits, ignore, label, weight = _inputs("cuda")
    leaf = logits.clone().requires_grad_(True)
    op = "F.cross_entropy fwd+bwd"
    rows.append(_row(op, "torch on cuda", _rounds({op: lambda: F.cross_entropy(leaf, label).backward()}, calls,
                                                  repeats, torch.cuda.synchronize)[op]))
    return rows


def run_worker(name: str, calls: int, repeats: int) -> list[dict]:
    torch.set_num_threads(1)  # a host-side measurement: no intra-op threads
    workers = {"triton": _worker_triton, "cpu": _worker_cpu, "baseline": _worker_baseline, "gpu": _worker_gpu}
    return workers[name](calls, repeats)


def table(rows: list[dict]) -> str:
    lines = ["| op | provider | us / call (min) | median | launches / call |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        launches = "" if r.get("launches_per_call") is None else f"{r['launches_per_call']:.0f}"
        lines.append(f"| {r['op']} | {r['provider']} | {r['us_min']:.1f} | {r['us_median']:.1f} | {launches} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m csl_bench.bench_host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per row")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: print only; missing folders are created)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--workers", nargs="+", choices=WORKERS, default=list(WORKERS),
                        help="which rows: triton (interpreter, launches stubbed), cpu, baseline, gpu (real launches)")
    parser.add_argument("--worker-timeout", type=float, default=WORKER_TIMEOUT_S,
                        help="seconds one row's process may take before it is reported as stuck and the next runs")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.calls, args.repeats)))
        return {}
    from .environment import environment
    from .report import check_output_path, write_json

    if args.out is not None:
        check_output_path(args.out, args.overwrite)
    rows = []
    for name in args.workers:  # one process each: TRITON_INTERPRET is read at import, and the launch stub stays inside
        env = dict(os.environ, TRITON_INTERPRET="1" if name == "triton" else "0")
        try:
            done = subprocess.run([sys.executable, "-m", "csl_bench.bench_host_overhead", "--worker", name, "--calls",
                                   str(args.calls), "--repeats", str(args.repeats)], env=env, capture_output=True,
                                  text=True, cwd=Path(__file__).resolve().parent.parent, timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            rows.append({"op": "-", "provider": name, "error": f"no result within {args.worker_timeout:g} s"})
            print(f"{name}: no result within {args.worker_timeout:g} s", file=sys.stderr)
            continue
        if done.returncode != 0:
            rows.append({"op": "-", "provider": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            print(f"{name}: failed: {done.stderr.strip()[-2000:]}", file=sys.stderr)
            continue
        rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
    ok = [r for r in rows if "error" not in r and "unavailable" not in r]
    print(f"# host-side cost per call, input B{SHAPE[0]} C{SHAPE[1]} {SHAPE[2]}x{SHAPE[3]}, one thread\n")
    print(table(ok))
    for r in rows:
        if "unavailable" in r:
            print(f"\n{r['provider']}: not measured ({r['unavailable']})")
    payload = {"benchmark": "host_overhead", "shape": list(SHAPE), "calls": args.calls, "repeats": args.repeats,
               "environment": environment(torch.device("cpu")),  # the host whose cost is measured
               # the GPU the real launches of the gpu rows went to
               "gpu_environment": environment(torch.device("cuda")) if "gpu" in args.workers and
               torch.cuda.is_available() else None,
               "rows": rows}
    if args.out is not None:
        print(f"\nwrote {write_json(payload, args.out)}")
    return payload


if __name__ == "__main__":
    result = main()
    raise SystemExit(1 if any("error" in r for r in result.get("rows", [])) else 0)
