"""The report of a method comparison (``csl demo --config ...``) and its ``csl analyze`` folders, as Markdown + PNG.

    csl report runs/camvid/seed0 [runs/camvid/seed1 ...] --out runs/camvid/report   (or python -m csl.report ...)

Each run folder holds ``summary.json`` (from ``csl demo``), ``<method>/metrics.jsonl`` and, optionally,
``analysis/<run>/analysis.json`` (from ``csl analyze``; every analysed run is reported). A run trained into the same
folder beside the demo's methods (e.g. ``csl train ... output_dir=<folder>/csl_no_tmp``) is reported with them, its
final mIoU read from its last evaluation. With several folders (seeds) the tables give each seed and the mean ± half
the range (max - min) / 2 for two seeds, ± the sample standard deviation for three or more, and the differences to the
threshold baseline seed by seed; ``miou_by_seed.png`` draws every seed's final mIoU per method.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from .analyze import BASELINE_TAU, baseline_row, split_suffix
from .data import class_names
from .demo import LABELS as METHOD_LABELS
from .demo import percent_cells
from .files import atomic_write_text
from .logging_utils import best_miou, read_metrics
from .run_folder import check_output_folder

# Run names beyond the demo's methods: the CSL stage with the released code's rule (docs/results/camvid.md).
LABELS = {"warmup": "warm-up", **METHOD_LABELS, "csl_released": "CSL, released code's rule"}


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{100 * v:.{digits}f}"


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; a file cut short or of another kind is a ValueError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON (cut short by a crash, or another file?): {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, expected an object")
    return obj


def load_run(folder: str) -> dict:
    """summary.json, the metrics of each method and the analyses of one run folder."""
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; is {folder} a `csl demo` output folder?")
    summary = _read_json(path)
    if not isinstance(summary.get("results"), dict) or not isinstance(summary.get("config"), dict):
        raise ValueError(f"{path} has no 'results' and 'config' objects; is {folder} a `csl demo` output folder?")
    methods = list(summary["results"])
    results = dict(summary["results"])
    # Runs trained beside the demo's (folders with a metrics.jsonl), after the demo's methods.
    beside = sorted(name for name in os.listdir(folder) if name not in ("warmup", *methods)
                    and os.path.isfile(os.path.join(folder, name, "metrics.jsonl")))
    metrics = {}
    for m in ["warmup", *methods, *beside]:
        p = os.path.join(folder, m, "metrics.jsonl")
        if os.path.isfile(p):
            records = read_metrics(p)  # read once: a torn line is warned about once
            metrics[m] = {kind: [r for r in records if r.get("kind") == kind] for kind in ("eval", "pseudo_labels")}
    unfinished = {}  # beside runs not known to have reached their last iteration: not in the tables
    for m in beside:
        evals = metrics[m]["eval"]
        total = evals[-1].get("total_iters") if evals else None
        config = os.path.join(folder, m, "config.yaml")
        known = total is not None or not os.path.isfile(config)  # without either: a record taken as finished
        if total is None and os.path.isfile(config):  # records written before evaluations carried the total
            total = _configured_iters(config)
            known = total is not None  # an epoch-based config whose epoch length came from the data: unknown
        if not evals:  # trained beside, never evaluated (stopped early): said, not silently left out
            unfinished[m] = (None, total)
        elif not known or (total is not None and evals[-1]["iter"] < total):
            unfinished[m] = (evals[-1]["iter"], total)
        elif evals:
            results[m] = {"miou": evals[-1]["miou"], "best_miou": best_miou(evals), "seconds": None}
            methods.append(m)
    analyses = {}
    # The demo's runs first, then any other analysed run of the folder (e.g. a CSL stage trained beside the demo).
    analysis_dir = os.path.join(folder, "analysis")
    analysed = sorted(os.listdir(analysis_dir)) if os.path.isdir(analysis_dir) else []
    for m in ["warmup", *methods, *(name for name in analysed if name not in ("warmup", *methods))]:
        p = os.path.join(analysis_dir, m, "analysis.json")
        if os.path.isfile(p):
            analyses[m] = _read_json(p)
    return {"folder": folder, "summary": summary, "methods": methods, "results": results, "metrics": metrics,
            "analyses": analyses, "unfinished": unfinished}


def _configured_iters(config_path: str) -> int | None:
    """The last iteration of a run from its stored config.yaml: ``train.iters``, else ``train.epochs`` x
    ``train.iters_per_epoch`` (None without a config, or when the epoch length came from the data set's size)."""
    if not os.path.isfile(config_path):
        return None
    import yaml

    with open(config_path) as f:
        train = yaml.safe_load(f)["train"]
    if train.get("iters"):
        return int(train["iters"])
    if train.get("epochs") and train.get("iters_per_epoch"):
        return int(train["epochs"]) * int(train["iters_per_epoch"])
    return None


def spread_name(n: int) -> str:
    """What the ± of :func:`_mean_spread` is over ``n`` seeds: half the range for two (both values are then
    mean ± it), the sample standard deviation for three or more."""
    return "half-range" if n <= 2 else "sd"


def _points(value: float, signed: bool = False) -> str:
    """``value`` in percent points to one decimal; a value that rounds to zero is ``0.0`` whatever its sign (a gap
    of -0.0004 is no loss)."""
    text = f"{100 * value:{'+' if signed else ''}.1f}"
    return "0.0" if text.lstrip("+-") == "0.0" else text


def _mean_spread(values: list, signed: bool = False) -> str:
    """Mean ± :func:`spread_name`, in percent (points), of the values that exist; says over how many when some do
    not."""
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "-"
    text = _points(float(np.mean(vals)), signed)
    if len(vals) > 1:  # the spread the header names for this many seeds
        spread = (max(vals) - min(vals)) / 2 if spread_name(len(values)) == "half-range" else np.std(vals, ddof=1)
        text += f" ± {100 * spread:.1f}"
    return text if len(vals) == len(values) else f"{text} ({len(vals)} of {len(values)} seeds)"


def all_methods(runs: list[dict]) -> list[str]:
    """The methods of every run, in the order they first appear."""
    return list(dict.fromkeys(m for r in runs for m in r["methods"]))


def _seed(run: dict):
    return run["summary"]["config"]["seed"]


def _warmup(run: dict, key: str):
    """``key`` ("miou", "seconds") of the run's warm-up in summary.json; None for a run without one."""
    warmup = run["summary"].get("warmup")
    return warmup.get(key) if warmup else None


def gaps_table(runs: list[dict], reference: str = "threshold") -> str:
    """Each method's final mIoU minus ``reference``'s, seed by seed (the runs of one seed share the warm-up, the
    labeled batches and the schedule, so the difference is the paired comparison), with the mean ± spread."""
    head = "| method | " + " | ".join(f"seed {_seed(r)} (points)" for r in runs)
    head += f" | mean ± {spread_name(len(runs))} (points) |" if len(runs) > 1 else " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for m in all_methods(runs):
        if m == reference:
            continue
        gaps = []
        for r in runs:
            a, b = r["results"].get(m, {}).get("miou"), r["results"].get(reference, {}).get("miou")
            gaps.append(None if a is None or b is None else a - b)
        cells = ["-" if g is None else _points(g, signed=True) for g in gaps]
        if len(runs) > 1:
            cells.append(_mean_spread(gaps, signed=True))
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(runs: list[dict]) -> str:
    """mIoU of each method per seed (and mean), with the selection quality of its final model when analysed."""
    head = "| method | " + " | ".join(f"mIoU seed {_seed(r)} (%)" for r in runs)
    head += f" | mean ± {spread_name(len(runs))} (%) |" if len(runs) > 1 else " |"
    head += " best mIoU (%) | time (s) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    rows = [("warmup", "warm-up (start of every method)")] + [(m, LABELS.get(m, m)) for m in all_methods(runs)]
    for key, label in rows:
        if key == "warmup":
            vals = [_warmup(r, "miou") for r in runs]
            best = [_warmup(r, "best_miou") for r in runs]
            secs = [_warmup(r, "seconds") for r in runs]
        else:
            vals = [r["results"].get(key, {}).get("miou") for r in runs]
            best = [r["results"].get(key, {}).get("best_miou") for r in runs]
            secs = [r["results"].get(key, {}).get("seconds") for r in runs]
        cells = [_pct(v) for v in vals]
        if len(runs) > 1:
            cells.append(_mean_spread(vals))
        cells.append(" / ".join(_pct(v) for v in best))
        cells.append(" / ".join("-" if s is None else f"{s:.0f}" for s in secs))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(run: dict, kind: str) -> dict[str, list[dict]]:
    """``{method label: records}`` of ``kind`` (``"eval"``, ``"pseudo_labels"``) of each method of ``run`` that has
    such records, in the run's order: what its ``miou_<tag>.png`` / ``pseudo_labels_<tag>.png`` draw."""
    return {LABELS.get(m, m): run["metrics"][m][kind] for m in run["methods"] if run["metrics"].get(m, {}).get(kind)}


def seed_finals(runs: list[dict]) -> dict[str, dict]:
    """``{method label: {seed: final mIoU}}``, the warm-up first: what ``miou_by_seed.png`` draws."""
    finals = {"warm-up": {_seed(r): _warmup(r, "miou") for r in runs if _warmup(r, "miou") is not None}}
    for m in all_methods(runs):
        finals[LABELS.get(m, m)] = {_seed(r): r["results"][m]["miou"] for r in runs if m in r["results"]}
    return finals


def final_record(run: dict, method: str) -> dict | None:
    """The final model's evaluation of ``method`` (``iter``, ``miou``, ``iou``): a demo method's from summary.json
    (its metrics.jsonl may end before it, cut by a crash), any other run's last evaluation record."""
    result = run["summary"]["results"].get(method)
    if result is not None and result.get("iou") is not None and result.get("iters") is not None:
        return {"iter": result["iters"], "miou": result["miou"], "iou": result["iou"]}
    evals = run["metrics"].get(method, {}).get("eval")
    return evals[-1] if evals else None


def analysed_run(folder_name: str, analysis: dict) -> str:
    """The run an analysis folder is of: ``csl analyze --split val`` writes ``<run>_val`` beside ``<run>``
    (:func:`csl.analyze.split_suffix`)."""
    suffix = split_suffix(analysis.get("split", "unlabeled"))
    return folder_name[:-len(suffix)] if suffix and folder_name.endswith(suffix) else folder_name


def analysed_label(folder_name: str, analysis: dict) -> str:
    """The method label of the run an analysis folder is of."""
    run = analysed_run(folder_name, analysis)
    return LABELS.get(run, run)


def per_class_table(run: dict) -> str:
    """Final val IoU per class of each method of one run; the classes named as ``csl eval`` and ``csl analyze`` name
    them (the dataset's names, :func:`csl.data.class_names`)."""
    evals = {m: final_record(run, m) for m in ["warmup", *run["methods"]]}
    evals = {m: e for m, e in evals.items() if e}
    if not evals:
        return "(no evaluation records)"
    count = len(next(iter(evals.values()))["iou"])
    data = run["summary"]["config"].get("data") or {}
    names = (run["analyses"].get("warmup") or next(iter(run["analyses"].values()), {})).get("class_names") or (
        class_names(data, count) if data.get("dataset") else [f"class {k}" for k in range(count)])
    lines = ["| class | " + " | ".join(LABELS.get(m, m) for m in evals) + " |",
             "| --- |" + " ---: |" * len(evals)]
    for k, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(_pct(e["iou"][k]) for e in evals.values()) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_pct(e['miou'])}**" for e in evals.values()) + " |")
    return "\n".join(lines)


def selection_table(analysis: dict) -> str:
    """Share / accuracy / recall of every rule on one analysed model."""
    lines = ["| rule | share (%) | accuracy (%) | recall (%) |", "| --- | ---: | ---: | ---: |"]

    def row(name, q, bold=False):
        cells = [_pct(q["share"]), _pct(q["accuracy"]), _pct(q["recall"])]
        if bold:
            name, cells = f"**{name}**", [f"**{c}**" for c in cells]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for r in analysis["threshold"]:
        row(f"confidence >= {r['tau']:g}", r, bold=abs(r["tau"] - BASELINE_TAU) < 1e-9)
    row("CSL per image, reliable (w = 1)", analysis["csl"]["hard"], bold=True)
    row("CSL per image, weighted", analysis["csl"]["weighted"], bold=True)
    row("CSL per class, reliable", analysis["csl_class"]["hard"])
    row("CSL per class, weighted", analysis["csl_class"]["weighted"])
    if "csl_released" in analysis:
        row("CSL, released code's rule, reliable", analysis["csl_released"]["hard"])
        row("CSL, released code's rule, weighted", analysis["csl_released"]["weighted"])
        if analysis.get("confidence_at_released_share"):  # None: no ranked pixel to cut
            row("confidence, best pixels at the released rule's weighted share",
                analysis["confidence_at_released_share"])
    for name, q in analysis["at_csl_share"].items():
        row(f"{name}, best pixels at CSL's weighted share (all images pooled)", q)
    if "confidence_per_image_at_csl_share" in analysis:
        row("confidence, best pixels of each image at its CSL amount", analysis["confidence_per_image_at_csl_share"])
    row("all pixels", analysis["all_pixels"])
    return "\n".join(lines)


def selection_summary_table(runs: list[dict]) -> str:
    """Threshold 0.95 vs CSL on every analysed model of every run, one line each."""
    lines = ["| seed | model | pixel acc. (%) | thr 0.95 share / acc. / recall (%) | CSL reliable share / acc. / "
             "recall (%) | CSL weighted share / acc. / recall (%) | confidence at CSL's share, pooled: acc. / recall "
             "(%) | confidence at CSL's amount per image: acc. / recall (%) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        seed = _seed(run)
        for m, a in run["analyses"].items():
            b = baseline_row(a)

            def three(q):
                return f"{_pct(q['share'])} / {_pct(q['accuracy'])} / {_pct(q['recall'])}"

            def two(q):
                return f"{_pct(q['accuracy'])} / {_pct(q['recall'])}" if q else "-"

            conf = a["at_csl_share"].get("confidence")
            per_image = a.get("confidence_per_image_at_csl_share")  # None in analyses written before it existed
            model = analysed_label(m, a)
            images = "" if a.get("split", "unlabeled") == "unlabeled" else f", {a['split']} images"
            lines.append(f"| {seed} | {model}{images} | {_pct(a['model_accuracy'])} | "
                         f"{three(b) if b else '-'} | {three(a['csl']['hard'])} | {three(a['csl']['weighted'])} | "
                         f"{two(conf)} | {two(per_image)} |")
    return "\n".join(lines)


def training_pl_table(run: dict) -> str:
    """Pseudo-label quality per epoch during training against the unlabeled ground truth: the reliable pixels
    (w = 1) and the soft weights (records written before the weighted ones existed show "-")."""
    lines = ["| method | iteration | mask ratio (%) | reliable: share / accuracy / recall (%) | weighted: share / "
             "accuracy / recall (%) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for m in run["methods"]:
        for r in run["metrics"].get(m, {}).get("pseudo_labels", []):
            lines.append(f"| {LABELS.get(m, m)} | {r['iter']} | {_pct(r.get('mask_ratio'))} | "
                         f"{percent_cells(r, 'sampling_rate', 'accuracy', 'recall')} | "
                         f"{percent_cells(r, 'weighted_share', 'weighted_accuracy', 'weighted_recall')} |")
    return "\n".join(lines)


def _written_before_its_checkpoint(folder: str, name: str, analysis: dict) -> bool:
    """Whether the analysis ``name`` of the run folder is older than the checkpoint it names, where that file is
    there: the run was trained again after the analysis (a retrained stage keeps the ``analysis/`` folder)."""
    checkpoint = analysis.get("checkpoint")
    written = os.path.join(folder, "analysis", name, "analysis.json")
    if not checkpoint or not os.path.isfile(checkpoint) or not os.path.isfile(written):
        return False
    return os.path.getmtime(checkpoint) > os.path.getmtime(written)


def write_report(folders: list[str], out_dir: str, overwrite: bool = False) -> str:
    """Write ``<out_dir>/report.md`` and its pictures; returns the Markdown path."""
    return write_report_and_pictures(folders, out_dir, overwrite)[0]


def write_report_and_pictures(folders: list[str], out_dir: str, overwrite: bool = False) -> tuple[str, list[str]]:
    """Write ``<out_dir>/report.md`` and its pictures; returns the Markdown path and the pictures' file names. A
    folder that holds a report is refused unless ``overwrite`` (then its pictures go with it)."""
    from .plots import plot_miou_by_seed, plot_miou_curves, plot_pseudo_label_curves

    check_output_folder(out_dir)
    if not overwrite and os.path.isfile(os.path.join(out_dir, "report.md")):
        raise FileExistsError(f"--out {out_dir} already holds a report (report.md); replace it with --overwrite, or "
                              f"choose another --out")
    runs = [load_run(f) for f in folders]
    seeds = [_seed(r) for r in runs]
    for seed in sorted(set(seeds)):
        if seeds.count(seed) > 1:  # the tables, pictures and differences are per seed
            same = [r["folder"] for r in runs if _seed(r) == seed]
            raise ValueError(f"{', '.join(same)} have the same seed {seed}; the report takes one folder per seed "
                             f"(report other comparisons, e.g. another split, separately)")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(os.path.join(out_dir, "report.md")):  # an earlier report: its pictures go with it
        for name in os.listdir(out_dir):
            if re.fullmatch(r"(miou_by_seed|miou_seed-?\d+|pseudo_labels_seed-?\d+)\.png", name):
                os.remove(os.path.join(out_dir, name))
    pictures = []
    parts = ["# Method comparison\n", "Run folders: " + ", ".join(f"`{r['folder']}`" for r in runs) + "\n"]
    for r in runs:
        note = r["summary"].get("note")
        if note:
            parts.append(f"Seed {_seed(r)}: {note}\n")
        for m, (last, total) in r["unfinished"].items():
            of = f"of {total}" if total is not None else "(its total is unknown: an epoch-based run recorded before " \
                                                         "evaluations carried it)"
            when = "before its first evaluation" if last is None else f"after its evaluation at iteration {last} {of}"
            parts.append(f"Seed {_seed(r)}: `{m}` stopped {when}; it is not in the tables.\n")
        for m in r["methods"]:  # a demo method's records cut short (a crash while writing): the curves stop early
            evals, final = r["metrics"].get(m, {}).get("eval"), final_record(r, m)
            if evals and final and evals[-1]["iter"] < final["iter"]:
                parts.append(f"Seed {_seed(r)}: `{m}/metrics.jsonl` ends at the evaluation of iteration "
                             f"{evals[-1]['iter']}; the final model's (iteration {final['iter']}) is summary.json's.\n")
            elif not evals and m in r["summary"]["results"]:  # deleted, or never copied with the folder
                what = "is missing: its curves are" if m not in r["metrics"] else \
                    "holds no evaluation record: its mIoU curve is"
                parts.append(f"Seed {_seed(r)}: `{m}/metrics.jsonl` {what} not drawn; its figures in the tables are "
                             f"summary.json's.\n")
        for m, a in r["analyses"].items():  # an analysis of another checkpoint than the run's final model
            final = final_record(r, analysed_run(m, a))
            at = a.get("checkpoint_iteration")
            if final and at is not None and at != final["iter"]:
                parts.append(f"Seed {_seed(r)}: the analysis of `{m}` is of `{os.path.basename(a['checkpoint'])}` "
                             f"at iteration {at}, not of the final model (iteration {final['iter']}).\n")
            elif _written_before_its_checkpoint(r["folder"], m, a):
                parts.append(f"Seed {_seed(r)}: the analysis of `{m}` was written before its checkpoint "
                             f"`{a['checkpoint']}`, which was trained again since (csl demo --fresh, csl train "
                             f"--overwrite): it describes an earlier model; run csl analyze --overwrite again.\n")
    parts += ["## Validation mIoU (final model; best of the evaluations in the next column)\n", results_table(runs),
              ""]
    if any("threshold" in r["results"] for r in runs):
        parts += ["### Difference to the threshold 0.95, seed by seed (final mIoU)\n", gaps_table(runs), ""]
    if len(runs) > 1:
        plot_miou_by_seed(seed_finals(runs), os.path.join(out_dir, "miou_by_seed.png"))
        pictures.append("miou_by_seed.png")
        parts += ["![final val mIoU of each method, one line per seed](miou_by_seed.png)\n"]
    if any(r["analyses"] for r in runs):
        splits = sorted({a.get("split", "unlabeled") for r in runs for a in r["analyses"].values()})
        which = " and ".join("validation" if s == "val" else s for s in splits)
        parts += [f"## Selection quality on the {which} images (`csl analyze`)\n", selection_summary_table(runs), ""]
    for r in runs:
        seed = _seed(r)
        tag = f"seed{seed}"
        parts += [f"## Seed {seed}\n", "### Per-class IoU (val, final models)\n", per_class_table(r), ""]
        pl = curves(r, "pseudo_labels")
        if pl:
            name = f"pseudo_labels_{tag}.png"
            plot_pseudo_label_curves(pl, os.path.join(out_dir, name))
            pictures.append(name)
            parts += ["### Pseudo-labels during training\n", f"![pseudo-label quality per epoch]({name})\n",
                      training_pl_table(r), ""]
        ev = curves(r, "eval")
        if ev:
            name = f"miou_{tag}.png"
            plot_miou_curves(ev, os.path.join(out_dir, name))
            pictures.append(name)
            parts += [f"![val mIoU per evaluation]({name})\n"]
        for m, a in r["analyses"].items():
            model = analysed_label(m, a)
            parts += [f"### Selection on the {a['images']} {a['split']} images, model: {model}\n",
                      f"Model pixel accuracy {_pct(a['model_accuracy'])} %, {a['valid_pixels']} valid pixels, "
                      f"alpha {a['alpha']:g}. Pictures: `{os.path.join(r['folder'], 'analysis', m)}/`.\n",
                      selection_table(a), ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path, pictures


def main(argv: list[str] | None = None) -> int:
    """``python -m csl.report ...``: the same as ``csl report ...``."""
    from .cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
