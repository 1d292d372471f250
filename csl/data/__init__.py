"""Datasets for semi-supervised segmentation: UniMatch-format split files, weak / strong / mild views, embedded
synthetic scenes.

``build_datasets(data_cfg)`` reads the ``data`` section of the config (see ``docs`` / the contract) and returns a
:class:`DatasetBundle` ``(labeled, unlabeled, val)`` of torch Datasets.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from csl_kernels import IGNORE_INDEX

from ..distributed import seed_global_generators
from .colors import palette
from .datasets import (
    COCO,
    DATASET_KINDS,
    CamVid,
    Cityscapes,
    FolderDataset,
    LabeledDataset,
    ListSource,
    PascalVOC,
    SplitItems,
    UnlabeledDataset,
    ValDataset,
    map_labels,
    read_split,
    scan_folder,
    write_split,
)
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import MAX_CLASSES, SyntheticSource, generate_scenes, write_synthetic_folder

__all__ = [
    "COCO",
    "CamVid",
    "DATASET_KINDS",
    "Cityscapes",
    "DataPathNotFound",
    "DataRootNotFound",
    "DatasetBundle",
    "FolderDataset",
    "LabeledDataset",
    "ListSource",
    "PascalVOC",
    "SyntheticSource",
    "UnlabeledDataset",
    "ValDataset",
    "SPLITS_DIR",
    "build_datasets",
    "check_synthetic_classes",
    "coco_unlabeled_items",
    "build_val_dataset",
    "class_names",
    "default_eval_mode",
    "generate_scenes",
    "leave_stops_to_the_main_process",
    "map_labels",
    "named_split_dir",
    "normalization",
    "palette",
    "read_split",
    "scan_folder",
    "seed_worker",
    "worker_init",
    "write_split",
    "write_synthetic_folder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_DEFAULTS = {"num_labeled": 16, "num_unlabeled": 160, "num_val": 24, "size": 128, "seed": 0}


class DataPathNotFound(FileNotFoundError):
    """A data path of the config (``key``, e.g. ``data.split_dir``) names nothing (the CLI adds where the value came
    from: a checkpoint's stored config)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


class DataRootNotFound(DataPathNotFound):
    """``data.root`` names no folder."""

    def __init__(self, message: str):
        super().__init__(message, "data.root")


class DatasetBundle(NamedTuple):
    labeled: Dataset
    unlabeled: Dataset | None
    val: Dataset | None


def seed_worker(worker_id: int, main_pid: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: seed ``random``, ``numpy`` and torch from the worker's torch seed (which the
    DataLoader derives from its generator) with :func:`csl.distributed.seed_global_generators`, so augmentation is
    reproducible for a given loader seed; stops are left to the main process
    (:func:`leave_stops_to_the_main_process`)."""
    seed_global_generators(torch.initial_seed())
    leave_stops_to_the_main_process(worker_id, main_pid)


def worker_init(init):
    """``init`` (:func:`seed_worker` or :func:`leave_stops_to_the_main_process`) as a loader's ``worker_init_fn``,
    told this process's id: a worker's parent is another process under the forkserver start method."""
    return functools.partial(init, main_pid=os.getpid())


def leave_stops_to_the_main_process(worker_id: int = 0, main_pid: int | None = None) -> None:
    """DataLoader ``worker_init_fn`` (part of :func:`seed_worker`): a Ctrl-C or a SIGTERM that reaches every process
    of the group leaves the worker to the main process (``main_pid``, default the worker's parent), which decides
    (csl.stop finishes the iteration and saves, an evaluation saves its epoch as pending) and ends its workers.
    A SIGTERM is held back only in a worker forked from the main process (Linux's start method before Python 3.14):
    where other threads run already (torch's, in a worker started by spawn or a fork server) one of them could take
    it and end the worker all the same, and where the platform cannot wait for a signal's sender (macOS, Windows), a
    SIGTERM ends the worker as it always did."""
    # Ctrl-C reaches every process of the terminal's group; a worker that died of it first would take the batch with
    # it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # So does a SIGTERM sent to the whole job (a scheduler's stop or time limit, timeout): a worker killed by it
    # makes torch raise "DataLoader worker ... is killed by signal: Terminated" in the middle of the main process's
    # step, which then cannot save. SIGTERM is blocked here and taken by a thread that ends the worker only when
    # the main process sent it (the loader's terminate(), multiprocessing's at exit).
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):
        return
    try:
        if len(os.listdir("/proc/self/task")) != 1:  # another thread would take a SIGTERM blocked here alone
            return
    except OSError:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_a_sigterm_of, args=(main_pid or os.getppid(),), daemon=True,
                     name="csl-sigterm-of-the-main-process").start()


def _end_on_a_sigterm_of(main_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass  # another sender's (the whole job's): the main process ends this worker
    # Ended as asked, with exit status 0: torch's SIGCHLD handler in the main process raises "killed by signal"
    # for a worker that died of the signal, also where the main process itself ended it.
    os._exit(0)


def default_eval_mode(dataset: str) -> str:
    """UniMatch's protocol: sliding window on full Cityscapes images, the original size elsewhere."""
    return "sliding_window" if dataset == "cityscapes" else "original"


SPLITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "splits")


def split_folder_name(split) -> str:
    """The folder name of a split: ``1/8`` is stored as ``1_8``."""
    return str(split).replace("/", "_")


def named_split_dir(dataset: str, split) -> str:
    """The folder of a split shipped with the package (``csl/splits/<dataset>/<split>``, see its README)."""
    split = split_folder_name(split)
    folder = os.path.join(SPLITS_DIR, dataset, split)
    if not os.path.isfile(os.path.join(folder, "labeled.txt")):
        base = os.path.join(SPLITS_DIR, dataset)
        have = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) if os.path.isdir(
            base) else []
        unquoted = [name for name in have if name.replace("_", "") == split and name != split]
        hint = (f" (YAML reads an unquoted {unquoted[0]} as the number {split}: write split: \"{unquoted[0]}\")"
                if unquoted else "")
        raise FileNotFoundError(f"no split {split!r} for dataset {dataset!r} in {SPLITS_DIR}" + (
            f"; shipped: {', '.join(have)}" if have else "; none is shipped for it: set data.split_dir") + hint)
    return folder


def coco_unlabeled_items(root: str, labeled: SplitItems) -> SplitItems:
    """The unlabeled part of a UniMatch COCO split: every ``train2017/*.jpg`` under ``root`` not in the labeled list
    (with its ``masks/<id>.png`` when that file exists, for the pseudo-label metrics), in name order."""
    folder = os.path.join(root, "train2017")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"COCO images not found: {folder} (the unlabeled part of a COCO split is derived "
                                f"from it)")
    taken = {img for img, _ in labeled}
    masks = set(os.listdir(os.path.join(root, "masks"))) if os.path.isdir(os.path.join(root, "masks")) else set()
    items: SplitItems = []
    for name in sorted(os.listdir(folder)):
        rel = f"train2017/{name}"
        if not name.endswith(".jpg") or rel in taken:
            continue
        mask = os.path.splitext(name)[0] + ".png"
        items.append((rel, f"masks/{mask}" if mask in masks else None))
    if not items:
        raise ValueError(f"no unlabeled COCO image left under {folder} (all {len(taken)} are labeled)")
    return items


def _resolve_lists(data_cfg: dict, kind: str, root: str, need_unlabeled: bool = True
                   ) -> tuple[str, str | None, SplitItems | None]:
    """``(labeled list, unlabeled list or None, unlabeled items or None)``; the items when they are derived.
    ``need_unlabeled=False``: a split folder without ``unlabeled.txt`` gives no unlabeled list (supervised
    training reads none), not an error."""
    split_dir = data_cfg.get("split_dir")
    if data_cfg.get("split") is not None:
        if split_dir is not None:
            raise ValueError("set data.split (a shipped split) or data.split_dir (a folder), not both (a config's "
                             "data.split is unset with data.split=null)")
        split_dir = named_split_dir(kind, data_cfg["split"])
    labeled = data_cfg.get("labeled_list")
    unlabeled = data_cfg.get("unlabeled_list")
    if labeled is None:
        if split_dir is None:
            raise ValueError(f"data.split (e.g. {_example_split(kind)}), data.split_dir (a folder with labeled.txt / "
                             f"unlabeled.txt) or data.labeled_list (csl train's --labeled-id-path) is required for "
                             f"dataset {kind!r}")
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"data.split_dir not found: {os.path.abspath(split_dir)}")
        labeled = os.path.join(split_dir, "labeled.txt")
    if unlabeled is None and split_dir is not None:
        unlabeled = os.path.join(split_dir, "unlabeled.txt")
        if not os.path.isfile(unlabeled):
            if not need_unlabeled:
                return labeled, None, None
            if kind == "coco":
                return labeled, None, coco_unlabeled_items(root, read_split(labeled))
            raise FileNotFoundError(f"unlabelled split file not found: {os.path.abspath(unlabeled)} "
                                    f"(set data.unlabeled_list to use another file)")
    return labeled, unlabeled, None


def _example_split(kind: str) -> str:
    base = os.path.join(SPLITS_DIR, kind)
    have = sorted(os.listdir(base)) if os.path.isdir(base) else []
    return next((d for d in have if os.path.isdir(os.path.join(base, d))), "1_8")


def _source_options(data_cfg: dict) -> dict:
    """The label-convention and scale options every file source of the config takes."""
    ignore_labels = data_cfg.get("ignore_labels")
    return {"ignore_labels": None if ignore_labels is None else tuple(int(v) for v in ignore_labels),
            "reduce_zero_label": bool(data_cfg.get("reduce_zero_label", False)),
            "scale": float(data_cfg.get("image_scale", 1.0))}


def as_given(path: str) -> str:
    """A path as the config has it; a relative one also as read from the current folder (a config's paths are read
    from where csl runs, not from the config file's folder)."""
    return path if os.path.isabs(path) else f"{path} (read from the current folder: {os.path.abspath(path)})"


def check_data_root(root: str) -> None:
    """``data.root`` is a folder (:class:`DataRootNotFound` naming it as the config has it)."""
    if not os.path.isdir(root):
        raise DataRootNotFound(f"data.root not found (or not a folder): {as_given(root)}")


def _val_source(data_cfg: dict, kind_cls, root: str, num_classes: int, ignore_index: int) -> ListSource:
    opts = _source_options(data_cfg)
    val_list = data_cfg.get("val_list")
    if val_list is not None:
        return kind_cls(root, val_list, num_classes, ignore_index, **opts)
    split_dir = data_cfg.get("split_dir")
    if split_dir is not None and not os.path.isdir(split_dir):  # never another val set in its place
        raise DataPathNotFound(f"data.split_dir not found (or not a folder): {as_given(split_dir)}", "data.split_dir")
    if split_dir is None and data_cfg.get("split") is not None:
        split_dir = os.path.join(SPLITS_DIR, data_cfg.get("dataset", ""), split_folder_name(data_cfg["split"]))
    if split_dir is not None:
        # UniMatch keeps the val list next to the partition folders: splits/<dataset>/val.txt.
        for candidate in (os.path.join(split_dir, "val.txt"), os.path.join(os.path.dirname(os.path.normpath(
                split_dir)), "val.txt")):
            if os.path.isfile(candidate):
                return kind_cls(root, candidate, num_classes, ignore_index, **opts)
    list_path, items = kind_cls.default_val_items(root)
    return kind_cls(root, list_path, num_classes, ignore_index, items=items, **opts)


def _file_kind(data_cfg: dict) -> tuple[type[ListSource], str, int]:
    """The dataset class, root folder and class count of a file dataset, checked."""
    kind = data_cfg.get("dataset", "synthetic")
    if kind not in DATASET_KINDS:
        raise ValueError(f"data.dataset must be one of {['synthetic', *DATASET_KINDS]}, got {kind!r}")
    kind_cls = DATASET_KINDS[kind]
    root = data_cfg.get("root")
    if not root:
        raise ValueError(f"data.root (the dataset folder) is required for dataset {kind!r}")
    check_data_root(root)
    num_classes = data_cfg.get("num_classes") or kind_cls.num_classes_default
    if num_classes is None:
        raise ValueError(f"data.num_classes is required for dataset {kind!r}")
    return kind_cls, root, int(num_classes)


def _norm(data_cfg: dict) -> tuple[tuple, tuple]:
    return normalization(data_cfg.get("mean"), data_cfg.get("std"))


def normalization(mean, std) -> tuple[tuple, tuple]:
    """``(mean, std)`` of the input normalisation (None: ImageNet's), checked: 3 values each on the [0, 1] scale of
    the loaded images, std > 0 (a ValueError otherwise; the config checks a run's with it before the start)."""
    mean = tuple(mean or IMAGENET_MEAN)
    std = tuple(std or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"data.mean and data.std must be 3 values (std > 0), got {mean} and {std}")
    if max(mean) > 1 or max(std) > 1:
        raise ValueError(f"data.mean and data.std are for images scaled to [0, 1], got {mean} and {std}; divide "
                         f"0-255 constants (e.g. mmseg's) by 255")
    return mean, std


def check_synthetic_classes(num_classes: int) -> int:
    """``num_classes`` when the generated scenes have that many classes, else a ValueError."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"synthetic data has 2 to {MAX_CLASSES} classes, got data.num_classes={num_classes}")
    return num_classes


def _synthetic(data_cfg: dict) -> tuple[dict, dict]:
    syn = {**SYNTHETIC_DEFAULTS, **(data_cfg.get("synthetic") or {})}
    num_classes = check_synthetic_classes(int(data_cfg.get("num_classes") or 5))
    return syn, {"size": int(syn["size"]), "seed": int(syn["seed"]), "num_classes": num_classes}


def build_val_dataset(data_cfg: dict) -> ValDataset:
    """The validation set of the config's ``data`` section alone (no labeled / unlabeled split files needed):
    ``val_list``, else ``<split_dir>/val.txt`` or ``<split_dir>/../val.txt``, else the dataset's standard val list."""
    mean, std = _norm(data_cfg)
    ignore_index = int(data_cfg.get("ignore_index", IGNORE_INDEX))
    if data_cfg.get("dataset", "synthetic") == "synthetic":
        syn, common = _synthetic(data_cfg)
        return ValDataset(SyntheticSource(int(syn["num_val"]), split="val", **common), mean=mean, std=std,
                          ignore_index=IGNORE_INDEX)
    kind_cls, root, num_classes = _file_kind(data_cfg)
    return ValDataset(_val_source(data_cfg, kind_cls, root, num_classes, ignore_index), mean=mean, std=std,
                      ignore_index=IGNORE_INDEX)


def class_names(data_cfg: dict, num_classes: int) -> list[str]:
    """The dataset's class names when it has them (the synthetic scenes, CamVid, Pascal VOC, Cityscapes, COCO, each at
    its own class count; UniMatch's names), else ``class 0``, ``class 1``, ..."""
    dataset = data_cfg.get("dataset", "synthetic")
    if dataset == "synthetic":
        names = SYNTHETIC_CLASS_NAMES[:num_classes]
    else:
        names = getattr(DATASET_KINDS.get(dataset), "class_names", None)
    if names and len(names) == num_classes:
        return list(names)
    return [f"class {k}" for k in range(num_classes)]


def build_datasets(data_cfg: dict, *, need_val: bool = True, need_unlabeled: bool = True) -> DatasetBundle:
    """Build ``(labeled, unlabeled, val)`` from the config's ``data`` section.

    ``dataset``: ``synthetic`` (default; generated in memory) | ``pascal`` | ``cityscapes`` | ``coco`` | ``camvid`` |
    ``folder``.
    File datasets read ``labeled_list`` / ``unlabeled_list`` (default ``<split_dir>/{labeled,unlabeled}.txt``) and
    ``val_list`` (default ``<split_dir>/val.txt``, ``<split_dir>/../val.txt``, then the dataset's standard val
    images). ``unlabeled`` is None when neither ``split_dir`` nor ``unlabeled_list`` is set, or when
    ``need_unlabeled`` is False and the split folder has no ``unlabeled.txt``; ``val`` is None when ``need_val`` is
    False.
    """
    if not isinstance(data_cfg, dict):
        raise TypeError(f"data_cfg must be a dict (the config's data section), got {type(data_cfg).__name__}")
    kind = data_cfg.get("dataset", "synthetic")
    crop_size = int(data_cfg.get("crop_size", 96))
    ignore_index = int(data_cfg.get("ignore_index", IGNORE_INDEX))
    mean, std = _norm(data_cfg)
    scale_range = tuple(data_cfg.get("scale_range") or (0.5, 2.0))
    # The sources map the files' ignore value to IGNORE_INDEX; the views pad with it.
    views = {"crop_size": crop_size, "mean": mean, "std": std, "ignore_index": IGNORE_INDEX,
             "scale_range": scale_range}

    if kind == "synthetic":
        syn, common = _synthetic(data_cfg)
        labeled = LabeledDataset(SyntheticSource(int(syn["num_labeled"]), split="labeled", **common), **views)
        unlabeled = UnlabeledDataset(SyntheticSource(int(syn["num_unlabeled"]), split="unlabeled", **common),
                                     **views)
        return DatasetBundle(labeled, unlabeled, build_val_dataset(data_cfg) if need_val else None)

    kind_cls, root, num_classes = _file_kind(data_cfg)
    opts = _source_options(data_cfg)
    labeled_list, unlabeled_list, unlabeled_items = _resolve_lists(data_cfg, kind, root, need_unlabeled)
    labeled = LabeledDataset(kind_cls(root, labeled_list, num_classes, ignore_index, **opts), **views)
    unlabeled = None
    if unlabeled_items is not None:
        unlabeled = UnlabeledDataset(kind_cls(root, f"{labeled_list} (unlabeled: the rest of train2017)", num_classes,
                                              ignore_index, items=unlabeled_items, **opts), **views)
    elif unlabeled_list is not None:
        unlabeled = UnlabeledDataset(kind_cls(root, unlabeled_list, num_classes, ignore_index, **opts), **views)
    return DatasetBundle(labeled, unlabeled, build_val_dataset(data_cfg) if need_val else None)
