"""``csl demo``: supervised-only vs threshold (UniMatch) vs CSL on the embedded synthetic scenes, on CPU.

Each method trains the demo config (``csl/configs/demo.yaml``: DeepLabV3+ ResNet-18, small crops, fixed seeds) in
its own folder under the run directory, then the demo prints a table of the final validation mIoU, the quality of
the pseudo-labels selected in the last epoch (accuracy and recall of the reliable pixels against the unlabeled
ground truth, which training never sees) and the wall time, and writes it to ``<out>/summary.md`` and
``summary.json``.
"""

from __future__ import annotations

import json
import os
import time

from .config import build_config, load_config
from .logging_utils import read_metrics

# Config overrides that turn the demo config into each compared method.
METHODS: dict[str, dict] = {
    "supervised": {"train.mode": "supervised"},
    "threshold": {"train.mode": "semi", "selection.mode": "threshold", "tmp.enabled": False},
    "csl": {"train.mode": "semi", "selection.mode": "csl", "tmp.enabled": True},
    "csl_class": {"train.mode": "semi", "selection.mode": "csl_class", "tmp.enabled": True},
}
LABELS = {"supervised": "supervised only", "threshold": "threshold 0.95 (UniMatch)", "csl": "CSL (PCOS + TMP)",
          "csl_class": "CSL class-wise"}


def method_config(base: dict, method: str, out_dir: str, iters: int | None = None) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown demo method {method!r}; choose from {sorted(METHODS)}")
    overrides = {**METHODS[method], "output_dir": os.path.join(out_dir, method)}
    if iters is not None:
        overrides["train.iters"] = int(iters)
    return build_config(base, overrides)


def _result(cfg: dict, seconds: float) -> dict:
    path = os.path.join(cfg["output_dir"], "metrics.jsonl")
    evals = read_metrics(path, "eval")
    pls = read_metrics(path, "pseudo_labels")
    last_pl = pls[-1] if pls else {}
    return {
        "miou": evals[-1]["miou"] if evals else None,
        "best_miou": max((e["miou"] for e in evals), default=None),
        "pl_mask_ratio": last_pl.get("mask_ratio"),
        "pl_accuracy": last_pl.get("accuracy"),
        "pl_recall": last_pl.get("recall"),
        "iters": cfg["train"]["iters"],
        "seconds": seconds,
        "output_dir": cfg["output_dir"],
    }


def _fmt(value, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.0f}"


def format_table(results: dict[str, dict]) -> str:
    lines = ["| method | mIoU (%) | pseudo-label accuracy (%) | pseudo-label recall (%) | mask ratio (%) | time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method, r in results.items():
        lines.append(f"| {LABELS.get(method, method)} | {_fmt(r['miou'])} | {_fmt(r['pl_accuracy'])} | "
                     f"{_fmt(r['pl_recall'])} | {_fmt(r['pl_mask_ratio'])} | {_fmt(r['seconds'], pct=False)} |")
    return "\n".join(lines)


def run_demo(out_dir: str = os.path.join("runs", "demo"), methods: list[str] | None = None, iters: int | None = None,
             overrides: list[str] | None = None) -> dict[str, dict]:
    """Train each method on the demo config and print / write the comparison table. Returns the results."""
    from .train import train

    methods = methods or ["supervised", "threshold", "csl"]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown demo method {m!r}; choose from {sorted(METHODS)}")
    base = load_config("demo", overrides)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for method in methods:
        cfg = method_config(base, method, out_dir, iters)
        if os.path.exists(os.path.join(cfg["output_dir"], "metrics.jsonl")):
            os.remove(os.path.join(cfg["output_dir"], "metrics.jsonl"))  # a fresh run, not appended to an old one
        print(f"\n== {LABELS[method]}: {cfg['train']['iters']} iterations -> {cfg['output_dir']}", flush=True)
        t0 = time.perf_counter()
        train(cfg)
        results[method] = _result(cfg, time.perf_counter() - t0)
    table = format_table(results)
    total = time.perf_counter() - start
    note = (f"DeepLabV3+ {base['model']['backbone']}, crop {base['data']['crop_size']}, "
            f"{base['data']['synthetic']['num_labeled']} labeled / {base['data']['synthetic']['num_unlabeled']} "
            f"unlabeled / {base['data']['synthetic']['num_val']} val synthetic scenes, seed {base['seed']}; "
            f"pseudo-label accuracy / recall: reliable pixels of the last epoch vs the unlabeled ground truth; "
            f"total {total:.0f} s")
    print("\n" + table + "\n\n" + note, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"results": results, "total_seconds": total, "config": base}, f, indent=1)
    return results


__all__ = ["METHODS", "format_table", "method_config", "run_demo"]
