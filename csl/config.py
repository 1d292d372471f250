"""Run configuration: YAML files layered over :data:`DEFAULTS`, ``key=value`` dotted overrides, validation.

``load_config(path_or_name, overrides)`` reads a YAML file (or a bundled config by name, e.g. ``voc_321``), merges
it over the defaults, applies overrides such as ``train.lr=0.01`` or ``model.dilations=[12,24,36]`` (values are
parsed as YAML, so ``null``, ``true``, lists and numbers work), and validates every key and type. Unknown keys and
wrong types raise :class:`ConfigError` naming the key (with a suggestion for a misspelt one).
"""

from __future__ import annotations

import copy
import datetime
import difflib
import math
import os
import re
import sys
import warnings
from collections.abc import Hashable
from typing import Any

import yaml

from .files import atomic_write_text

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Every key a config may hold, with its default. A None default means "optional" (any value of the types listed in
# _OPTIONAL_TYPES is accepted); dict-valued entries are sections whose keys are validated recursively.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda
    # Minutes a process waits for the others at a collective under torchrun (the process group's timeout): rank 0
    # checks the label files once before training while the others wait (the first check of COCO reads 120k files).
    "dist_timeout_min": 60,
    "output_dir": "runs/default",
    "data": {
        "dataset": "synthetic",  # synthetic | camvid | pascal | cityscapes | coco | folder
        "root": None,
        "split": None,  # a split shipped in csl/splits/<dataset>/ (e.g. 1464, 1_8); or split_dir for any folder
        "split_dir": None,
        "labeled_list": None,
        "unlabeled_list": None,
        "val_list": None,
        "num_classes": None,  # default: the dataset's (5 for synthetic)
        "crop_size": 321,
        "ignore_index": 255,  # the value of ignored pixels in the label files (mapped to 255, csl's own, at load)
        "ignore_labels": None,  # stored label values that mean "unlabelled"; default: the dataset's (camvid: [11])
        "reduce_zero_label": False,  # the files' 0 is "unlabelled": 0 -> ignored, k -> k - 1
        "check_labels": True,  # read every labeled-training and validation mask before training (cached)
        "image_scale": 1.0,  # scale every image and mask at load (e.g. 0.5: half resolution, also for evaluation)
        "mean": None,  # default: ImageNet
        "std": None,
        "scale_range": [0.5, 2.0],
        "num_workers": 2,
        "synthetic": {"num_labeled": 16, "num_unlabeled": 160, "num_val": 24, "size": 128, "seed": 0},
    },
    "model": {
        "backbone": "resnet101",
        "stem": "torchvision",  # ResNets: torchvision (7x7 conv) | deep (UniMatch's / CSL's three 3x3 convs)
        "output_stride": 16,
        "dilations": [6, 12, 18],
        "pretrained": None,  # local ImageNet state dict of the backbone, "imagenet" (torchvision's), None = random
    },
    "train": {
        "mode": "semi",  # semi | supervised
        "epochs": 80,
        "iters": None,  # total iterations; overrides epochs
        "iters_per_epoch": None,  # default UniMatch's: ceil(len(unlabeled) / processes) // batch_size (or labeled)
        "batch_size": 2,  # per process, for each of the labeled, unlabeled and mix batches
        "lr": 0.001,
        "head_lr_mult": 10.0,
        "momentum": 0.9,
        "weight_decay": 1.0e-4,
        "poly_power": 0.9,
        "criterion": "ce",  # ce | ohem
        "ohem_thresh": 0.7,
        "ohem_min_kept": 200000,
        "lambda_s": 0.25,
        "lambda_m": 0.25,
        "lambda_fp": 0.5,
        "cutmix_p": 0.5,
        "amp": "auto",  # auto (bf16 on a GPU with native bf16, else fp16; fp32 on CPU) | bf16 | fp16 | fp32
        "init_from": None,  # checkpoint whose model weights start the run (fresh optimizer and schedule)
        "resume": None,  # checkpoint path, or "auto" = the newer of <output_dir>/latest.pt and best.pt, when one exists
        "overwrite": False,  # replace a run already in output_dir (else such a folder is refused; see run_folder.py)
        "log_every": 20,
        "ckpt_every": 0,  # iterations between checkpoints (0: at epoch ends only)
        "progress": True,
    },
    "selection": {
        "mode": "csl",  # one of CHOICES["selection.mode"] below
        "alpha": 8.0,
        "confidence": None,  # prob | log; default: the rule's (paper: prob, released: log)
        "rule": "paper",  # paper (Algorithm 1) | released (the authors' released code); docs/selection.md Sec. 2b
        "tau": 0.95,
    },
    "kernels": {
        "backend": "auto",  # auto | reference | triton | cpu | cuda: selection, TMP, the losses and evaluation
    },
    "tmp": {
        "enabled": True,
        "block": 32,
        "rate": 0.7,
        "fraction": 0.5,  # probability that an unlabeled sample gets the masking view (else a 2nd strong view)
        # The other samples of the masking batch: a 2nd strong view CutMix-ed with its own box (UniMatch's second
        # stream, the default) or, as the authors' released code does, a strong view without CutMix.
        "other_view": "strong_cutmix",
    },
    "eval": {
        "mode": None,  # original | center_crop | sliding_window; default: sliding_window for cityscapes
        "crop_size": None,  # default: data.crop_size
        "stride_ratio": 2 / 3,
        "every_epochs": 1,
        "batch_size": 1,
        "amp": "fp32",  # fp32 (as UniMatch evaluates: mIoU comparable with published numbers) | auto | bf16 | fp16
    },
}

# Allowed types of keys whose default is None.
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "data.root": (str,),
    "data.split": (str, int),
    "data.split_dir": (str,),
    "data.labeled_list": (str,),
    "data.unlabeled_list": (str,),
    "data.val_list": (str,),
    "data.num_classes": (int,),
    "data.ignore_labels": (list,),
    "data.mean": (list,),
    "data.std": (list,),
    "model.pretrained": (str,),
    "train.iters": (int,),
    "train.iters_per_epoch": (int,),
    "train.init_from": (str,),
    "train.resume": (str,),
    "eval.mode": (str,),
    "eval.crop_size": (int,),
    "selection.confidence": (str,),
}

CHOICES: dict[str, tuple] = {
    "device": ("auto", "cpu", "cuda"),
    "data.dataset": ("synthetic", "camvid", "pascal", "cityscapes", "coco", "folder"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "xception"),
    "model.stem": ("torchvision", "deep"),
    "model.output_stride": (8, 16, 32),
    "train.mode": ("semi", "supervised"),
    "train.criterion": ("ce", "ohem"),
    "train.amp": ("auto", "bf16", "fp16", "fp32"),
    "selection.mode": ("csl", "threshold", "csl_class", "confidence_share", "oracle"),
    "selection.confidence": ("prob", "log"),
    "selection.rule": ("paper", "released"),
    "tmp.other_view": ("strong_cutmix", "strong"),
    "kernels.backend": ("auto", "reference", "triton", "cpu", "cuda"),
    "eval.mode": ("original", "center_crop", "sliding_window"),
    "eval.amp": ("auto", "bf16", "fp16", "fp32"),
}


# Keys whose override values stay as typed (split names such as 1_8, which YAML 1.1 reads as the integer 18).
RAW_STRING_KEYS = ("data.split",)
# Keys that moved: a config (or override) holding the old key still loads, with a FutureWarning.
RENAMED: dict[str, str] = {
    "selection.backend": "kernels.backend",  # it drives TMP, the losses and evaluation too, not only the selection
    "data.check_val_labels": "data.check_labels",  # it checks the labeled training list too
}


_MAX_TIMEOUT_MIN = datetime.timedelta.max // datetime.timedelta(minutes=1)


class ConfigError(ValueError):
    """A bad config file, key, value or override."""


def _walk_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_walk_keys(v, prefix + k + "."))
    return keys


def dotted_leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf of a nested config (a mapping is walked into, anything else is a
    leaf): two configs compared key by key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unknown_key(key: str) -> ConfigError:
    """The error of an unknown key, with the key of that name in another section (``train.tau``: ``selection.tau``)
    as the hint, else the closest spelling."""
    known = _walk_keys(DEFAULTS)
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in known if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, known, n=1,
                                                                                              cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _renamed(old: str) -> str:
    new = RENAMED[old]
    warnings.warn(f"config key {old!r} is deprecated; it is read as {new!r}", FutureWarning, stacklevel=4)
    return new


def migrate_renamed(tree: dict) -> dict:
    """``tree`` (a raw or merged config) with every old key of :data:`RENAMED` moved to its new key."""
    if not isinstance(tree, dict):
        return tree
    tree = copy.deepcopy(tree)
    for old in RENAMED:
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        new = _renamed(old)
        *new_parents, new_leaf = new.split(".")
        target = tree
        for part in new_parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        if new_leaf in target and target[new_leaf] != value:
            raise ConfigError(f"{old} (deprecated) is {value!r} but {new} is {target[new_leaf]!r}; set {new} only")
        target[new_leaf] = value
    return tree


def resolve_config_path(path_or_name: str) -> str:
    """A file path, or the name of a bundled config (``demo``, ``voc_321``, ...) in ``csl/configs``."""
    if os.path.isfile(path_or_name):
        return path_or_name
    name = path_or_name if path_or_name.endswith((".yaml", ".yml")) else path_or_name + ".yaml"
    bundled = os.path.join(CONFIG_DIR, os.path.basename(name))
    if os.path.dirname(path_or_name) in ("", ".") and os.path.isfile(bundled):
        return bundled
    if os.path.isdir(path_or_name):
        raise ConfigError(f"config {path_or_name!r} is a folder; give a YAML file (a run folder's is config.yaml)")
    available = sorted(os.path.splitext(f)[0] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise ConfigError(f"config file not found: {path_or_name!r} (bundled configs: {', '.join(available)})")


def parse_value(text: str) -> Any:
    """Parse an override value as a config file's YAML (``1e-4`` a float, also inside a list)."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None
    if text.count("#") > repr(value).count("#"):  # YAML read " #..." as a comment: the value would be cut there
        raise ConfigError(f"value {text!r} holds ' #', which YAML reads as the start of a comment: quote the value "
                          f"('{text}') to keep the '#', or remove the comment")
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.01)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    if key in RAW_STRING_KEYS:  # YAML would read 1_8 as the integer 18
        raw = text.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]
        return key, None if raw.lower() in ("", "null", "~", "none") else raw
    return key, parse_value(text.strip())


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``key = "a.b.c"``; the key must exist in :data:`DEFAULTS` (an old key of
    :data:`RENAMED` sets its new key, with a FutureWarning)."""
    if key in RENAMED:
        key = _renamed(key)
    parts = key.split(".")
    node, schema = cfg, DEFAULTS
    for i, part in enumerate(parts):
        if not isinstance(schema, dict) or part not in schema:
            raise _unknown_key(key)
        if i == len(parts) - 1:
            if isinstance(schema[part], dict) and not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; set one of its keys (e.g. {key}."
                                  f"{next(iter(schema[part]))}=...)")
            node[part] = _merge(node.get(part) if isinstance(schema[part], dict) else None, value, key)
            return
        schema = schema[part]
        node = node.setdefault(part, {})


def get_dotted(cfg: dict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _merge(base: Any, update: Any, where: str) -> Any:
    if isinstance(update, dict):
        if base is not None and not isinstance(base, dict):
            raise ConfigError(f"{where} must be a value, not a section")
        out = copy.deepcopy(base) if isinstance(base, dict) else {}
        for k, v in update.items():
            if not isinstance(k, str):
                raise ConfigError(f"config keys must be strings, got {k!r} in {where or 'the top level'}")
            out[k] = _merge(out.get(k), v, f"{where}.{k}" if where else k)
        return out
    return copy.deepcopy(update)


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Return ``value`` converted to the type of ``default`` (int -> float, list <-> tuple), or raise."""
    if default is None:
        if value is None:
            return None
        allowed = _OPTIONAL_TYPES.get(key, (str, int, float, bool, list))
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if int in allowed and float not in allowed and isinstance(value, float) and value.is_integer():
            return int(value)  # 1e4 (YAML reads it as a float), as the keys whose default is an int take it
        if isinstance(value, tuple) and list in allowed:
            value = list(value)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise ConfigError(f"{key} must be {names} or null, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
        if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() would raise OverflowError
            raise ConfigError(f"{key} must be a finite number, got an integer of {len(str(abs(value)))} digits")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise ConfigError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
        return int(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
        return list(value)
    return value


def _validate_tree(cfg: dict, schema: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        key = prefix + k
        if k not in schema:
            raise _unknown_key(key)
        default = schema[k]
        if isinstance(default, dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} must be a section (mapping), got {v!r}")
            out[k] = _validate_tree(v, default, key + ".")
        else:
            out[k] = _check_type(key, v, default)
    for k, default in schema.items():
        if k not in out:
            out[k] = copy.deepcopy(default) if not isinstance(default, dict) else _validate_tree({}, default,
                                                                                               prefix + k + ".")
    return out


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _require_finite(tree, prefix: str = "") -> None:
    """No NaN / inf anywhere in a config (``train.lr=.inf`` would train a NaN model)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and isinstance(key, str) else f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, float):
            _require(math.isfinite(value), f"{name} must be a finite number, got {value}")
        else:
            _require_finite(value, name)


def validate(cfg: dict) -> dict:
    """Check keys, types, choices and ranges; fill in defaults. Returns a new dict."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(cfg).__name__}")
    cfg = _validate_tree(migrate_renamed(cfg), DEFAULTS)
    for key, choices in CHOICES.items():
        value = get_dotted(cfg, key)
        if value is not None and value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
    _require_finite(cfg)
    d, t, s, m, e = cfg["data"], cfg["train"], cfg["selection"], cfg["tmp"], cfg["eval"]
    if d["dataset"] == "synthetic":  # paths set with the default dataset: the user's data would be ignored
        given = [f"data.{key}" for key in ("root", "split", "split_dir", "labeled_list", "unlabeled_list", "val_list")
                 if d[key] is not None]
        _require(not given, f"{', '.join(given)} set but data.dataset is synthetic (the default), which reads no "
                            f"files; set data.dataset (camvid, pascal, cityscapes, coco or folder)")
        # What applies to label files and loaded images only: set for synthetic data, training would ignore it.
        unused = [f"data.{key}={d[key]}" for key in ("image_scale", "ignore_index", "ignore_labels",
                                                     "reduce_zero_label") if d[key] != DEFAULTS["data"][key]]
        _require(not unused, f"{', '.join(unused)} set but data.dataset is synthetic, whose generated scenes it does "
                             f"not apply to (it applies to images and label files read from disk)")
        syn = d["synthetic"]
        least = {"num_labeled": 1, "num_unlabeled": 1 if t["mode"] == "semi" else 0, "num_val": 1, "size": 16,
                 "seed": 0}
        for key, low in least.items():
            _require(syn[key] >= low, f"data.synthetic.{key} must be >= {low}"
                     f"{' with train.mode=semi' if key == 'num_unlabeled' else ''}, got {syn[key]}")
    _require(cfg["output_dir"].strip() != "", "output_dir must name a folder, got an empty string")
    # seed + a stream number seeds torch generators, which take at most 2**64 - 1
    _require(0 <= cfg["seed"] < 2**63, f"seed must be in [0, 2**63), got {cfg['seed']}")
    # the process group takes the timeout as a datetime.timedelta, which holds up to 999999999 days
    _require(1 <= cfg["dist_timeout_min"] <= _MAX_TIMEOUT_MIN,
             f"dist_timeout_min must be in [1, {_MAX_TIMEOUT_MIN}] (minutes), got {cfg['dist_timeout_min']}")
    _require(d["crop_size"] >= 8, f"data.crop_size must be >= 8, got {d['crop_size']}")
    _require(d["num_classes"] is None or 2 <= d["num_classes"] <= 255, f"data.num_classes must be in [2, 255] "
             f"(class ids 0..254; 255 marks ignored pixels inside csl), got {d['num_classes']}")
    _require(0 < d["image_scale"] <= 4, f"data.image_scale must be in (0, 4], got {d['image_scale']}")
    if d["ignore_labels"] is not None:
        _require(all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in d["ignore_labels"]),
                 f"data.ignore_labels must be a list of label values >= 0, got {d['ignore_labels']}")
    _require(d["num_workers"] >= 0, f"data.num_workers must be >= 0, got {d['num_workers']}")
    _require(len(d["scale_range"]) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                for x in d["scale_range"])
             and 0 < d["scale_range"][0] <= d["scale_range"][1],
             f"data.scale_range must be [lo, hi] with 0 < lo <= hi, got {d['scale_range']}")
    for key in ("mean", "std"):
        if d[key] is not None:
            _require(len(d[key]) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d[key]),
                     f"data.{key} must be 3 numbers, got {d[key]}")
    from .data import check_synthetic_classes, normalization  # the data's own checks, before the run starts

    try:
        normalization(d["mean"], d["std"])
        if d["dataset"] == "synthetic" and d["num_classes"] is not None:
            check_synthetic_classes(d["num_classes"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(len(cfg["model"]["dilations"]) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                         for x in cfg["model"]["dilations"]),
             f"model.dilations must be three positive integers, got {cfg['model']['dilations']}")
    _require(cfg["model"]["stem"] == "torchvision" or cfg["model"]["backbone"] in ("resnet50", "resnet101"),
             f"model.stem=deep (UniMatch's ResNet) exists for resnet50 / resnet101, not {cfg['model']['backbone']}")
    _require(cfg["model"]["backbone"] != "xception" or cfg["model"]["output_stride"] in (8, 16),
             f"model.backbone=xception has output_stride 16 or 8 (UniMatch's Xception-65), not "
             f"{cfg['model']['output_stride']}")
    _require(t["epochs"] >= 1, f"train.epochs must be >= 1, got {t['epochs']}")
    for key in ("iters", "iters_per_epoch"):
        _require(t[key] is None or t[key] >= 1, f"train.{key} must be >= 1 or null, got {t[key]}")
    _require(t["batch_size"] >= 1, f"train.batch_size must be >= 1, got {t['batch_size']}")
    for key in ("lr", "head_lr_mult", "poly_power"):
        _require(t[key] > 0, f"train.{key} must be > 0, got {t[key]}")
    for key in ("weight_decay", "lambda_s", "lambda_m", "lambda_fp", "ohem_min_kept"):
        _require(t[key] >= 0, f"train.{key} must be >= 0, got {t[key]}")
    _require(0 <= t["momentum"] < 1, f"train.momentum must be in [0, 1) (SGD diverges from 1 on), got {t['momentum']}")
    for key in ("cutmix_p", "ohem_thresh"):
        _require(0 <= t[key] <= 1, f"train.{key} must be in [0, 1], got {t[key]}")
    _require(t["log_every"] >= 1, f"train.log_every must be >= 1, got {t['log_every']}")
    _require(t["ckpt_every"] >= 0, f"train.ckpt_every must be >= 0, got {t['ckpt_every']}")
    _require(not (t["resume"] and t["overwrite"]), f"train.resume={t['resume']} and train.overwrite=true exclude "
             f"each other (--resume continues the run, --overwrite deletes it first): pass one")
    _require(s["alpha"] > 0, f"selection.alpha must be > 0, got {s['alpha']}")
    _require(0 <= s["tau"] <= 1, f"selection.tau must be in [0, 1], got {s['tau']}")
    _require(m["block"] >= 1, f"tmp.block must be >= 1, got {m['block']}")
    for key in ("rate", "fraction"):
        _require(0 <= m[key] <= 1, f"tmp.{key} must be in [0, 1], got {m[key]}")
    _require(0 < e["stride_ratio"] <= 1, f"eval.stride_ratio must be in (0, 1], got {e['stride_ratio']}")
    _require(e["every_epochs"] >= 1, f"eval.every_epochs must be >= 1, got {e['every_epochs']}")
    _require(e["batch_size"] >= 1, f"eval.batch_size must be >= 1, got {e['batch_size']}")
    _require(e["crop_size"] is None or e["crop_size"] >= 8, f"eval.crop_size must be >= 8, got {e['crop_size']}")
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: plain YAML keeps the last, so a second
    ``train:`` section would silently drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # the base constructor reports an unhashable key
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 reads 1e-3 and .5e3 (an exponent without a dot or a sign) as strings; a config means the number.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """YAML's safe dumper that quotes the strings :class:`_UniqueKeyLoader` reads as numbers (``'1e3'``), so a
    written config reads back as it was."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _yaml_error(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans four lines with a source excerpt)."""
    mark = getattr(error, "problem_mark", None)
    words = [w for w in (getattr(error, "context", None), getattr(error, "problem", None)) if w]
    if not words or mark is None:
        return " ".join(str(error).split())
    return f"{'; '.join(words)} (line {mark.line + 1}, column {mark.column + 1})"


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {path}: {_yaml_error(e)}") from None
    except UnicodeDecodeError:  # a checkpoint or an image given as --config
        raise ConfigError(f"{path} is not a YAML config (not UTF-8 text); a checkpoint goes to --checkpoint") from None
    if raw is None:  # an empty file, or comments only: not a config of defaults, which would train ResNet-101
        raise ConfigError(f"{path} holds no settings (empty, or comments only); give a config with at least "
                          f"data.dataset, or --config demo / camvid / voc_321 / ... for a bundled one")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(raw).__name__}")
    return _empty_sections_as_mappings(raw, DEFAULTS)


def _empty_sections_as_mappings(tree: dict, schema: dict) -> dict:
    """A section written with no keys (``train:`` with every line under it commented out) is YAML's null: read it
    as the empty section it looks like, whose keys keep their defaults."""
    out = dict(tree)
    for key, value in tree.items():
        default = schema.get(key)
        if isinstance(default, dict):
            if value is None:
                out[key] = {}
            elif isinstance(value, dict):
                out[key] = _empty_sections_as_mappings(value, default)
    return out


def build_config(raw: dict | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Merge ``raw`` over :data:`DEFAULTS`, apply ``overrides`` (``["a.b=1", ...]`` or ``{"a.b": 1}``), validate."""
    cfg = _merge(DEFAULTS, migrate_renamed(raw or {}), "")
    # Unknown keys in ``raw`` are reported by validate(); overrides are checked as they are set.
    pairs = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    given: dict[str, tuple[str, Any]] = {}  # by the key's current name: an old and a new name set one key
    for key, value in pairs:
        current = RENAMED.get(key, key)
        if current in given and given[current][1] != value:  # the last one counts, as on most command lines: said
            first, before = given[current]
            twice = f"{key} is given twice" if first == key else f"{first} and {key} set one key"
            warnings.warn(f"{twice} ({before!r}, then {value!r}); the last one is used", UserWarning, stacklevel=2)
        given[current] = (key, value)
        set_dotted(cfg, key, value)
    return validate(cfg)


def load_config(path_or_name: str | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Load a YAML config (a path or a bundled name; a UniMatch config is read as the csl config of its recipe, see
    :mod:`csl.unimatch_config`), apply ``key=value`` overrides, validate.

    Relative data / checkpoint paths are kept as written (relative to the working directory).
    """
    raw = load_yaml(resolve_config_path(path_or_name)) if path_or_name else {}
    from .unimatch_config import from_unimatch, is_unimatch_config

    if is_unimatch_config(raw):
        from .distributed import first_process_by_environment

        raw, account = from_unimatch(raw, path_or_name)
        if first_process_by_environment():  # once under torchrun: every process reads the file alike
            warnings.warn(account, UserWarning, stacklevel=2)
    try:
        return build_config(raw, overrides)
    except ConfigError as merged:
        if not path_or_name:
            raise
        try:  # the file on its own: an error it holds too is named as the file's
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # said once already, by the merged build
                build_config(raw)
        except ConfigError as e:
            if str(e) == str(merged):  # else the file is a base that the overrides complete, and theirs is the error
                raise ConfigError(f"{e} (in {path_or_name})") from None
        raise merged from None


def config_yaml(cfg: dict) -> str:
    """``cfg`` as YAML text, in its keys' order, that :func:`load_config` reads back as ``cfg``."""
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False)


def dump_config(cfg: dict, path: str, header: str = "") -> None:
    """``cfg`` as YAML in ``path``, after ``header`` (comment lines)."""
    atomic_write_text(path, header + config_yaml(cfg))


__all__ = ["CONFIG_DIR", "DEFAULTS", "RENAMED", "ConfigError", "build_config", "config_yaml", "dump_config",
           "get_dotted", "load_config", "migrate_renamed", "parse_override", "parse_value", "resolve_config_path",
           "set_dotted", "validate"]
