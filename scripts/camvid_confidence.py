"""When confidence fails? CSL's selection against the plain confidence ranking as one supervised model trains long on
the 1/4 split of CamVid (seed 2): does the confidence become less trustworthy as the model grows more confident,
and does CSL's separation then choose better pixels than the confidence at the same share?

    .venv/bin/python scripts/camvid_confidence.py   # prints the Markdown tables, writes camvid/confidence_long.png
                                                    # and camvid/from4000.png

Records (docs/results/camvid/): the long run's ``metrics_long_supervised.jsonl`` and ``analysis_iter<N>.json``
(``csl analyze`` on the unlabeled frames) in ``1_4_seed2_long_supervised/``; its start, the warm-up, is the committed
``1_4_seed2/analysis_warmup.json`` (the same model bit for bit), shown as iteration 0; the committed 600-iteration
supervised continuation (``1_4_seed2/analysis_supervised.json``, its own shorter schedule) is a row apart.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from csl.logging_utils import read_metrics  # noqa: E402
from csl.plots import METHOD_COLOURS, _legend_outside, _pyplot, _save_figure  # noqa: E402

RECORDS = os.path.join(ROOT, "docs", "results", "camvid")
LONG = os.path.join(RECORDS, "1_4_seed2_long_supervised")
SHORT = os.path.join(RECORDS, "1_4_seed2")
TAU = 0.95


def selection_row(analysis: dict) -> dict[str, float]:
    """The selection figures (%) of one ``csl analyze`` output: the model's pixel accuracy; the 0.95 threshold's
    share, accuracy and the share of the model's wrong pixels it keeps; CSL's weighted share, accuracy and recall;
    the accuracy of the most confident pixels at CSL's share, image by image; CSL minus that (points)."""
    all_acc = analysis["all_pixels"]["accuracy"]
    (thr,) = [t for t in analysis["threshold"] if abs(t["tau"] - TAU) < 1e-9]
    csl = analysis["csl"]["weighted"]
    conf = analysis["confidence_per_image_at_csl_share"]
    wrong_kept = thr["share"] * (1 - thr["accuracy"]) / (1 - all_acc)
    return {"model_accuracy": 100 * all_acc, "thr_share": 100 * thr["share"], "thr_accuracy": 100 * thr["accuracy"],
            "wrong_kept": 100 * wrong_kept, "csl_share": 100 * csl["share"], "csl_accuracy": 100 * csl["accuracy"],
            "csl_recall": 100 * csl["recall"], "conf_accuracy": 100 * conf["accuracy"],
            "csl_minus_conf": 100 * (csl["accuracy"] - conf["accuracy"])}


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def load() -> tuple[list[dict], dict | None, list[tuple[int, float]]]:
    """``(long run rows by iteration, the 600-iteration run's row or None, the long run's (iteration, val mIoU))``."""
    curve = [(r["iter"], 100 * r["miou"]) for r in read_metrics(os.path.join(LONG, "metrics_long_supervised.jsonl"),
                                                                 "eval")]
    warmup_miou = 100 * read_metrics(os.path.join(SHORT, "metrics_warmup.jsonl"), "eval")[-1]["miou"]
    by_iter = dict(curve)
    rows = [{"iter": 0, "miou": warmup_miou, **selection_row(_read(os.path.join(SHORT, "analysis_warmup.json")))}]
    for path in sorted(glob.glob(os.path.join(LONG, "analysis_iter*.json")),
                       key=lambda p: int(re.search(r"iter(\d+)", p).group(1))):
        analysis = _read(path)
        iteration = int(re.search(r"iter(\d+)", path).group(1))
        if analysis.get("checkpoint_iteration") not in (None, iteration):
            raise ValueError(f"{path} analysed the checkpoint of iteration {analysis['checkpoint_iteration']}")
        rows.append({"iter": iteration, "miou": by_iter.get(iteration), **selection_row(analysis)})
    short = None
    short_path = os.path.join(SHORT, "analysis_supervised.json")
    if os.path.isfile(short_path):
        short_miou = 100 * read_metrics(os.path.join(SHORT, "metrics_supervised.jsonl"), "eval")[-1]["miou"]
        short = {"iter": 600, "miou": short_miou, **selection_row(_read(short_path))}
    return rows, short, curve


def table(rows: list[dict], short: dict | None) -> str:
    lines = ["| model (1/4 split, seed 2) | val mIoU (%) | pixel accuracy of the pseudo-labels (%) | threshold 0.95: "
             "share / accuracy (%) | model's wrong pixels kept by 0.95 (%) | CSL weighted: share / accuracy / recall "
             "(%) | most confident at CSL's share, per image: accuracy (%) | CSL minus confidence (points) |",
             "| --- |" + " ---: |" * 7]

    def line(name: str, r: dict) -> str:
        miou = "-" if r["miou"] is None else f"{r['miou']:.1f}"
        return (f"| {name} | {miou} | {r['model_accuracy']:.1f} | {r['thr_share']:.1f} / {r['thr_accuracy']:.1f} | "
                f"{r['wrong_kept']:.1f} | {r['csl_share']:.1f} / {r['csl_accuracy']:.1f} / {r['csl_recall']:.1f} | "
                f"{r['conf_accuracy']:.1f} | {r['csl_minus_conf']:+.2f} |")

    for r in rows:
        lines.append(line("warm-up (iteration 0)" if r["iter"] == 0 else f"long supervised, iteration {r['iter']}", r))
    if short is not None:
        lines.append(line("supervised only, 600 iterations (its own schedule)", short))
    return "\n".join(lines)


def picture(rows: list[dict], curve: list[tuple[int, float]], out_path: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    its = [r["iter"] for r in rows]
    axes[0].plot([0] + [i for i, _ in curve], [rows[0]["miou"]] + [m for _, m in curve], marker=".")
    axes[0].set(title="val mIoU", xlabel="iteration", ylabel="mIoU (%)")
    axes[1].plot(its, [r["csl_accuracy"] for r in rows], marker="o", label="CSL (weighted)")
    axes[1].plot(its, [r["conf_accuracy"] for r in rows], marker="s", label="most confident, same share per image")
    axes[1].set(title="pseudo-label accuracy at CSL's share", xlabel="iteration", ylabel="accuracy (%)")
    axes[1].legend(fontsize=8)
    axes[2].plot(its, [r["wrong_kept"] for r in rows], marker="o", color="C3")
    axes[2].set(title="model's wrong pixels with confidence >= 0.95", xlabel="iteration", ylabel="share (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("One supervised model trained long (CamVid 1/4, seed 2): does the confidence fail, does CSL help?",
                 y=1.04)
    return _save_figure(fig, out_path)


# The comparison's three continuations again, 600 iterations each, from the long run's iteration-4000 model: with
# the long run's seed (2; records ``metrics_from4000_<method>.jsonl``) and with seeds 3 and 4
# (``..._<method>_seed<N>.jsonl``).
CONTINUATIONS = {"supervised": "supervised only", "threshold": "threshold 0.95 (UniMatch)", "csl": "CSL (PCOS + TMP)"}
CONTINUATION_SEEDS = {2: "", 3: "_seed3", 4: "_seed4"}


def load_continuations() -> dict[tuple[str, int], dict]:
    """``{(method, seed): {"iters", "miou": [per evaluation], "pl": last pseudo_labels record or None}}`` of the
    records there are."""
    found = {}
    for seed, suffix in CONTINUATION_SEEDS.items():
        for method in CONTINUATIONS:
            path = os.path.join(LONG, f"metrics_from4000_{method}{suffix}.jsonl")
            if os.path.isfile(path) and (evals := read_metrics(path, "eval")):
                pl = read_metrics(path, "pseudo_labels")
                found[method, seed] = {"iters": [r["iter"] for r in evals], "miou": [100 * r["miou"] for r in evals],
                                       "pl": pl[-1] if pl else None}
    return found


def continuation_table(runs: dict[tuple[str, int], dict], start_miou: float) -> str:
    lines = [f"| continuation from the iteration-4000 model (mIoU {start_miou:.1f}) | seed | mIoU after each 100 "
             "iterations (%) | last (best) | minus threshold 0.95, last | pseudo-labels, last epoch: weighted share / "
             "accuracy / recall (%) |", "| --- | ---: | --- | ---: | ---: | --- |"]
    for method, label in CONTINUATIONS.items():
        for seed in CONTINUATION_SEEDS:
            if (method, seed) not in runs:
                continue
            r, base = runs[method, seed], runs.get(("threshold", seed))
            diff = f"{r['miou'][-1] - base['miou'][-1]:+.1f}" if base and method != "threshold" else ""
            pl = r["pl"]
            quality = "-" if pl is None else (f"{100 * pl['weighted_share']:.1f} / {100 * pl['weighted_accuracy']:.1f}"
                                              f" / {100 * pl['weighted_recall']:.1f}")
            lines.append(f"| {label} | {seed} | {', '.join(f'{m:.1f}' for m in r['miou'])} | {r['miou'][-1]:.1f} "
                         f"({max(r['miou']):.1f}) | {diff} | {quality} |")
    return "\n".join(lines)


def continuation_picture(runs: dict[tuple[str, int], dict], start_miou: float, out_path: str) -> str:
    """val mIoU of every continuation against its iterations, one colour per method, one line style per seed, the
    start model's mIoU as a dotted line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, label in CONTINUATIONS.items():
        colour = METHOD_COLOURS[method]  # as in every report picture
        for style, seed in zip(("-", "--", "-."), CONTINUATION_SEEDS, strict=True):
            if (method, seed) in runs:
                r = runs[method, seed]
                ax.plot([0] + r["iters"], [start_miou] + r["miou"], style, color=colour, marker=".",
                        label=f"{label}, seed {seed}")
    ax.axhline(start_miou, color="grey", linestyle=":", linewidth=1)
    ax.set(title=f"From the iteration-4000 supervised model ({start_miou:.1f} mIoU), 600 more iterations",
           xlabel="iteration", ylabel="val mIoU (%)")
    ax.grid(alpha=0.3)
    _legend_outside(ax)  # beside the lines
    return _save_figure(fig, out_path)


def main() -> None:
    rows, short, curve = load()
    print(table(rows, short))
    print(picture(rows, curve, os.path.join(RECORDS, "confidence_long.png")))
    runs = load_continuations()
    if runs:
        print(continuation_table(runs, rows[-1]["miou"]))
        print(continuation_picture(runs, rows[-1]["miou"], os.path.join(RECORDS, "from4000.png")))


if __name__ == "__main__":
    # No options: --help prints the description (and writes nothing), an unknown argument is a usage error.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
