"""Re-estimating BatchNorm statistics on clean images (``csl eval --bn-recalibrate N``).

A semi-supervised step's last forward pass in training mode is the strong / masked view, so the running BatchNorm
statistics that evaluation uses follow strongly augmented (colour-jittered, blurred, TMP-masked) images. Replacing
them by the plain average over clean images tells how much of an evaluation gap is those statistics rather than the
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .logging_utils import bar_disabled


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images, device, num_images: int, progress: bool = True) -> int:
    """Reset every BatchNorm layer's running mean / variance and re-estimate them as the plain average over the first
    ``num_images`` items of ``images`` (a dataset whose items hold a normalised ``image``), two images at a time
    (cropped to their common size; the image-pooling branch needs more than one value per channel) with the model in
    training mode. Returns the number of images used; the model is left in eval mode."""
    from tqdm import tqdm

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ValueError("the model has no BatchNorm layer to recalibrate")
    n = min(int(num_images), len(images)) // 2 * 2
    if n < 2:
        raise ValueError(f"need at least two images to recalibrate BatchNorm, got {num_images} of {len(images)}")
    saved = [(m.momentum, m.training) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches seen
    model.train()
    try:
        for i in tqdm(range(0, n, 2), desc="BatchNorm statistics", disable=bar_disabled(progress)):
            a, b = images[i]["image"], images[i + 1]["image"]
            h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
            model(torch.stack([a[:, :h, :w], b[:, :h, :w]]).to(device))
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
        self.source, self.mean, self.std = view.source, view.mean, view.std

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        from .data.transforms import image_to_tensor, normalize

        image = self.source.load(index, optional_mask=True)[0]  # the mask is not used: it may be missing
        return {"image": normalize(image_to_tensor(image), self.mean, self.std)}


__all__ = ["CleanImages", "recalibrate_batchnorm"]
