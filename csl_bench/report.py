"""Results: the issue's goals evaluated on the records, markdown tables and the JSON file."""

from __future__ import annotations

import datetime as _dt
import json
import tempfile
from pathlib import Path

import torch

from .environment import device_slug
from .settings import FUSED, PROVIDERS

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
                if backend == "triton" and group.get("cuda", {}).get("status") == "ok":
                    ratio = r["time_ms"]["median"] / group["cuda"]["time_ms"]["median"]
                    goals.append(goal("Triton PCOS within 1.5x of the extension (issue 14)", ratio, 1.5, False,
                                      where, unit="x cuda"))
            elif op == "weighted_cross_entropy":
                goals.append(goal("weighted CE fwd+bwd >= 3x eager F.cross_entropy (official; issue 14)",
                                  r.get("x_official"), 3.0, True, where))
                off = group.get("official", {})
                mem, off_mem = r.get("memory", {}).get("extra_bytes"), off.get("memory", {}).get("extra_bytes")
                ratio = mem / off_mem if mem is not None and off_mem else None
                goals.append(goal("weighted CE peak memory <= 1/4 of eager F.cross_entropy (official; issue 14)",
                                  ratio, 1 / 4, False, where, unit="of official"))
    for r in train_records:
        if r.get("status") != "ok" or r["selection"] not in fused_here:
            continue
        where = f"{r['config']} {r['selection']}"
        goals.append(goal("CSL-specific work <= 3% of the step", r.get("csl_share_pct"), 3.0, False, where,
                          unit="%"))
        goals.append(goal("step >= 1.2x faster than with official selection", r.get("x_official"), 1.2, True,
                          where))
    return goals


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


def default_output_path(device: torch.device, suffix: str = "", device_name: str | None = None) -> Path:
    """``<date>-<device>.json`` (:func:`~csl_bench.environment.device_slug`) in ``csl_bench/results/`` of a checkout
    of the repository, else (an installed package, which ships no results) in ``./csl_bench_results/``."""
    date = _dt.date.today().isoformat()
    folder = RESULTS_DIR if RESULTS_DIR.is_dir() else Path.cwd() / "csl_bench_results"
    return folder / f"{date}-{device_slug(device, device_name)}{suffix}.json"


def check_output_path(path: Path, overwrite: bool) -> Path:
    """``path`` where the JSON may be written, checked before any work: an existing file only with ``overwrite`` (a
    second run of the day does not replace the first one's results), never a folder, and its folder created and
    writable (a run of minutes does not end unable to write what it measured)."""
    if path.is_dir():
        raise SystemExit(f"{path} is a folder; --out takes a file name")
    if path.exists() and not overwrite:
        raise SystemExit(f"{path} exists; pass --overwrite to replace it, or --out another file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".csl-bench-write-check-"):
            pass
    except OSError as exc:
        raise SystemExit(f"cannot write {path}: {exc}; pass --out a file in a writable folder") from None
    return path


def suite_payload(environment: dict, settings: dict, copy_bandwidth: dict, records: list[dict],
                  train: list[dict], goals: list[dict], triton_tuning: dict) -> dict:
    """The JSON of a benchmark run, the same for the suite, an op's script and a merge."""
    return {
        "environment": environment,
        "settings": settings,
        "copy_bandwidth": copy_bandwidth,
        "records": records,
        "train_step": train,
        "goals": goals,
        "triton_tuning": triton_tuning,
        "goals_note": ("the goals are set for an H100; on another device the same ratios are reported for "
                       "information" if "H100" not in environment["device_name"] else "measured on an H100"),
    }


def write_json(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    return path


__all__ = ["RESULTS_DIR", "check_output_path", "default_output_path", "evaluate_goals", "goal", "goals_table",
           "markdown_table", "suite_payload", "summary_table", "train_table", "write_json"]
