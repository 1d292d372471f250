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
    default_output_path,
    evaluate_goals,
    goals_table,
    markdown_table,
    summary_table,
    train_table,
    write_json,
)
from .runner import exit_status, run_op
from .settings import add_common_args, settings_dict, settings_from_args
from .timing import copy_bandwidth_gbps

SPECS = (bench_residual_features.SPEC, bench_pcos_weights.SPEC, bench_trusted_mask.SPEC,
         bench_weighted_cross_entropy.SPEC)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m csl_bench", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--ops", nargs="+", choices=[s.name for s in SPECS], default=None)
    parser.add_argument("--skip-train", action="store_true", help="skip the training-step benchmark")
    parser.add_argument("--train-only", action="store_true", help="only the training-step benchmark")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per selection")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="combine the JSON of runs made in pieces (same device) instead of running")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    show_kernel_log()
    settings = settings_from_args(args)
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
    goals = evaluate_goals(records, train, settings.device)
    payload = {
        "environment": env,
        "settings": settings_dict(settings),
        "copy_bandwidth": copy,
        "records": records,
        "train_step": train,
        "goals": goals,
        "triton_tuning": triton_tuning(),
        "goals_note": ("the goals are set for an H100; on another device the same ratios are reported for "
                       "information" if "H100" not in env["device_name"] else "measured on an H100"),
    }
    path = write_json(payload, args.out or default_output_path(settings.device))
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


def merge(paths: list[Path], out: Path | None) -> dict:
    """One JSON (and tables) from several runs on the same device, e.g. ops run one per command."""
    import torch

    parts = [json.loads(p.read_text()) for p in paths]
    names = {p["environment"]["device_name"] for p in parts}
    if len(names) != 1:
        raise SystemExit(f"--merge: the runs come from different devices: {sorted(names)}")
    device = torch.device(parts[0]["environment"]["device"])
    records = [r for p in parts for r in p["records"]]
    train = [r for p in parts for r in p.get("train_step", [])]
    payload = dict(parts[0], records=records, train_step=train, goals=evaluate_goals(records, train, device),
                   merged_from=[str(p) for p in paths])
    path = write_json(payload, out or default_output_path(device))
    print_tables(payload, path)
    return payload


if __name__ == "__main__":
    raise SystemExit(exit_status(main(sys.argv[1:])))
