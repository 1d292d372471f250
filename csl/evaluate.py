"""mIoU evaluation (original size / centre crop / sliding window), distributed without duplicated samples, and
colour prediction PNGs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from csl_kernels import IGNORE_INDEX, confusion_matrix, iou_from_confusion

from .files import atomic_open
from .logging_utils import with_progress

log = logging.getLogger("csl")

EVAL_MODES = ("original", "center_crop", "sliding_window")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DistributedEvalSampler(Sampler[int]):
    """Rank r gets indices ``r, r + W, r + 2W, ...``: disjoint shares that cover the dataset exactly once (no padding
    with repeated samples, unlike ``DistributedSampler``), so the all-reduced confusion matrix counts each image
    once. Shares differ in length by at most one."""

    def __init__(self, dataset: Dataset | int, num_replicas: int | None = None, rank: int | None = None):
        n = dataset if isinstance(dataset, int) else len(dataset)
        world_rank, world_size = _world()
        self.num_replicas = world_size if num_replicas is None else int(num_replicas)
        self.rank = world_rank if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={self.rank}, num_replicas={self.num_replicas}")
        self.indices = list(range(self.rank, n, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler; the order never changes
        pass


def collate_by_size(samples: list[dict]) -> list[dict]:
    """A validation batch as sub-batches of one image size each (in order): ``eval.batch_size > 1`` works on a
    validation set whose images differ in size (Pascal VOC), and each image is evaluated exactly as alone."""
    from torch.utils.data import default_collate

    groups: dict[tuple, list[dict]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample["image"].shape), []).append(sample)
    return [default_collate(group) for group in groups.values()]


def make_eval_loader(dataset: Dataset, *, batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False
                     ) -> DataLoader:
    """A validation DataLoader; under torch.distributed it uses :class:`DistributedEvalSampler`. Each batch is a
    list of same-size sub-batches (:func:`collate_by_size`). Its workers leave a Ctrl-C or a SIGTERM of the whole
    group to the main process (:func:`csl.data.leave_stops_to_the_main_process`)."""
    from .data import leave_stops_to_the_main_process, worker_init

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=DistributedEvalSampler(dataset),
                      num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_by_size,
                      worker_init_fn=worker_init(leave_stops_to_the_main_process))


def sliding_window_scores(model: nn.Module, image: torch.Tensor, crop_size: int, stride_ratio: float = 2 / 3
                          ) -> torch.Tensor:
    """Sum of softmax probabilities over ``crop_size`` windows with stride ``int(crop_size * stride_ratio)``.

    The last row / column of windows is flush with the border; an image smaller than the window is padded
    (bottom / right, with 0 = the mean after normalisation) and the padding is cut from the result.
    Returns float32 ``B x C x H x W``.
    """
    b, _, h, w = image.shape
    ph, pw = max(crop_size - h, 0), max(crop_size - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
    hp, wp = image.shape[-2:]
    stride = max(int(crop_size * stride_ratio), 1)

    def starts(length: int) -> list[int]:
        s = list(range(0, length - crop_size + 1, stride))
        return s if s[-1] == length - crop_size else s + [length - crop_size]

    total = None
    for y in starts(hp):
        for x in starts(wp):
            prob = model(image[:, :, y:y + crop_size, x:x + crop_size]).float().softmax(dim=1)
            if total is None:
                total = prob.new_zeros(b, prob.shape[1], hp, wp)
            total[:, :, y:y + crop_size, x:x + crop_size] += prob
    return total[:, :, :h, :w]


def center_crop(tensor: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Central ``crop_size`` x ``crop_size`` window of the last two dims (the whole dim when it is smaller)."""
    h, w = tensor.shape[-2:]
    top, left = max((h - crop_size) // 2, 0), max((w - crop_size) // 2, 0)
    return tensor[..., top:top + crop_size, left:left + crop_size]


def predict_scores(model: nn.Module, image: torch.Tensor, *, mode: str = "original", crop_size: int | None = None,
                   stride_ratio: float = 2 / 3) -> torch.Tensor:
    """Class scores ``B x C x H' x W'`` for a normalised ``B x 3 x H x W`` batch (``H' x W'`` = the centre crop in
    ``center_crop`` mode, else ``H x W``). Call under ``torch.no_grad()`` with the model in eval mode."""
    if mode == "original":
        return model(image)
    if mode == "center_crop":
        return model(center_crop(image, crop_size))
    if mode == "sliding_window":
        return sliding_window_scores(model, image, crop_size, stride_ratio)
    raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")


def predict_logits(model: nn.Module, image: torch.Tensor, *, mode: str = "original", crop_size: int | None = None,
                   stride_ratio: float = 2 / 3) -> torch.Tensor:
    """:func:`predict_scores` as logits, for the selection rules that take a softmax of them: the model's logits, and
    in ``sliding_window`` mode the log of the windows' summed probabilities (its softmax is their average)."""
    scores = predict_scores(model, image, mode=mode, crop_size=crop_size, stride_ratio=stride_ratio)
    return scores.clamp_min(torch.finfo(scores.dtype).tiny).log() if mode == "sliding_window" else scores


def _check_mode(mode: str, crop_size, stride_ratio: float) -> None:
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    if mode != "original" and (not isinstance(crop_size, int) or crop_size < 1):
        raise ValueError(f"mode {mode!r} needs crop_size, a positive int; got {crop_size!r}")
    if not 0 < stride_ratio <= 1:
        raise ValueError(f"stride_ratio must be in (0, 1], got {stride_ratio!r}")


def _is_sub_batches(item) -> bool:
    """A list of batches (:func:`collate_by_size`), not one batch of ``(image, mask, ...)`` samples, which the
    default collate also gives as a list: ``[images, masks, ...]``, a tensor first."""
    return isinstance(item, list) and bool(item) and not isinstance(item[0], torch.Tensor)


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(model: nn.Module, loader, num_classes: int, *, mode: str = "original", crop_size: int | None = None,
             stride_ratio: float = 2 / 3, device=None, amp_dtype: torch.dtype | None = None,
             ignore_index: int = IGNORE_INDEX, backend: str = "auto", progress: bool = True) -> dict:
    """mIoU of ``model`` over ``loader`` (batches ``{"image": B x 3 x H x W, "mask": B x H x W, ...}``,
    ``(image, mask, ...)`` tuples, or lists of such batches as :func:`make_eval_loader` gives).

    Modes: ``original`` (full image), ``center_crop`` (central ``crop_size`` window of image and mask),
    ``sliding_window`` (``crop_size`` windows, stride ``crop_size * stride_ratio``, softmax averaged).
    Under torch.distributed the loader must use :class:`DistributedEvalSampler` (see :func:`make_eval_loader`);
    the confusion matrix is all-reduced, so every rank returns the global result. ``backend``: the
    :func:`csl_kernels.confusion_matrix` backend (the config's ``kernels.backend``).

    Returns ``{"miou": float, "iou": list[float] (NaN for a class absent from targets and predictions),
    "confusion": int64 C x C tensor (rows = target), "pixel_acc": float}``; ``miou`` is the mean over the classes
    whose IoU is defined.
    """

    _check_mode(mode, crop_size, stride_ratio)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    rank, world_size = _world()
    if world_size > 1 and not isinstance(getattr(loader, "sampler", None), DistributedEvalSampler):
        raise ValueError("distributed evaluation needs a loader with DistributedEvalSampler (csl.evaluate."
                         "make_eval_loader); otherwise samples are counted several times")
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            bar = with_progress(loader, desc=f"eval ({mode})", enabled=progress and rank == 0)  # per loader batch
            for batch in (sub for item in bar for sub in (item if _is_sub_batches(item) else [item])):
                image, mask = (batch["image"], batch["mask"]) if isinstance(batch, dict) else batch[:2]
                image = image.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                if mode == "center_crop":
                    mask = center_crop(mask, crop_size)
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16,
                                    enabled=amp_dtype is not None):
                    scores = predict_scores(model, image, mode=mode, crop_size=crop_size, stride_ratio=stride_ratio)
                if scores.shape[1] != num_classes:
                    raise ValueError(f"the model outputs {scores.shape[1]} classes but num_classes={num_classes}")
                confusion += confusion_matrix(scores.argmax(dim=1), mask.long(), num_classes,
                                              ignore_index=ignore_index, backend=backend)
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(confusion)
    confusion = confusion.cpu()
    iou = iou_from_confusion(confusion)
    defined = iou[~torch.isnan(iou)]
    total = int(confusion.sum())
    return {
        "miou": float(defined.mean()) if defined.numel() else float("nan"),
        "iou": iou.tolist(),
        "confusion": confusion,
        "pixel_acc": float(confusion.diag().sum()) / total if total else float("nan"),
    }


def prediction_names(paths: Sequence[str]) -> list[str]:
    """The PNG name of each image: its path relative to the deepest folder all images share, with ``.png`` (two
    images that would get one name, ``a.jpg`` and ``a.png``, keep their extension: ``a_jpg.png``)."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    try:
        root = os.path.commonpath(folders) if folders else ""
        stems = [os.path.splitext(os.path.relpath(os.path.abspath(p), root))[0] for p in paths]
    except ValueError:  # no common folder (Windows drives): the file names alone
        stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = [f"{stem}_{os.path.splitext(p)[1][1:]}.png" if counts[stem] > 1 else f"{stem}.png"
             for stem, p in zip(stems, paths, strict=True)]
    # Still the same name where names ignore case (a.jpg and A.jpg): the later one numbered, with a number that no
    # other image's name takes (a.png, A.png, a_2.png -> a.png, A_3.png, a_2.png).
    key = lambda name: os.path.normcase(name).lower()  # noqa: E731
    reserved = {key(name) for name in names}
    taken: set[str] = set()
    for i, name in enumerate(names):
        number = 1
        while key(names[i]) in taken:
            number += 1
            candidate = f"{os.path.splitext(name)[0]}_{number}.png"
            if key(candidate) not in reserved:
                names[i] = candidate
        taken.add(key(names[i]))
        reserved.add(key(names[i]))
    return names


def predict_images(model: nn.Module, paths: Sequence[str], out_dir: str, *, num_classes: int,
                   mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                   mode: str = "original", crop_size: int | None = None, device=None, stride_ratio: float = 2 / 3,
                   amp_dtype: torch.dtype | None = None, dataset: str | None = None, progress: bool = True,
                   image_scale: float = 1.0, overwrite: bool = False, skip_existing: bool = False,
                   skipped: list | None = None) -> list[str]:
    """Predict each image file and write a palette PNG whose pixel values are the class ids and whose colours are
    :func:`csl.data.palette` (RGB for more than 256 classes). Returns the written paths.

    Each PNG's path under ``out_dir`` is its image's path relative to the folder all images share
    (:func:`prediction_names`: ``seq1/0001.jpg`` and ``seq2/0001.jpg`` stay apart). A PNG that exists already is an
    error before any work unless ``overwrite`` (predicted again) or ``skip_existing`` (kept: the PNGs are written
    whole or not at all, so an interrupted run continues where it stopped); a PNG that would replace an input image
    always is. An image that cannot be read is skipped with a warning and, when ``skipped`` is a list, appended to it
    as ``(path, reason)``. Without a terminal for the progress bar, a log line says how far it got every
    ``HEARTBEAT_S`` seconds (:func:`csl.logging_utils.with_progress`).

    ``image_scale`` is the run's ``data.image_scale``: the model sees each image at the scale it was trained and
    evaluated at, and its class scores are resized back, so every PNG has the size of its image. A photo with an
    EXIF orientation is read upright, as viewers show it, and so is its PNG."""
    from PIL import Image

    from .data.colors import palette
    from .data.datasets import load_image, resize_pair
    from .data.transforms import image_to_tensor, normalize
    from .run_folder import check_output_folder

    _check_mode(mode, crop_size, stride_ratio)
    check_output_folder(out_dir)
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"image file not found: {p}")
    targets = [os.path.join(out_dir, name) for name in prediction_names(paths)]
    inputs = {os.path.realpath(p) for p in paths}
    replaced = [t for t in targets if os.path.realpath(t) in inputs]
    if replaced:
        raise ValueError(f"--out {out_dir} would write predictions over {len(replaced)} input image(s), e.g. "
                         f"{replaced[0]}; choose another output folder")
    if overwrite and skip_existing:
        raise ValueError("--overwrite and --skip-existing contradict each other; pass one")
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not (overwrite or skip_existing):
        raise FileExistsError(f"{len(existing)} of the {len(targets)} predictions exist already in {out_dir}, e.g. "
                              f"{existing[0]}; pass --skip-existing to predict only the others (an interrupted run), "
                              f"--overwrite to replace them, or choose another --out")
    if existing and skip_existing:
        kept = set(existing)
        log.info("csl predict: %d of the %d predictions exist already in %s and are kept (--skip-existing)",
                 len(existing), len(targets), out_dir)
        todo = [i for i, target in enumerate(targets) if target not in kept]
        paths, targets = [paths[i] for i in todo], [targets[i] for i in todo]
    device = _device_of(model, device)
    colours = palette(num_classes, dataset)
    was_training = model.training
    model.eval()
    written = []
    bar = with_progress(paths, desc="csl predict: images", enabled=progress)
    try:
        for path, out in zip(bar, targets, strict=True):
            try:
                original = load_image(path, upright=True)
            except (OSError, ValueError) as e:
                log.warning("csl predict: skipped %s: %s", path, e)
                if skipped is not None:
                    skipped.append((path, str(e)))
                continue
            scaled, _ = resize_pair(original, None, image_scale)
            image = normalize(image_to_tensor(scaled), mean, std)[None].to(device)
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16,
                                                 enabled=amp_dtype is not None):
                scores = predict_scores(model, image, mode=mode, crop_size=crop_size, stride_ratio=stride_ratio)
            if mode == "sliding_window":  # sums over 1 to several windows: averaged before a resize mixes them
                scores = scores / scores.sum(dim=1, keepdim=True)
            if scaled.shape[:2] != original.shape[:2]:  # back to the image's scale (a centre crop: its own size)
                size = original.shape[:2] if tuple(scores.shape[-2:]) == scaled.shape[:2] else \
                    tuple(max(round(n / image_scale), 1) for n in scores.shape[-2:])
                scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
            pred = scores.argmax(dim=1)[0].cpu().numpy()
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if num_classes <= 256:
                img = Image.frombytes("P", (pred.shape[1], pred.shape[0]), pred.astype(np.uint8).tobytes())
                img.putpalette(np.pad(colours, ((0, 256 - num_classes), (0, 0))).reshape(-1).tolist())
            else:
                img = Image.fromarray(colours[pred])
            # whole or not at all: a full disk leaves no empty PNG that a rerun would take for done (and names it)
            with atomic_open(out, binary=True) as f:
                img.save(f, format="PNG")
            written.append(out)
    finally:
        model.train(was_training)
    return written


__all__ = ["EVAL_MODES", "DistributedEvalSampler", "center_crop", "evaluate", "make_eval_loader", "predict_images",
           "predict_logits", "predict_scores", "sliding_window_scores"]
