"""Command line: ``csl train | eval | predict | analyze | demo | split | report`` (also ``python -m csl ...``).

    csl train --config voc_321 data.root=/data/VOC2012 data.split=1464 [key=value ...]
    torchrun --nproc_per_node 4 -m csl train --config cityscapes_801 ...    (or srun -n 4 python -m csl train ...)
    csl eval --checkpoint runs/voc/best.pt [--config cfg.yaml] [key=value ...]
    csl predict --checkpoint runs/voc/best.pt --images img1.jpg dir/ 'glob/*.png' --out preds/
    csl analyze --checkpoint runs/camvid/csl/latest.pt [--split unlabeled|val] [--out DIR]
    csl demo [--out runs/demo] [--iters N]
    csl split --list data/camvid/train.txt --fractions 1/8 1/4 --seed 0 --out my_splits/camvid
    csl report runs/camvid/seed0 [runs/camvid/seed1 ...] --out runs/camvid/report

``--config`` takes a YAML path or the name of a bundled config (``csl/configs/``, listed by ``csl train --help``);
``eval`` / ``predict`` default to the config stored in the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from typing import NamedTuple

from . import stop
from .config import (
    CONFIG_DIR,
    RENAMED,
    ConfigError,
    build_config,
    config_yaml,
    load_config,
    migrate_renamed,
    parse_override,
)
from .demo import METHODS

log = logging.getLogger("csl")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# UniMatch's unimatch.py arguments that `csl train` takes, and the config key each sets.
TRAIN_FLAG_KEYS = {"--labeled-id-path": "data.labeled_list", "--unlabeled-id-path": "data.unlabeled_list",
                   "--save-path": "output_dir"}


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="csl", description="CSL semi-supervised semantic segmentation trainer")
    p.add_argument("--version", action="version", version=f"csl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,analyze,demo,split,report}")
    add = sub.add_parser
    p.commands = sub.choices  # each subcommand's parser, by name

    def command(name: str, help: str, **kwargs) -> argparse.ArgumentParser:  # noqa: A002 - argparse's name
        """A subcommand whose --help starts with what it does (argparse shows ``help`` only in the list)."""
        return add(name, help=help, description=help[0].upper() + help[1:] + ".", **kwargs)

    bundled = ", ".join(sorted(os.path.splitext(f)[0] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")))
    keys_help = (f"bundled configs: {bundled} (csl/configs/). Every key, its default and meaning: the README's "
                 f"configuration table and csl/config.py (DEFAULTS); override any with key=value.")
    t = command("train", "train a model (CPU, one GPU, or under torchrun or srun)", epilog=keys_help)
    t.add_argument("--config", required=True, help="YAML file or bundled config name, or UniMatch's "
                                                    "configs/<dataset>.yaml (read as the csl config of its recipe)")
    t.add_argument("--resume", help="checkpoint to resume from, or 'auto' (the newer of output_dir's latest.pt and "
                                    "best.pt, latest.pt on a tie; neither: a new run)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a run already in output_dir (without it, or --resume, such a folder is refused)")
    t.add_argument("--print-config", action="store_true",
                   help="print the merged, validated config as YAML and exit (nothing is trained or written)")
    unimatch = t.add_argument_group("UniMatch's flags", "unimatch.py's arguments, so that its scripts run csl as "
                                    "they are; each sets a config key")
    for flag, key in TRAIN_FLAG_KEYS.items():
        unimatch.add_argument(flag, metavar="PATH", help=f"sets {key}")
    unimatch.add_argument("--port", type=int, help="the processes' MASTER_PORT: under srun -n N (as UniMatch's "
                                                   "scripts/slurm_train.sh) this port; under torchrun where it set "
                                                   "none, its port otherwise")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.002")

    e = command("eval", "evaluate a checkpoint on the validation set (mIoU, per-class IoU)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--config", help="YAML file or bundled name (default: the config stored in the checkpoint)")
    e.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                   help="first re-estimate the BatchNorm statistics on N clean training images (the split's "
                        "unlabeled list; default 0 = keep the checkpoint's)")
    e.add_argument("--bn-views", choices=("frames", "crops"), default="frames",
                   help="what --bn-recalibrate runs the model on: whole frames, two per batch (default), or the "
                        "crops training takes (random scale, data.crop_size crop, flip; no colour augmentation), "
                        "train.batch_size per batch, seeded by the config's seed")
    e.add_argument("overrides", nargs="*", metavar="key=value")

    pr = command("predict", "write colour PNG predictions for images")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--config", help="YAML file or bundled name (default: the config stored in the checkpoint)")
    pr.add_argument("--images", required=True, nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("--out", required=True, help="output folder: one PNG per image, at the image's path relative to "
                                                 "the folder all images share (a photo with an EXIF orientation "
                                                 "upright, as viewers show it)")
    pr.add_argument("--overwrite", action="store_true", help="replace predictions that exist in --out")
    pr.add_argument("--skip-existing", action="store_true",
                    help="keep predictions that exist in --out and predict the other images (continues an "
                         "interrupted run: each PNG is written whole or not at all)")
    pr.add_argument("overrides", nargs="*", metavar="key=value")

    a = command("analyze", "pseudo-label selection quality of a checkpoint on images with masks "
                                       "(threshold sweep, CSL, entropy, margin; JSON + pictures)")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--config", help="YAML file or bundled name (default: the config stored in the checkpoint)")
    a.add_argument("--out", help="output folder (default: <demo folder>/analysis/<run> for a run of a csl demo "
                                 "folder, where the report reads it, else <checkpoint folder>/analysis; _val "
                                 "appended for --split val)")
    a.add_argument("--overwrite", action="store_true", help="replace an analysis already in the output folder")
    a.add_argument("--max-ranked-pixels", type=int, default=None,
                   help="pixels kept for the cuts at a share (entropy, margin, confidence at CSL's share; default "
                        "20 million, beyond that a uniform sample); thresholds and CSL count every pixel")
    a.add_argument("--split", default="unlabeled", choices=("unlabeled", "val"),
                   help="images to analyse: the split's unlabeled part (default) or the validation set")
    a.add_argument("--max-images", type=int, help="analyse only the first N images")
    a.add_argument("--panels", type=int, default=4, help="images shown in panels.png (default 4)")
    a.add_argument("overrides", nargs="*", metavar="key=value")

    d = command("demo", "supervised vs threshold vs CSL on the embedded synthetic data (CPU, minutes) "
                                    "or, with --config, on another dataset")
    d.add_argument("--config", default="demo", help="base config (default demo; camvid = the CamVid experiment)")
    d.add_argument("--out", default=os.path.join("runs", "demo"), help="run folder (default runs/demo)")
    d.add_argument("--iters", type=int,
                   help="iterations per method after the warm-up (default: the --config's train.iters)")
    d.add_argument("--warmup", type=int, default=None, help="shared supervised warm-up iterations (default 300)")
    d.add_argument("--warmup-lr", type=float, default=None, help="learning rate of the warm-up (default 0.01)")
    d.add_argument("--fresh", action="store_true",
                   help="start every run anew (default: reuse runs finished in --out under the same config, "
                        "continue stopped ones, and refuse a folder holding a run of another config)")
    d.add_argument("--methods", default="supervised,threshold,csl",
                   help=f"comma-separated subset of {','.join(METHODS)} (default supervised,threshold,csl)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config")

    s = command("split", "write UniMatch-style semi-supervised split folders from a list")
    s.add_argument("--list", required=True, help="list of 'img mask' lines (e.g. a dataset's train.txt)")
    s.add_argument("--fractions", nargs="+", required=True, help="labeled fractions, e.g. 1/8 1/4")
    s.add_argument("--seed", type=int, default=0, help="seed of the permutation (default 0)")
    s.add_argument("--out", required=True, help="folder that receives <a_b>/labeled.txt and unlabeled.txt")
    s.add_argument("--overwrite", action="store_true",
                   help="replace split files that exist with other content (else that is an error)")

    r = command("report", "write the Markdown + PNG report of csl demo run folders (one per seed) and their analyses")
    r.add_argument("runs", nargs="+", help="run folders of `csl demo --config ...` (one per seed)")
    r.add_argument("--out", required=True, help="folder for report.md and its pictures")
    r.add_argument("--overwrite", action="store_true", help="replace a report already in --out (and its pictures)")
    return p


WHERE_IT_RAN = ("device=auto", "kernels.backend=auto")


def config_for_checkpoint(path: str, ckpt: dict, config: str | None = None, overrides: list[str] | None = None) -> dict:
    """The config to evaluate / analyse / predict with ``ckpt``: ``config`` when given, else the one it stores."""
    if config:
        return load_config(config, overrides)
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} stores no config (a UniMatch / CSL checkpoint?); pass --config, e.g. "
                          f"--config voc_321 for their Pascal model")
    # Where the run trained (its device, its kernels' backend) is not part of the model: a GPU run's checkpoint is
    # evaluated with this machine's choice (the backends compute the same; another device type may differ in the
    # last bits), unless the overrides name one.
    with warnings.catch_warnings():  # a key renamed since the run was trained is the checkpoint's, not the user's
        warnings.simplefilter("ignore", FutureWarning)
        stored = migrate_renamed(stored)
    given = {RENAMED.get(key, key) for key, _ in map(parse_override, overrides or [])}  # selection.backend too
    defaults = [o for o in WHERE_IT_RAN if parse_override(o)[0] not in given]
    return build_config(stored, [*defaults, *(overrides or []), *_moved_with_the_root(stored, overrides)])


def _moved_with_the_root(stored: dict, overrides: list[str] | None) -> list[str]:
    """With ``data.root=NEW`` given for a checkpoint, its stored data paths (split folder, lists) that lay under the
    stored root and are no longer there are read under NEW (said on stderr), as overrides; a path given is kept."""
    given = dict(parse_override(o) for o in overrides or [])
    old_root, new_root = (stored.get("data") or {}).get("root"), given.get("data.root")
    if not old_root or not new_root:
        return []
    from .trainer import DATA_PATH_KEYS

    moved = []
    for key in DATA_PATH_KEYS:
        path = stored["data"].get(key)
        if key == "root" or f"data.{key}" in given or not isinstance(path, str) or os.path.exists(path):
            continue
        if _within(os.path.abspath(path), os.path.abspath(old_root)):
            new = os.path.join(new_root, os.path.relpath(os.path.abspath(path), os.path.abspath(old_root)))
            print(f"csl: the checkpoint's data.{key} {path} is not there; read under data.root: {new}",
                  file=sys.stderr)
            moved.append(f"data.{key}={json.dumps(new)}")  # a path, quoted: ' #' stays in it
    return moved


@contextlib.contextmanager
def stored_data_paths(path: str, config: str | None, overrides: list[str] | None):
    """Within it, a data path (``data.root``, ``data.split_dir``) that is not found, when it is the one stored in the
    checkpoint ``path`` (no ``--config``, no override of that key), is said to be that and how to point it
    elsewhere."""
    from .data import DataPathNotFound

    try:
        yield
    except DataPathNotFound as e:
        if config or any(parse_override(o)[0] == e.key for o in overrides or []):
            raise
        raise DataPathNotFound(f"{e}: the path stored in {path}'s config, where the run was trained; pass "
                               f"{e.key}=DIR where it is on this machine", e.key) from e


def model_from_checkpoint(cfg: dict, ckpt: dict, path: str, device):
    """The checkpoint's model in eval mode on ``device`` and its class count. A config whose ``data.num_classes``
    differs from the checkpoint's is an error (its ground truth would be scored against the wrong classes)."""
    from .checkpoint import checkpoint_weights, load_weights
    from .model import build_model

    state, num_classes = checkpoint_weights(cfg["model"], ckpt, path, num_classes=cfg["data"]["num_classes"])
    model_cfg = dict(cfg["model"], pretrained=None)  # the checkpoint holds every weight
    model = build_model(model_cfg, num_classes)
    load_weights(model, state, path)
    return model.to(device).eval(), num_classes


def val_dataset(cfg: dict):
    """The validation set alone (no labeled / unlabeled split files needed)."""
    from .data import build_val_dataset

    return build_val_dataset({k: v for k, v in cfg["data"].items() if v is not None})


def cmd_train(args) -> int:
    from .distributed import adopt_srun_launch, cleanup_distributed, first_process_by_environment
    from .trainer import train

    adopt_srun_launch(args.port)  # before anything reads RANK; srun -n N: the tasks meet at --port
    overrides = list(args.overrides)
    paths = {"--resume": (args.resume, "train.resume")}
    paths.update({flag: (getattr(args, flag[2:].replace("-", "_")), key) for flag, key in TRAIN_FLAG_KEYS.items()})
    for flag, (value, key) in {**paths, "--overwrite": (args.overwrite, "train.overwrite")}.items():
        if value and any(parse_override(o)[0] == key for o in overrides):
            raise ConfigError(f"{flag} and {key}= are both given; pass one")
    for value, key in paths.values():
        if value:  # a path, not YAML: quoted (as JSON, which YAML reads), so that ' #' or ': ' stay in it
            overrides.append(f"{key}={json.dumps(value)}")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    if args.port is not None:  # the range checked; under srun MASTER_PORT is --port already
        use_port(args.port)
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    try:
        summary = train(cfg)
    finally:
        cleanup_distributed()
    if summary.get("best_miou") is not None and first_process_by_environment():  # once under torchrun
        print(f"best mIoU {100 * summary['best_miou']:.2f}  ({cfg['output_dir']})")
    return 0


def cmd_eval(args) -> int:
    import json

    if args.bn_recalibrate < 0:
        raise ValueError(f"--bn-recalibrate must be >= 0 (0 keeps the checkpoint's statistics), got "
                         f"{args.bn_recalibrate}")

    from csl_kernels import IGNORE_INDEX

    from .checkpoint import load_checkpoint
    from .data import class_names, default_eval_mode
    from .distributed import adopt_srun_launch, cleanup_distributed, init_distributed
    from .evaluate import evaluate, make_eval_loader
    from .logging_utils import setup_logging
    from .step import resolve_amp
    from .trainer import check_kernels_backend

    srun = adopt_srun_launch()  # before anything reads RANK
    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_for_checkpoint(args.checkpoint, ckpt, args.config, args.overrides)
    env = init_distributed(cfg["device"], cfg["dist_timeout_min"])
    setup_logging(None, env.is_main)
    if srun is not None:
        log.info("%s", srun.description)
    try:
        with stored_data_paths(args.checkpoint, args.config, args.overrides):
            check_kernels_backend(cfg["kernels"]["backend"], env.device, ops=("confusion_matrix",))
            model, num_classes = model_from_checkpoint(cfg, ckpt, args.checkpoint, env.device)
            if args.bn_recalibrate:
                from .bn import CleanImages, TrainingCrops, recalibrate_batchnorm

                if args.bn_views == "crops":
                    images, batch = TrainingCrops(cfg, seed=cfg["seed"]), max(2, int(cfg["train"]["batch_size"]))
                else:
                    images, batch = CleanImages(cfg), 2
                used = recalibrate_batchnorm(model, images, env.device, args.bn_recalibrate, progress=env.is_main,
                                             batch_size=batch)
                log.info("BatchNorm statistics re-estimated on %d clean training %s, %d per batch", used,
                         "frames" if args.bn_views == "frames" else f"crops of {images.weak.size}", batch)
            loader = make_eval_loader(val_dataset(cfg), batch_size=cfg["eval"]["batch_size"],
                                      num_workers=min(cfg["data"]["num_workers"], 2))
            mode = cfg["eval"]["mode"] or default_eval_mode(cfg["data"]["dataset"])
            result = evaluate(model, loader, num_classes, mode=mode, crop_size=cfg["eval"]["crop_size"] or
                              cfg["data"]["crop_size"], stride_ratio=cfg["eval"]["stride_ratio"], device=env.device,
                              amp_dtype=resolve_amp(cfg["eval"]["amp"], env.device, "eval.amp"),
                              ignore_index=IGNORE_INDEX, backend=cfg["kernels"]["backend"],
                              progress=env.is_main)
    finally:
        cleanup_distributed()
    if result["pixel_acc"] != result["pixel_acc"]:  # NaN: no pixel to score
        raise ValueError(f"the validation set ({len(loader.dataset)} images) has no labelled pixel (every mask pixel "
                         f"ignored): mIoU is undefined; check the val list and data.ignore_index / data.ignore_labels")
    if env.is_main:
        print(f"mIoU {100 * result['miou']:.2f}  pixel accuracy {100 * result['pixel_acc']:.2f}  ({mode}, "
              f"{len(loader.dataset)} images)")
        names = class_names(cfg["data"], num_classes)
        width = max(len(name) for name in names)
        for k, (name, iou) in enumerate(zip(names, result["iou"], strict=True)):
            print(f"  {k:3d} {name:<{width}}  IoU " + ("  n/a" if iou != iou else f"{100 * iou:5.2f}"))
        # The machine-readable line: fractions in [0, 1] (the lines above are percentages), None for a class
        # without pixels in the labels or the predictions.
        print(json.dumps({"miou": result["miou"], "pixel_acc": result["pixel_acc"], "iou": [
            None if v != v else v for v in result["iou"]], "class_names": names, "mode": mode}))
    return 0


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both absolute, resolved alike)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class ExpandedImages(NamedTuple):
    """What ``--images`` named: ``paths`` to predict (each file once), ``skipped`` (earlier predictions found inside
    the output folder), ``repeats``: ``(path, kept)`` for each path that is another name of a file already listed
    as ``kept`` (a link, or another spelling of its path), predicted once under the name ``kept``, and ``others``:
    the files a folder or pattern found that are not images by their extension (left out)."""

    paths: list[str]
    skipped: list[str]
    repeats: list[tuple[str, str]]
    others: list[str] = []


def expand_images(items: list[str], skip_under: str | None = None) -> ExpandedImages:
    """The image files ``items`` name: files as given; folders expanded to their images (sorted, recursive); glob
    patterns expanded, a matched folder like a folder, matched files kept when they have an image extension.
    Where the output folder ``skip_under`` lies inside a folder or a pattern's fixed part that is searched, the files
    found inside it (earlier predictions) are skipped instead; a file named as such is always kept. A file found
    twice is predicted once: under the same name silently (a folder and a pattern over it), under another name (a
    link) returned in ``repeats``."""
    out = os.path.realpath(skip_under) if skip_under else None
    paths: list[str] = []
    skipped: list[str] = []
    others: list[str] = []

    def is_image(path: str) -> bool:
        return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS

    def found(images: list[str], searched: str) -> int:
        """``images`` found by searching the folder ``searched``: kept, or skipped inside an output folder in it."""
        skip_out = out is not None and _within(out, os.path.realpath(searched))
        for path in images:
            (skipped if skip_out and _within(os.path.realpath(path), out) else paths).append(path)
        return len(images)

    def walk(folder: str, searched: str) -> int:
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs)
        others.extend(f for f in files if not is_image(f))
        return found([f for f in files if is_image(f)], searched)

    for item in items:
        if os.path.isdir(item):
            if not walk(item, item):
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {item}")
        elif os.path.isfile(item):
            paths.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such image, folder or pattern: {item}")
            fixed = []  # the pattern's folder before its first wildcard: the folder it searches
            for part in os.path.dirname(item).split(os.sep):
                if any(c in part for c in "*?["):
                    break
                fixed.append(part)
            searched = os.sep.join(fixed) or "."
            count = 0
            for match in matches:  # in the matches' order
                if os.path.isdir(match):
                    count += walk(match, searched)
                elif is_image(match):
                    count += found([match], searched)
                else:
                    others.append(match)
            if not count:
                raise FileNotFoundError(f"the pattern {item} matches no image ({', '.join(IMAGE_EXTENSIONS)}): "
                                        f"{', '.join(matches[:3])}{', ...' if len(matches) > 3 else ''}")
    unique: dict[str, str] = {}
    repeats: list[tuple[str, str]] = []
    for p in paths:
        kept = unique.setdefault(os.path.realpath(p), p)
        if kept != p:
            repeats.append((p, kept))
    return ExpandedImages(list(unique.values()), skipped, repeats, others)


def cmd_predict(args) -> int:
    from .checkpoint import load_checkpoint
    from .data import IMAGENET_MEAN, IMAGENET_STD, default_eval_mode
    from .distributed import pick_device
    from .evaluate import predict_images
    from .logging_utils import setup_logging
    from .step import resolve_amp

    setup_logging(None, True)  # the progress lines, the --skip-existing summary and the skipped images are log lines
    # --images takes every word after it: key=value words that are no file are the overrides that followed
    images = [w for w in args.images if "=" not in w or os.path.exists(w)]
    args.overrides = [w for w in args.images if w not in images] + list(args.overrides)
    if not images:
        raise ValueError("--images got no image, folder or pattern")
    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_for_checkpoint(args.checkpoint, ckpt, args.config, args.overrides)
    device = pick_device(cfg["device"])
    paths, earlier, repeats, others = expand_images(images, skip_under=args.out)
    if others:
        kinds = sorted({os.path.splitext(f)[1].lower() or "no extension" for f in others})
        print(f"csl predict: {len(others)} file(s) found are not images by their extension ({', '.join(kinds[:5])}"
              f"{', ...' if len(kinds) > 5 else ''}) and are left out, e.g. {others[0]}; images are "
              f"{', '.join(IMAGE_EXTENSIONS)}", file=sys.stderr)
    if repeats:
        print(f"csl predict: {len(repeats)} path(s) name an image already listed under another name (a link?) and "
              f"are predicted once, e.g. {repeats[0][0]} as {repeats[0][1]}", file=sys.stderr)
    if earlier:
        print(f"csl predict: {len(earlier)} image(s) inside --out {args.out} (earlier predictions) not predicted, "
              f"e.g. {earlier[0]}", file=sys.stderr)
    if not paths:
        raise ValueError(f"--images names no image outside --out {args.out}")
    model, num_classes = model_from_checkpoint(cfg, ckpt, args.checkpoint, device)
    d = cfg["data"]
    skipped: list = []
    written = predict_images(model, paths, args.out, num_classes=num_classes, mean=tuple(d["mean"] or IMAGENET_MEAN),
                             std=tuple(d["std"] or IMAGENET_STD), mode=cfg["eval"]["mode"] or
                             default_eval_mode(d["dataset"]), crop_size=cfg["eval"]["crop_size"] or d["crop_size"],
                             device=device, stride_ratio=cfg["eval"]["stride_ratio"],
                             amp_dtype=resolve_amp(cfg["eval"]["amp"], device, "eval.amp"),
                             dataset=d["dataset"] if d["dataset"] != "synthetic" else None,
                             image_scale=d["image_scale"], overwrite=args.overwrite,
                             skip_existing=args.skip_existing, skipped=skipped)
    print(f"wrote {len(written)} prediction(s) to {args.out}")
    if skipped:
        print(f"csl predict: {len(skipped)} image(s) could not be read and were skipped, e.g. {skipped[0][0]}: "
              f"{skipped[0][1]}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from .demo import DEFAULT_WARMUP, DEFAULT_WARMUP_LR, run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    warmup_lr = DEFAULT_WARMUP_LR if args.warmup_lr is None else args.warmup_lr
    run_demo(args.out, methods=methods, iters=args.iters, warmup=warmup, warmup_lr=warmup_lr,
             overrides=args.overrides, config=args.config, fresh=args.fresh)
    return 0


def cmd_analyze(args) -> int:
    from .analyze import BASELINE_TAU, DEFAULT_MAX_RANKED_PIXELS, baseline_row, default_out_dir, run_analysis
    from .logging_utils import setup_logging

    setup_logging(None, True)
    out = args.out or default_out_dir(args.checkpoint, args.split)
    r = run_analysis(args.checkpoint, out, overrides=args.overrides, config=args.config, split=args.split,
                     max_images=args.max_images, panels=args.panels, overwrite=args.overwrite,
                     max_ranked_pixels=DEFAULT_MAX_RANKED_PIXELS if args.max_ranked_pixels is None
                     else args.max_ranked_pixels)

    def pct(value, width):
        return f"{'-':>{width}} " if value is None else f"{100 * value:{width - 1}.1f}%"

    skipped = f", {len(r['skipped_images'])} skipped (no usable mask)" if r["skipped_images"] else ""
    print(f"{r['images']} images ({r['split']}){skipped}, {r['valid_pixels']} valid pixels, model pixel accuracy "
          f"{pct(r['model_accuracy'], 6).strip()}")
    base = baseline_row(r)
    trained = r["rule"]  # the rule the checkpoint's config trains with comes first
    rules = [("csl", "paper rule"), ("csl_released", "released rule")]
    rules.sort(key=lambda kv: kv[0] != ("csl_released" if trained == "released" else "csl"))
    rows = ([(f"threshold {BASELINE_TAU:g}", base)] if base else [])
    for key, label in rules:
        rows += [(f"CSL {label}, w = 1", r[key]["hard"]), (f"CSL {label}, weighted", r[key]["weighted"])]
    rows += [("CSL per class, w = 1", r["csl_class"]["hard"]), ("CSL per class, weighted", r["csl_class"]["weighted"])]
    rows += [(f"{name} at CSL's share", q) for name, q in r["at_csl_share"].items()]
    if "confidence_per_image_at_csl_share" in r:
        rows.append(("confidence, CSL's per image", r["confidence_per_image_at_csl_share"]))
    print(f"{'rule':<30} {'share':>7} {'accuracy':>9} {'recall':>7}")
    for name, q in rows:
        print(f"{name:<30} {pct(q['share'], 7)} {pct(q['accuracy'], 9)} {pct(q['recall'], 7)}")
    print(f"wrote {os.path.join(out, 'analysis.json')} and {len(r['pictures'])} pictures")
    return 0


def cmd_split(args) -> int:
    from .data.splits import write_splits

    try:
        written = write_splits(args.list, args.out, args.fractions, args.seed, overwrite=args.overwrite)
    except ValueError as e:
        print(f"csl split: error: {e}", file=sys.stderr)
        return 2
    for name, info in written.items():
        print(f"{name}: {info['labeled']} labeled, {info['unlabeled']} unlabeled -> {info['dir']}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report_and_pictures

    try:
        path, pictures = write_report_and_pictures(args.runs, args.out, args.overwrite)
    except KeyError as e:  # a summary.json or metrics record without a field the report reads
        raise ValueError(f"a run record lacks the field {e} (is every folder a finished `csl demo` output?)") from e
    print(f"wrote {path} and {len(pictures)} picture(s) beside it" + (f": {', '.join(pictures)}" if pictures else ""))
    return 0


def _negative_fractions(words: list[str]) -> list[str]:
    """``csl split`` words like ``-1/8``: argparse reads them as unknown options, so they are refused here by what
    they are (a fraction outside (0, 1)) instead of a puzzling "expected at least one argument"."""
    if words[:1] != ["split"]:
        return []
    return [w for w in words if re.fullmatch(r"-\d+[/_]\d+", w)]


@contextlib.contextmanager
def _own_warnings_as_lines(command: str):
    """A warning attributed to csl's code (the config's: a key renamed or given twice) is said in one line, ``csl
    <command>: warning: ...``, as the errors are, instead of Python's form with csl's source file and line; warnings
    attributed elsewhere keep that form."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if os.path.abspath(filename).startswith(package):
                print(f"csl {command}: warning: {message}", file=sys.stderr if file is None else file)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def use_port(port: int) -> None:
    """UniMatch's ``--port``: the processes meet there where the launcher set no ``MASTER_PORT``; a launcher's port
    stays (said when it differs), as in UniMatch outside SLURM."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in [1, 65535], got {port}")
    from .distributed import first_process_by_environment

    launcher = os.environ.get("MASTER_PORT")
    if launcher is None:
        os.environ["MASTER_PORT"] = str(port)
    elif launcher != str(port) and first_process_by_environment():  # said once, not by every process
        warnings.warn(f"--port {port} is not used: the launcher's MASTER_PORT {launcher} is", UserWarning,
                      stacklevel=2)


_LOCAL_RANK_FLAG = re.compile(r"--local[-_]rank(?:=(.*))?")


def take_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local-rank=N`` that ``python -m torch.distributed.launch`` puts before the command
    (UniMatch's scripts launch that way): the process reads ``LOCAL_RANK``, which that launcher sets too; a flag that
    disagrees with it is an error, one without it sets it."""
    out, i = [], 0
    while i < len(argv):
        match = _LOCAL_RANK_FLAG.fullmatch(argv[i])
        if not match:
            out.append(argv[i])
            i += 1
            continue
        value = match.group(1)
        if value is None:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        i += 1
        flag = match.group(0).split("=")[0]
        if not value.isdigit():
            raise ConfigError(f"{flag} takes a process's local rank (an integer >= 0), got {value!r}")
        given = os.environ.get("LOCAL_RANK")
        if given is not None and given != value:
            raise ConfigError(f"{flag} {value} disagrees with the environment's LOCAL_RANK {given}")
        os.environ["LOCAL_RANK"] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        argv = take_local_rank(sys.argv[1:] if argv is None else list(argv))
    except ConfigError as e:
        print(f"csl: error: {e}", file=sys.stderr)
        return 2
    negative = _negative_fractions(argv)
    if negative:
        print(f"csl split: error: a split fraction must lie strictly between 0 and 1, got {negative[0]!r}",
              file=sys.stderr)
        return 2
    # key=value overrides may also come after an option (`--config x a=1 --overwrite b=2`): argparse leaves those
    # unparsed, and they join the overrides; anything else unrecognised is an error as usual.
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    if stray:  # said by the subcommand's parser: "csl train: error: ..."
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    previous = {}
    if args.command in ("train", "demo") and threading.current_thread() is threading.main_thread():
        # Ctrl-C / SIGTERM during training: the iteration ends and latest.pt is saved before the stop (csl.stop).
        # A SIGINT a shell set to be ignored (a background job of a script) stays ignored.
        signals = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        previous = {s: signal.signal(s, stop.handle_signal) for s in signals}
    try:
        with _own_warnings_as_lines(args.command):
            return _run(args)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop.clear()


def _run(args) -> int:
    handlers = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "split": cmd_split,
                "analyze": cmd_analyze, "report": cmd_report}
    import torch

    from .distributed import ProcessGroupError, srun_step_tasks
    from .logging_utils import one_line
    from .run_folder import RunFolderError
    from .trainer import NonFiniteTrainingError

    def failed(message: str, status: int) -> int:
        if os.environ.get("CSL_DEBUG") == "1":  # the traceback too, above the line; the same exit status
            traceback.print_exc()
        print(f"csl {args.command}: error: {message}", file=sys.stderr)
        return status

    try:
        tasks = srun_step_tasks(os.environ)
        if args.command not in ("train", "eval") and tasks > 1:  # not N copies of one run
            raise ConfigError(f"srun started {tasks} tasks of csl {args.command}, which runs as one process (train "
                              f"and eval run as the tasks of one job): srun -n 1, or no srun")
        return handlers[args.command](args)
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError,
            RunFolderError) as e:  # the user's input
        return failed(one_line(e), 2)
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as e:  # torch < 2.5: only the latter
        first_line = (str(e).strip().splitlines() or [""])[0]  # torch's advice on the allocator follows it
        return failed(f"out of memory: {first_line} (lower train.batch_size, data.crop_size or eval.batch_size; "
                      f"eval.mode=sliding_window for large images)", 1)
    except (NonFiniteTrainingError, ProcessGroupError, OSError) as e:  # the run failed: diverged, disk full, ...
        return failed(one_line(e), 1)
    except stop.Terminated:
        print(f"csl {args.command}: stopped by SIGTERM", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"csl {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["ExpandedImages", "expand_images", "main", "model_from_checkpoint", "val_dataset"]
