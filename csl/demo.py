"""``csl demo``: supervised-only vs threshold (UniMatch) vs CSL on the embedded synthetic scenes, on CPU.

Protocol (everything from ``csl/configs/demo.yaml``: DeepLabV3+ ResNet-18 without ImageNet weights, small crops,
fixed seeds):

1. a shared supervised warm-up of ``warmup`` iterations from random initialisation at ``warmup_lr`` (it stands in
   for the ImageNet initialisation that a CPU demo cannot download: self-training needs a model whose pseudo-labels
   mean something; started from random weights, the semi-supervised methods fall far behind in a few hundred
   iterations);
2. from that checkpoint, each method trains ``train.iters`` more iterations (one epoch) with a fresh optimiser and
   poly schedule at ``train.lr`` —
   supervised only (the baseline: the same iterations and labeled batches, no unlabeled data), threshold 0.95
   without TMP (UniMatch), CSL (PCOS weights + Trusted Mask Perturbation);
3. the table: final validation mIoU, the quality of the pseudo-labels of the last epoch (accuracy and recall of the
   reliable pixels against the unlabeled ground truth, which training never sees; mask ratio = mean weight) and the
   wall time of each method. Also written to ``<out>/summary.md`` and ``<out>/summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from csl_kernels._checks import check_positive

from .config import build_config, dotted_leaves, load_config, parse_override
from .files import atomic_write_text
from .logging_utils import best_miou, read_metrics

DEFAULT_WARMUP = 300
DEFAULT_WARMUP_LR = 0.01  # from random initialisation; the methods then continue at the config's train.lr
# Config overrides that turn the demo config into each compared method.
METHODS: dict[str, dict] = {
    "supervised": {"train.mode": "supervised"},
    "threshold": {"train.mode": "semi", "selection.mode": "threshold", "tmp.enabled": False},
    "csl": {"train.mode": "semi", "selection.mode": "csl", "tmp.enabled": True},
    "csl_class": {"train.mode": "semi", "selection.mode": "csl_class", "tmp.enabled": True},
    "csl_no_tmp": {"train.mode": "semi", "selection.mode": "csl", "tmp.enabled": False},
    "confidence_share": {"train.mode": "semi", "selection.mode": "confidence_share", "tmp.enabled": False},
    "oracle": {"train.mode": "semi", "selection.mode": "oracle", "tmp.enabled": False},
}
# Keys each stage sets over the user's overrides, and the demo's own way to choose them.
DEMO_SETS = {
    "output_dir": "use --out", "train.init_from": "the methods start from the demo's warm-up (--warmup)",
    "train.mode": "choose the methods with --methods", "selection.mode": "choose the methods with --methods",
    "tmp.enabled": "choose the methods with --methods (csl, csl_no_tmp)",
    "train.resume": "the same command continues finished and stopped stages; --fresh starts over",
    "train.overwrite": "the same command continues finished and stopped stages; --fresh starts over",
}
LABELS = {"supervised": "supervised only", "threshold": "threshold 0.95 (UniMatch)", "csl": "CSL (PCOS + TMP)",
          "csl_class": "CSL class-wise (PCOS + TMP)", "csl_no_tmp": "CSL without TMP (PCOS)",
          "confidence_share": "CSL's share by confidence", "oracle": "true masks (oracle)"}


def _differences(cfg: dict) -> list[str] | None:
    """The settings in which ``cfg`` differs from the configuration stored in its run folder (``key: stored ->
    cfg``; ``[]``: the folder was written by this very configuration), or None when the folder holds no readable
    stored configuration. ``train.resume`` and ``train.overwrite`` aside; data paths compared resolved, as the
    trainer stores them, and the run folder and ``train.init_from`` as the folders they name: an absolute and a
    relative ``--out`` are the same run."""
    import yaml

    from .trainer import resolve_data_paths, stored_config

    path = os.path.join(cfg["output_dir"], "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            stored = yaml.safe_load(f)
        except yaml.YAMLError:
            return None
    if not isinstance(stored, dict) or not isinstance(stored.get("train"), dict) or "data" not in stored:
        return None

    def comparable(c: dict) -> dict:  # the run folder and the warm-up it starts from, however the path is spelled
        c = stored_config(resolve_data_paths(c))
        init = c["train"].get("init_from")
        return {**c, "output_dir": os.path.realpath(c["output_dir"]),
                "train": {**c["train"], "init_from": os.path.realpath(init) if init else init}}

    then, now = dotted_leaves(comparable(stored)), dotted_leaves(comparable(cfg))
    return [f"{key}: {then.get(key, '(unset)')} -> {now.get(key, '(unset)')}" for key in sorted({*then, *now})
            if then.get(key, object()) != now.get(key, object())]


def _logged_seconds(cfg: dict, until: int) -> float:
    """Training time of iterations ``<= until`` from the run's ``train`` records (evaluations not included)."""
    path = os.path.join(cfg["output_dir"], "metrics.jsonl")
    total, prev = 0.0, 0
    for r in read_metrics(path, "train") if os.path.isfile(path) else []:
        if r["iter"] <= until:
            total += r.get("sec_per_iter", 0.0) * (r["iter"] - prev)
            prev = r["iter"]
    return total


class DemoFolderError(ValueError):
    """A demo stage's folder holds a run that the asked configuration would replace."""


def run_stage(cfg: dict, train_fn, fresh: bool = False, new_start: bool = False) -> tuple[float, bool]:
    """Train ``cfg``'s run; return its seconds and whether a finished run was reused. Nothing done is lost when a
    comparison is stopped and started again: a run folder finished under the same config is reused as it is, one
    with a ``latest.pt`` from the same config continues from it (the trainer resumes exactly); unless ``fresh``, a
    folder with the checkpoints of another config, of a config that cannot be read, or (``new_start``: the model the
    stage starts from was trained in this call) of a run from an earlier start is refused (:class:`DemoFolderError`);
    a folder without a checkpoint starts afresh."""
    from .checkpoint import BEST, LATEST, checkpoint_iteration

    out = cfg["output_dir"]
    done, latest = os.path.join(out, "done.json"), os.path.join(out, LATEST)
    saved = [path for path in (latest, os.path.join(out, BEST)) if os.path.isfile(path)]
    before = 0.0
    differences = None if fresh or new_start else _differences(cfg)
    same = differences == []
    if not fresh and not same and (saved or os.path.isfile(done)):  # a run that this call would replace: never unasked
        if new_start:
            what = "that started from an earlier warm-up than the one trained now"
        elif differences is None:
            what = "whose config.yaml is missing or unreadable, so it cannot be compared with this configuration"
        else:
            what = "of another configuration (" + "; ".join(differences[:5]) + (
                f"; and {len(differences) - 5} more" if len(differences) > 5 else "") + ")"
        raise DemoFolderError(f"{out} holds a run {what}; pass --fresh to train every stage of the demo again in "
                              f"{os.path.dirname(out) or '.'}, or choose another --out")
    seconds = _done_seconds(done) if same else None
    if seconds is None and same and any(_slimmed(path) for path in saved):
        # Training finished (only a finished stage's checkpoints are slimmed) but the mark was lost: write it again.
        seconds = _logged_seconds(cfg, max(checkpoint_iteration(path) for path in saved))
        _write_done(done, seconds)
    if seconds is not None and (problem := _unusable(latest)) is not None:  # the next stages start from it
        print(f"   {done} marks the stage done, but {problem}: it runs again", flush=True)
        seconds, saved = None, []
    if seconds is not None:
        print(f"   already done ({seconds:.0f} s): {out}", flush=True)
        return seconds, True
    if same and saved:  # the trainer's resume=auto: the newer of latest.pt and best.pt
        iteration = max(checkpoint_iteration(path) for path in saved)
        before = _logged_seconds(cfg, iteration)
        print(f"   continuing from iteration {iteration} in {out} ({before:.0f} s of training logged)", flush=True)
        cfg = build_config(cfg, {"train.resume": "auto"})
    else:
        cfg = build_config(cfg, {"train.overwrite": True})  # afresh: the trainer replaces what the folder holds
    t0 = time.perf_counter()
    train_fn(cfg)
    seconds = before + time.perf_counter() - t0
    slim_checkpoints(out)
    _write_done(done, seconds)
    return seconds, False


def _write_done(path: str, seconds: float) -> None:
    atomic_write_text(path, json.dumps({"seconds": seconds}))  # a whole mark or none


def _unusable(path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be used (missing, unreadable), or None."""
    from .checkpoint import checkpoint_iteration

    if not os.path.isfile(path):
        return f"{path} is missing"
    try:
        checkpoint_iteration(path)
    except ValueError as e:
        return str(e)
    return None


def _slimmed(path: str) -> bool:
    """Whether the checkpoint at ``path`` was slimmed by :func:`slim_checkpoints` (no optimizer state left)."""
    import torch

    try:
        return "optimizer" not in torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: not a finished stage's checkpoint
        return False


def _done_seconds(path: str) -> float | None:
    """The training seconds a stage's ``done.json`` records; None when there is no readable mark (the stage is then
    taken as done when its checkpoints are slimmed, else continued from them or run again)."""
    try:
        with open(path) as f:
            return float(json.load(f)["seconds"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"   {path} is unreadable ({e}): the stage is not taken as done", flush=True)
        return None


# What a finished stage's checkpoints keep: the model and what describes it (no optimizer state, random streams or
# running sums, which only a resume needs).
SLIM_KEYS = ("format", "model", "iteration", "iters_per_epoch", "total_iters", "world_size", "batch_size",
             "num_classes", "best_miou", "last_eval", "config")


def slim_checkpoints(folder: str) -> None:
    """Shrink a finished run's ``latest.pt`` / ``best.pt`` to :data:`SLIM_KEYS` (about half the size with SGD
    momentum); a ``best.pt`` of the same iteration as ``latest.pt`` becomes a hard link to it (no second copy)."""
    from .checkpoint import BEST, LATEST, atomic_save, load_checkpoint

    latest, best = os.path.join(folder, LATEST), os.path.join(folder, BEST)
    iterations = {}
    for path in (latest, best):
        if os.path.isfile(path):
            ckpt = load_checkpoint(path)  # checked first: a damaged file rewritten would carry valid checksums
            iterations[path] = ckpt.get("iteration")
            if set(ckpt) - set(SLIM_KEYS):
                atomic_save({k: ckpt[k] for k in SLIM_KEYS if k in ckpt}, path)
    if latest in iterations and iterations.get(best) == iterations[latest]:
        tmp = best + ".link"
        with contextlib.suppress(FileNotFoundError):  # left by a kill between the link and the rename
            os.remove(tmp)
        os.link(latest, tmp)
        os.replace(tmp, best)


def warmup_config(base: dict, out_dir: str, iters: int, lr: float = DEFAULT_WARMUP_LR) -> dict:
    return build_config(base, {"train.mode": "supervised", "train.iters": int(iters),
                               "train.iters_per_epoch": int(iters), "train.lr": float(lr), "train.init_from": None,
                               "output_dir": os.path.join(out_dir, "warmup")})


def method_config(base: dict, method: str, out_dir: str, iters: int | None = None, init_from: str | None = None
                  ) -> dict:
    """``base`` turned into ``method``; ``iters`` replaces ``train.iters`` (epochs stay ``train.iters_per_epoch``
    long when that is shorter, so the pseudo-label metrics and evaluations keep their rhythm)."""
    if method not in METHODS:
        raise ValueError(f"unknown demo method {method!r}; choose from {sorted(METHODS)}")
    overrides = {**METHODS[method], "output_dir": os.path.join(out_dir, method), "train.init_from": init_from}
    if iters is not None:
        overrides["train.iters"] = int(iters)
        overrides["train.iters_per_epoch"] = min(int(iters), base["train"]["iters_per_epoch"] or int(iters))
    return build_config(base, overrides)


def _result(cfg: dict, seconds: float) -> dict:
    path = os.path.join(cfg["output_dir"], "metrics.jsonl")
    evals = read_metrics(path, "eval")
    pls = read_metrics(path, "pseudo_labels")
    last_pl = pls[-1] if pls else {}
    return {
        "miou": evals[-1]["miou"] if evals else None,
        "best_miou": best_miou(evals),
        "iou": evals[-1]["iou"] if evals else None,
        "pl_mask_ratio": last_pl.get("mask_ratio"),
        "pl_sampling_rate": last_pl.get("sampling_rate"),
        "pl_accuracy": last_pl.get("accuracy"),
        "pl_recall": last_pl.get("recall"),
        "pl_weighted_share": last_pl.get("weighted_share"),
        "pl_weighted_accuracy": last_pl.get("weighted_accuracy"),
        "pl_weighted_recall": last_pl.get("weighted_recall"),
        "iters": cfg["train"]["iters"],
        "seconds": seconds,
        "output_dir": cfg["output_dir"],
    }


def describe_data(d: dict) -> str:
    """The data of a run for the summary: the synthetic scenes' sizes, or the dataset with its split (the split folder,
    the bundled split's name, or the labeled list) and image scale."""
    if d["dataset"] == "synthetic":
        return (f"synthetic scenes ({d['num_classes']} classes): {d['synthetic']['num_labeled']} labeled / "
                f"{d['synthetic']['num_unlabeled']} unlabeled / {d['synthetic']['num_val']} val")
    split = d["split_dir"] or (f"split {d['split']}" if d.get("split") else d["labeled_list"])
    return f"{d['dataset']} {split}, image scale {d['image_scale']:g}"


def _fmt(value, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.0f}"


def percent_cells(record: dict, *keys: str) -> str:
    """``record``'s values at ``keys`` as percentages joined by " / " (``-`` for a missing one); ``-`` when none
    exists (records written before those keys were)."""
    values = [record.get(k) for k in keys]
    return "-" if all(v is None for v in values) else " / ".join(_fmt(v) for v in values)


def format_table(results: dict[str, dict]) -> str:
    """mIoU and the last epoch's pseudo-labels against the unlabeled ground truth: the reliable pixels (w = 1) and
    the soft weights the losses train on (the same for the threshold's 0/1 weights)."""
    lines = ["| method | mIoU (%) | reliable pixels: share / accuracy / recall (%) | weighted: share / accuracy / "
             "recall (%) | time (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for method, r in results.items():
        lines.append(f"| {LABELS.get(method, method)} | {_fmt(r['miou'])} | "
                     f"{percent_cells(r, 'pl_sampling_rate', 'pl_accuracy', 'pl_recall')} | "
                     f"{percent_cells(r, 'pl_weighted_share', 'pl_weighted_accuracy', 'pl_weighted_recall')} | "
                     f"{_fmt(r['seconds'], pct=False)} |")
    return "\n".join(lines)


def run_demo(out_dir: str = os.path.join("runs", "demo"), methods: list[str] | None = None, iters: int | None = None,
             warmup: int = DEFAULT_WARMUP, warmup_lr: float = DEFAULT_WARMUP_LR, overrides: list[str] | None = None,
             config: str = "demo", fresh: bool = False) -> dict[str, dict]:
    """Warm up, train each method, print and write the comparison table. Returns the per-method results.

    ``config``: the base config (bundled name or YAML path; ``demo`` = the synthetic demo, ``camvid`` = the CamVid
    experiment), ``overrides`` applied to it. Runs finished (or stopped) earlier in ``out_dir`` under the same
    configuration are reused (or continued), see :func:`run_stage`; ``fresh=True`` starts every run anew."""
    from .run_folder import check_output_folder
    from .trainer import train

    methods = ["supervised", "threshold", "csl"] if methods is None else list(methods)
    if not methods:
        raise ValueError(f"no demo method named; choose from {sorted(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown demo method {m!r}; choose from {sorted(METHODS)}")
    if len(set(methods)) < len(methods):
        raise ValueError(f"demo methods named more than once: {','.join(methods)} (each trains one stage folder)")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 iterations, got {warmup}")
    check_positive(warmup_lr, "warmup_lr (--warmup-lr)")  # said as its own flag, not as the train.lr it becomes
    if iters is not None and iters < 1:  # said before the warm-up, not after it
        raise ValueError(f"iters (--iters) must be >= 1, got {iters}")
    for item in overrides or []:
        key = parse_override(item)[0]
        if key in DEMO_SETS:
            raise ValueError(f"csl demo sets {key} itself for each stage, so {item!r} would do nothing: "
                             f"{DEMO_SETS[key]}")
    base = load_config(config, overrides)
    check_output_folder(out_dir, "--out")  # a file: said as the flag the user gave, before the first stage's header
    start = time.perf_counter()
    init_from, warm, new_warmup = None, None, False
    if warmup:
        cfg = warmup_config(base, out_dir, warmup, warmup_lr)
        print(f"\n== supervised warm-up: {warmup} iterations -> {cfg['output_dir']}", flush=True)
        seconds, reused = run_stage(cfg, train, fresh)
        warm = _result(cfg, seconds)
        init_from = os.path.join(cfg["output_dir"], "latest.pt")
        # The methods' configs name the warm-up checkpoint by its path only: runs left from before a warm-up that
        # was trained now started from another model (refused unless --fresh, which trains them again).
        new_warmup = not reused
    results: dict[str, dict] = {}
    for method in methods:
        cfg = method_config(base, method, out_dir, iters, init_from)
        print(f"\n== {LABELS[method]}: {cfg['train']['iters']} iterations -> {cfg['output_dir']}", flush=True)
        results[method] = _result(cfg, run_stage(cfg, train, fresh, new_start=new_warmup)[0])
    total = time.perf_counter() - start
    # Every stage's training time, also of the stages reused from earlier calls (their seconds are on record).
    training = (warm["seconds"] if warm else 0.0) + sum(r["seconds"] for r in results.values())
    d = base["data"]
    after = (f"after a shared supervised warm-up of {warmup} iterations at lr {warmup_lr:g} (mIoU "
             f"{_fmt(warm['miou'])}, {warm['seconds']:.0f} s), " if warm else "")
    init = f"from {base['model']['pretrained']}" if base["model"]["pretrained"] else "random init"
    note = (f"DeepLabV3+ {base['model']['backbone']} ({init}), crop {d['crop_size']}, batch "
            f"{base['train']['batch_size']}; {describe_data(d)}; seed {base['seed']}.\n"
            f"Each method: {after}{base['train']['iters'] if iters is None else iters} iterations at lr "
            f"{base['train']['lr']:g}. Pseudo-labels of the last epoch vs the unlabeled ground truth: the "
            f"reliable pixels (w = 1) and the soft weights (mean weight as share). Training "
            f"{training:.0f} s in all" + (f" ({total:.0f} s in this call)." if total < training - 1 else "."))
    table = format_table(results)
    print("\n" + table + "\n\n" + note, flush=True)
    atomic_write_text(os.path.join(out_dir, "summary.md"), table + "\n\n" + note + "\n")
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(
        {"results": results, "warmup": warm, "total_seconds": total, "training_seconds": training, "config": base,
         "note": note, "warmup_lr": warmup_lr, "warmup_iters": warmup}, indent=1))
    return results


__all__ = ["DEFAULT_WARMUP", "METHODS", "format_table", "method_config", "run_demo", "warmup_config"]
