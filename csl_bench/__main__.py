"""Run every benchmark on one device, write ``csl_bench/results/<date>-<device>.json`` and print markdown tables.

    python -m csl_bench                      # GPU suite on CUDA when available, else the CPU suite
    python -m csl_bench --device cpu         # CPU suite (cpu321, cpu161; fp32 and bf16)
    python -m csl_bench --smoke --out x.json # one tiny shape, short timing (CI)
    python -m csl_bench --merge a.json b.json --out all.json  # combine runs made in pieces on one device
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import (
    bench_pcos_weights,
    bench_residual_features,
    bench_train_step,
    bench_trusted_mask,
    bench_weighted_cross_entropy,
)
from .environment import environment, show_kernel_log, triton_tuning
from .report import (
    check_output_path,
    default_output_path,
    evaluate_goals,
    goals_table,
    markdown_table,
    suite_payload,
    summary_table,
    train_table,
    write_json,
)
from .runner import add_speedups, exit_status, run_op
from .settings import add_common_args, settings_dict, settings_from_args
from .timing import copy_bandwidth_gbps

SPECS = (bench_residual_features.SPEC, bench_pcos_weights.SPEC, bench_trusted_mask.SPEC,
         bench_weighted_cross_entropy.SPEC)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m csl_bench", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--ops", nargs="+", choices=[s.name for s in SPECS], default=None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--skip-train", action="store_true", help="skip the training-step benchmark")
    which.add_argument("--train-only", action="store_true", help="only the training-step benchmark")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per selection")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="combine the JSON of runs made in pieces (same device) instead of running")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.overwrite)
    show_kernel_log()
    settings = settings_from_args(args)
    path = check_output_path(args.out or default_output_path(settings.device), args.overwrite)
    copy = copy_bandwidth_gbps(settings.device)
    settings.copy_gbps = copy["gbps"]
    env = environment(settings.device)
    print(f"# csl benchmarks on {env['device_name']} ({settings.suite} suite), copy bandwidth "
          f"{copy['gbps']:.1f} GB/s")
    records = []
    for spec in SPECS:
        if not args.train_only and (args.ops is None or spec.name in args.ops):
            records += run_op(spec, settings)
    train = [] if args.skip_train else bench_train_step.run(settings.device, settings.suite, args.steps)
    payload = suite_payload(env, settings_dict(settings), copy, records, train,
                            evaluate_goals(records, train, settings.device), triton_tuning())
    write_json(payload, path)
    print()
    print_tables(payload, path)
    return payload


def print_tables(payload: dict, path: Path) -> None:
    """The markdown tables of a benchmark payload and where its JSON was written."""
    records, train = payload["records"], payload["train_step"]
    print(markdown_table(records))
    print()
    print(summary_table(records))
    if train:
        print()
        print(train_table(train))
    print()
    print(goals_table(payload["goals"]))
    print(f"\nwrote {path}")


def _read_run(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--merge: cannot read {path}: {e}") from None


_RANK = {"unavailable": 1, "error": 2, "ok": 3}  # which of two runs' rows of one provider a merge keeps


def _merged_rows(paths: list[Path], parts: list[dict], field: str, key_fields: tuple[str, ...]) -> list[dict]:
    """One row per key across the runs: a measured row over a failed or not selected one; measured twice: refused.
    Ratios to other rows (``x_*``) are left for the caller to compute again."""
    rows: dict[tuple, dict] = {}
    source: dict[tuple, Path] = {}
    for run_path, part in zip(paths, parts, strict=True):
        for r in part.get(field, []):
            key = tuple(str(r[k]) for k in key_fields)
            if key in rows and rows[key].get("status") == "ok" and r.get("status") == "ok":
                raise SystemExit(f"--merge: {' '.join(key)} was measured in both {source[key]} and {run_path}; "
                                 f"merge runs that measured different things")
            if key not in rows or _RANK.get(r.get("status"), 0) > _RANK.get(rows[key].get("status"), 0):
                # x_floor is the row's own (time over its floor); the other x_* are ratios to other rows
                kept = {k: v for k, v in r.items() if not k.startswith("x_") or k == "x_floor"}
                rows[key], source[key] = kept, run_path
    return list(rows.values())


def merge(paths: list[Path], out: Path | None, overwrite: bool = False) -> dict:
    """One JSON (and tables) from several runs on the same device, e.g. ops or providers run one per command.

    A provider measured in one run replaces its "not selected" / unavailable or failed row of another; one measured
    in two runs is refused (which one would be the result?). The speed-ups are computed again across the runs."""
    import torch

    parts = [_read_run(p) for p in paths]
    names = {p["environment"]["device_name"] for p in parts}
    if len(names) != 1:
        raise SystemExit(f"--merge: the runs come from different devices: {sorted(names)}")
    device = torch.device(parts[0]["environment"]["device"])
    path = check_output_path(out or default_output_path(device, device_name=names.pop()), overwrite)
    merged = _merged_rows(paths, parts, "records", ("op", "shape", "dtype", "provider"))
    add_speedups(merged)
    train = _merged_rows(paths, parts, "train_step", ("config", "selection"))
    bench_train_step.add_step_speedups(train)
    first = parts[0]
    payload = suite_payload(first["environment"], first["settings"],
                            first.get("copy_bandwidth", {"gbps": first.get("copy_bandwidth_gbps")}), merged, train,
                            evaluate_goals(merged, train, device), first.get("triton_tuning", {}))
    payload["merged_from"] = [str(p) for p in paths]
    write_json(payload, path)
    print_tables(payload, path)
    return payload


if __name__ == "__main__":
    raise SystemExit(exit_status(main(sys.argv[1:])))
