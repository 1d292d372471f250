"""UniMatch's YAML configs read as csl configs.

UniMatch (github.com/LiheYoung/UniMatch, commit 818609d) trains from ``configs/pascal.yaml``, ``cityscapes.yaml``
and ``coco.yaml``: flat files with ``dataset``, ``nclass``, ``crop_size``, ``data_root``, ``epochs``, ``batch_size``,
``lr``, ``lr_multi``, ``criterion``, ``conf_thresh``, ``model``, ``backbone``, ``replace_stride_with_dilation`` and
``dilations``. ``csl train --config`` takes such a file as it is (with UniMatch's ``--labeled-id-path``,
``--unlabeled-id-path`` and ``--save-path``): :func:`from_unimatch` writes the csl config that trains UniMatch's recipe
with what UniMatch's code does beside the file (its deep-stem ResNet or Xception-65 loaded from
``pretrained/<backbone>.pth``, sliding-window evaluation for Cityscapes, ``splits/<dataset>/val.txt`` as the
validation list), and the selection csl is for (``selection.mode=csl``; ``conf_thresh`` becomes ``selection.tau``,
the threshold of ``selection.mode=threshold``, UniMatch's own selection).
"""

from __future__ import annotations

import os
from typing import Any

from .config import DEFAULTS, ConfigError

# Keys of UniMatch's configs; the first four exist in no csl config and mark a file as UniMatch's.
MARKER_KEYS = ("nclass", "data_root", "conf_thresh", "lr_multi")
REQUIRED_KEYS = ("dataset", "nclass", "crop_size", "data_root", "epochs", "batch_size", "lr", "lr_multi", "criterion",
                 "conf_thresh", "backbone", "dilations")
OPTIONAL_KEYS = ("model", "replace_stride_with_dilation")
# The csl key each UniMatch key becomes (said when a csl config holds a UniMatch key by mistake).
CSL_KEY_OF = {"dataset": "data.dataset", "nclass": "data.num_classes", "crop_size": "data.crop_size",
              "data_root": "data.root", "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
              "lr_multi": "train.head_lr_mult", "criterion": "train.criterion", "conf_thresh": "selection.tau",
              "backbone": "model.backbone", "replace_stride_with_dilation": "model.output_stride",
              "dilations": "model.dilations"}
DATASETS = ("pascal", "cityscapes", "coco")
BACKBONES = ("resnet50", "resnet101", "xception")
# UniMatch's criteria and the keyword arguments csl's losses have: nn.CrossEntropyLoss and ProbOhemCrossEntropy2d
# (util/ohem.py; its defaults thresh 0.7, min_kept 256).
CRITERIA = {"CELoss": ("ignore_index",), "OHEM": ("ignore_index", "thresh", "min_kept")}
OHEM_DEFAULTS = {"thresh": 0.7, "min_kept": 256}
# replace_stride_with_dilation of UniMatch's ResNet (torchvision's argument): the output stride it gives.
OUTPUT_STRIDES = {(False, False, False): 32, (False, False, True): 16, (False, True, True): 8}


class UniMatchConfigError(ConfigError):
    """A UniMatch config that csl cannot train as UniMatch would."""


def is_unimatch_config(raw: Any) -> bool:
    """Whether a YAML file's top level is UniMatch's (one of :data:`MARKER_KEYS`, none of which is a csl key)."""
    return isinstance(raw, dict) and any(key in raw for key in MARKER_KEYS)


def from_unimatch(raw: dict, path: str) -> tuple[dict, str]:
    """``(csl config tree, one-line account of the translation)`` of UniMatch config ``raw`` read from ``path``.

    Raises :class:`UniMatchConfigError` for csl keys mixed in, unknown or missing keys, and settings UniMatch has
    that csl does not train (another dataset, backbone, criterion or loss argument)."""

    def fail(message: str) -> UniMatchConfigError:
        return UniMatchConfigError(f"{path} (a UniMatch config: {', '.join(k for k in MARKER_KEYS if k in raw)}): "
                                   f"{message}")

    csl_keys = [k for k in raw if k in DEFAULTS and (k != "model" or isinstance(raw[k], dict))]
    if csl_keys:  # a csl config with a UniMatch key in it, or a UniMatch config with csl's keys added
        found = [k for k in raw if k in CSL_KEY_OF and k != "model"]
        raise UniMatchConfigError(
            f"{path} holds csl's {', '.join(csl_keys)} and UniMatch's {', '.join(found)}: a config is one or the "
            f"other. In a csl config write {', '.join(f'{CSL_KEY_OF[k]} for {k}' for k in found)}; a UniMatch "
            f"config takes csl's settings as key=value overrides (e.g. selection.mode=threshold)")
    unknown = [k for k in raw if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; UniMatch's keys are "
                   f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)} (csl's own settings go as key=value overrides)")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise fail(f"missing {', '.join(missing)} (UniMatch's unimatch.py reads every one)")
    dataset, backbone = raw["dataset"], raw["backbone"]
    if dataset not in DATASETS:
        raise fail(f"dataset {dataset!r}: csl reads UniMatch's {', '.join(DATASETS)} (other data: csl's "
                   f"data.dataset=folder, see the README)")
    if raw.get("model", "deeplabv3plus") != "deeplabv3plus":
        raise fail(f"model {raw['model']!r}: csl trains DeepLabV3+ (UniMatch's deeplabv3plus)")
    if backbone not in BACKBONES:
        raise fail(f"backbone {backbone!r}: UniMatch's DeepLabV3+ has {', '.join(BACKBONES)}")
    model: dict[str, Any] = {"backbone": backbone, "dilations": raw["dilations"],
                             "pretrained": os.path.join("pretrained", f"{backbone}.pth")}
    said = [f"backbone {backbone} -> model.backbone, model.pretrained={model['pretrained']} (UniMatch's ImageNet file, "
            f"read from the current folder as UniMatch reads it)"]
    dilate = raw.get("replace_stride_with_dilation")
    if backbone == "xception":
        model["output_stride"] = 16  # UniMatch builds xception(pretrained=True) with its default os=16
        if dilate is not None:
            said.append("replace_stride_with_dilation not used: UniMatch's Xception-65 has output stride 16")
    else:
        model["stem"] = "deep"
        if dilate is None:
            raise fail(f"missing replace_stride_with_dilation (UniMatch's {backbone} needs it; [False, False, True] "
                       f"is output stride 16)")
        stride = OUTPUT_STRIDES.get(tuple(dilate) if isinstance(dilate, list) else None)
        if stride is None:
            raise fail(f"replace_stride_with_dilation {dilate!r}: csl's ResNet has "
                       f"{', '.join(f'{list(k)} (output stride {v})' for k, v in OUTPUT_STRIDES.items())}")
        model["output_stride"] = stride
        said.append(f"replace_stride_with_dilation {dilate} -> model.output_stride={stride}, model.stem=deep")

    criterion = raw["criterion"]
    name = criterion.get("name") if isinstance(criterion, dict) else None
    if name not in CRITERIA:
        raise fail(f"criterion {criterion!r}: UniMatch's are {{name: CELoss}} and {{name: OHEM, kwargs: {{...}}}}")
    extra = [k for k in criterion if k not in ("name", "kwargs")]
    kwargs = criterion.get("kwargs") or {}
    if extra or not isinstance(kwargs, dict):
        raise fail(f"criterion {criterion!r}: a name and its kwargs only")
    unsupported = [k for k in kwargs if k not in CRITERIA[name]]
    if unsupported:
        raise fail(f"criterion {name} kwargs {', '.join(unsupported)}: csl's loss takes {', '.join(CRITERIA[name])}")
    train: dict[str, Any] = {"epochs": raw["epochs"], "batch_size": raw["batch_size"], "lr": raw["lr"],
                             "head_lr_mult": raw["lr_multi"], "criterion": "ce" if name == "CELoss" else "ohem"}
    if name == "OHEM":
        train["ohem_thresh"] = kwargs.get("thresh", OHEM_DEFAULTS["thresh"])
        train["ohem_min_kept"] = kwargs.get("min_kept", OHEM_DEFAULTS["min_kept"])
    data: dict[str, Any] = {"dataset": dataset, "root": raw["data_root"], "num_classes": raw["nclass"],
                            "crop_size": raw["crop_size"]}
    if kwargs.get("ignore_index", 255) != 255:
        raise fail(f"criterion {name} ignore_index {kwargs['ignore_index']!r}: UniMatch's data marks padding and "
                   f"boundaries with 255, which such a loss trains as a class (and its CELoss fails on); label files "
                   f"whose ignored value is another are read with ignore_index: 255 and the override "
                   f"data.ignore_index=<their value>")
    val_list = os.path.join("splits", str(dataset), "val.txt")
    if os.path.isfile(val_list):  # UniMatch's SemiDataset reads it from the current folder
        data["val_list"] = val_list
        said.append(f"validation list {val_list} (as UniMatch's)")
    else:
        said.append(f"validation list: the dataset's own ({val_list}, UniMatch's, is not in the current folder)")
    tree = {"data": data, "model": model, "train": train,
            "selection": {"mode": "csl", "tau": raw["conf_thresh"]},
            "eval": {"mode": "sliding_window" if dataset == "cityscapes" else "original"}}
    account = (f"read {path} as a UniMatch config: dataset, data_root, nclass, crop_size -> data.*; epochs, "
               f"batch_size, lr, lr_multi (train.head_lr_mult), criterion {name} -> train.*; {'; '.join(said)}; "
               f"eval.mode={tree['eval']['mode']} (UniMatch's for {dataset}); conf_thresh {raw['conf_thresh']} -> "
               f"selection.tau, the threshold of selection.mode=threshold (UniMatch's selection; with "
               f"tmp.enabled=false UniMatch's recipe); selection.mode=csl, CSL's selection, unless overridden; "
               f"csl train --config {path} --print-config shows every setting")
    return tree, account


__all__ = ["MARKER_KEYS", "UniMatchConfigError", "from_unimatch", "is_unimatch_config"]
