"""Re-estimating BatchNorm statistics on clean images (``csl eval --bn-recalibrate N [--bn-views frames|crops]``).

A semi-supervised step's last forward pass in training mode is the strong / masked view, so the running BatchNorm
statistics that evaluation uses follow strongly augmented (colour-jittered, blurred, TMP-masked) images. Replacing
them by the plain average over clean images tells how much of an evaluation gap is those statistics rather than the
weights. Two kinds of clean images: whole frames (:class:`CleanImages`, two per batch), or the crops training takes
before its colour augmentation (:class:`TrainingCrops`, at the training batch size), whose statistics (the
image-pooling branch's above all) are those training normalised with. Neither leaves every model as it was:
docs/results/camvid.md ("Perfect pseudo-labels") measures how far each moves models trained on labeled crops alone.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from .logging_utils import with_progress


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images, device, num_images: int, progress: bool = True,
                          batch_size: int = 2) -> int:
    """Reset every BatchNorm layer's running mean / variance and re-estimate them as the plain average over the first
    ``num_images`` items of ``images`` (a dataset whose items hold a normalised ``image``), ``batch_size`` images at a
    time (cropped to their common size; the image-pooling branch needs more than one value per channel, so at least
    two) with the model in training mode; a last incomplete batch is left out. Returns the number of images used; the
    model is left in eval mode."""

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ValueError("the model has no BatchNorm layer to recalibrate")
    if int(batch_size) < 2:
        raise ValueError(f"BatchNorm statistics need batches of at least two images, got batch_size={batch_size}")
    n = min(int(num_images), len(images)) // batch_size * batch_size
    if n < batch_size:
        raise ValueError(f"need at least {batch_size} images (one batch) to recalibrate BatchNorm, got {num_images} of "
                         f"{len(images)}")
    saved = [(m.momentum, m.training) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches seen
    model.train()
    try:
        for i in with_progress(range(0, n, batch_size), desc="BatchNorm statistics", enabled=progress):
            batch = [images[j]["image"] for j in range(i, i + batch_size)]
            h, w = min(t.shape[-2] for t in batch), min(t.shape[-1] for t in batch)
            model(torch.stack([t[:, :h, :w] for t in batch]).to(device))
    finally:
        for m, (momentum, _) in zip(layers, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return n


class CleanImages:
    """The images of the config's unlabeled list (else its labeled list) at full size without augmentation, as
    ``{"image": normalised 3 x H x W}`` items; masks are not read."""

    def __init__(self, cfg: dict):
        from .data import build_datasets

        bundle = build_datasets({k: v for k, v in cfg["data"].items() if v is not None}, need_val=False)
        view = bundle.unlabeled if bundle.unlabeled is not None else bundle.labeled
        self.source, self.mean, self.std, self.view = view.source, view.mean, view.std, view

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        from .data.transforms import image_to_tensor, normalize

        image = self.source.load(index, optional_mask=True)[0]  # the mask is not used: it may be missing
        return {"image": normalize(image_to_tensor(image), self.mean, self.std)}


class TrainingCrops(CleanImages):
    """The same images as training's weak view takes them, without colour augmentation: a random scale in
    ``data.scale_range``, a ``data.crop_size`` crop (zero padded, as training pads) and a random flip, as
    ``{"image": normalised 3 x S x S}`` items. Item ``i`` is the same crop on every read (its own seeded draw; the
    global ``random`` state is left as it was)."""

    def __init__(self, cfg: dict, seed: int = 0):
        super().__init__(cfg)
        self.weak = self.view.weak  # training's own crop, scales and flip (the labels it also crops are dropped)
        self.seed = int(seed)

    def __getitem__(self, index: int) -> dict:
        from .data.transforms import image_to_uint8, normalize, to_float

        image = self.source.load(index, optional_mask=True)[0]
        pixels = image_to_uint8(image)
        state = random.getstate()
        random.seed(f"{self.seed}:{index}")
        try:
            crop, _ = self.weak(pixels, torch.zeros((1, *pixels.shape[-2:]), dtype=torch.uint8))
        finally:
            random.setstate(state)
        return {"image": normalize(to_float(crop), self.mean, self.std)}


__all__ = ["CleanImages", "TrainingCrops", "recalibrate_batchnorm"]
