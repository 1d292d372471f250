"""What ``backend="auto"`` chooses per op and shape class on a device, and on what timings.

On a GPU the first call of each shape class times the extension and Triton on its own inputs
(csl_kernels/_measured.py) and logs both; this script makes those first calls.

    python -m csl_bench.bench_auto_choice [--device cuda] [--shapes voc321 coco513] [--dtypes bf16 fp32] [--out x.json]

Each (shape, dtype) gets one ``pcos_weights(logits, ignore)`` call and one weighted cross-entropy forward +
``backward()``, both with ``backend="auto"``. The choices are measured afresh: the cache is a file of this run in a
temporary folder removed at the end (``CSL_AUTO_CACHE``, unless the caller set it), not the user's. Prints the
kernels' log lines (each choice
with its timings) and a table; ``--out`` writes the choices and the log lines as JSON. On a CPU device nothing is
timed (``auto`` takes the fixed order there) and the table shows what it took.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from csl_kernels import _measured
from csl_kernels._measured import ENV_CACHE

from .inputs import make_ignore, make_logits
from .report import check_output_path, write_json
from .settings import DTYPES, SHAPES, resolve_device


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        print(f"  [csl_kernels] {line}", flush=True)


def _not_timed(impl):
    raise RuntimeError("the choice was not made by the call before (nothing is timed here)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m csl_bench.bench_auto_choice", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="shape names of csl_bench/settings.py (default: voc321 coco513 on cuda, smoke on cpu)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=None,
                        help="write the choices and log lines as JSON here (missing folders are created)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    known = {s.name: s for suite in SHAPES.values() for s in suite}
    names = args.shapes or (["voc321", "coco513"] if device.type == "cuda" else ["smoke"])
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {sorted(known)}")
    if args.out is not None:
        check_output_path(args.out, args.overwrite)
    own_cache = ENV_CACHE not in os.environ
    with contextlib.ExitStack() as undo:
        if own_cache:
            folder = undo.enter_context(tempfile.TemporaryDirectory(prefix="csl-auto-"))
            os.environ[ENV_CACHE] = os.path.join(folder, "auto-backend.json")
            undo.callback(os.environ.pop, ENV_CACHE, None)
        # Choices this process read from another cache file are not this run's; afterwards it reads its own again.
        _measured.forget_choices()
        undo.callback(_measured.forget_choices)
        lines = _Lines()
        logger = logging.getLogger("csl_kernels")
        undo.callback(_restore_logger, logger, logger.level, logger.propagate)
        undo.callback(logger.removeHandler, lines)
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        rows = _choices(names, known, args.dtypes, device)
    payload = {"device": str(device), "cache": "temporary (removed)" if own_cache else os.environ[ENV_CACHE],
               "choices": rows, "log": lines.lines}
    if args.out is not None:
        print(f"wrote {write_json(payload, args.out)}")
    return payload


def _restore_logger(logger: logging.Logger, level: int, propagate: bool) -> None:
    logger.setLevel(level)
    logger.propagate = propagate


def _choices(names: list[str], known: dict, dtypes: list[str], device: torch.device) -> list[dict]:
    import csl_kernels as ck
    from csl_kernels.pcos_weights import auto_variant

    rows = []
    for name in names:
        shape = known[name]
        for dt in dtypes:
            logits = make_logits(shape, DTYPES[dt], device)
            ignore = make_ignore(shape, device)
            for op in ("pcos_weights", "weighted_cross_entropy"):
                start = time.perf_counter()
                if op == "pcos_weights":
                    sel = ck.pcos_weights(logits, ignore, backend="auto")
                else:
                    leaf = logits.detach().clone().requires_grad_(True)
                    ck.weighted_cross_entropy(leaf, sel.label, sel.weight, ignore, backend="auto").backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                # The choice just made, read without timing anything (on CPU: the fixed order, which times nothing).
                variant = auto_variant("image") if op == "pcos_weights" else ""
                chosen = _measured.last_choice(op, logits.device, logits, variant)
                if chosen is None:
                    chosen = _measured.resolve(op, "auto", logits.device, logits, _not_timed, variant=variant)[0]
                measured = _measured.last_measurement(op, logits.device, logits, variant) or {}
                rows.append({"op": op, "shape": name, "dtype": dt, "backend": chosen,
                             "first_call_s": round(time.perf_counter() - start, 3),
                             "shape_class": measured.get("shape_class"), "median_ms": measured.get("median_ms"),
                             "rounds_ms": measured.get("rounds_ms"), "failed": measured.get("failed")})
                print(f"{op:24s} {name:8s} {dt:5s} -> {chosen} (first call {rows[-1]['first_call_s']:.2f} s)",
                      flush=True)
    return rows


if __name__ == "__main__":
    main()
