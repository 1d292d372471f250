"""Augmentations of the UniMatch family on tensors.

Images are float32 ``3 x H x W`` in [0, 1] until :func:`normalize`; label maps are int64 ``K x H x W`` stacks
(ground truth, ignore map, ...) so that every map of an item gets exactly the same geometry. All randomness comes
from the ``random`` module (geometry, as UniMatch), ``numpy.random`` (blur sigma) and torch's global generator
(colour jitter), so a DataLoader worker seeded by :func:`csl.data.seed_worker` is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import ColorJitter
from torchvision.transforms import functional as TF


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 array -> float32 ``3 x H x W`` tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def labels_to_tensor(*maps: np.ndarray) -> torch.Tensor:
    """Stack ``H x W`` integer maps into an int64 ``K x H x W`` tensor."""
    return torch.stack([torch.from_numpy(np.asarray(m).astype(np.int64, copy=False)) for m in maps])


def resize(image: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (antialiased when shrinking) image, nearest label maps; both use half-pixel centres, so they stay
    aligned."""
    h, w = size
    img = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    lab = F.interpolate(labels[None].float(), size=(h, w), mode="nearest-exact")[0].long()
    return img.clamp_(0.0, 1.0), lab


def random_scale(image: torch.Tensor, labels: torch.Tensor, ratio_range: Sequence[float] = (0.5, 2.0)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale so the long side is a uniform random integer in ``[L * lo, L * hi]`` (aspect ratio kept)."""
    h, w = image.shape[-2:]
    long_side = max(h, w)
    new_long = random.randint(int(long_side * ratio_range[0]), int(long_side * ratio_range[1]))
    if h > w:
        oh, ow = new_long, int(w * new_long / h + 0.5)
    else:
        ow, oh = new_long, int(h * new_long / w + 0.5)
    return resize(image, labels, (max(oh, 1), max(ow, 1)))


def pad_to(image: torch.Tensor, labels: torch.Tensor, size: int, label_fill: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad right / bottom to at least ``size x size``: image with 0 (black, before normalisation), labels with
    ``label_fill``."""
    h, w = image.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return image, labels
    image = F.pad(image, (0, pw, 0, ph), value=0.0)
    labels = F.pad(labels, (0, pw, 0, ph), value=label_fill)
    return image, labels


def random_crop(image: torch.Tensor, labels: torch.Tensor, size: int, label_fill: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    image, labels = pad_to(image, labels, size, label_fill)
    h, w = image.shape[-2:]
    x = random.randint(0, w - size)
    y = random.randint(0, h - size)
    return image[:, y:y + size, x:x + size], labels[:, y:y + size, x:x + size]


def random_hflip(image: torch.Tensor, labels: torch.Tensor, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    if random.random() < p:
        return image.flip(-1), labels.flip(-1)
    return image, labels


class WeakAugment:
    """Random scale (long side x [0.5, 2.0]) -> random crop ``size`` (pad: image 0, labels ``label_fill``) ->
    horizontal flip (p = 0.5)."""

    def __init__(self, size: int, label_fill: int, scale_range: Sequence[float] = (0.5, 2.0), flip_p: float = 0.5):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"crop size must be a positive int, got {size!r}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {tuple(scale_range)}")
        self.size, self.label_fill, self.scale_range, self.flip_p = size, label_fill, (lo, hi), flip_p

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = random_scale(image, labels, self.scale_range)
        image, labels = random_crop(image, labels, self.size, self.label_fill)
        image, labels = random_hflip(image, labels, self.flip_p)
        return image.contiguous(), labels.contiguous()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    kernel = 2 * math.ceil(3.0 * sigma) + 1
    return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


class ColorAugment:
    """Photometric view: ColorJitter with probability ``p_jitter``, grayscale with ``p_gray``, Gaussian blur
    (sigma ~ U(0.1, 2.0)) with ``p_blur``.

    ``ColorAugment.strong()`` is UniMatch's strong view (jitter 0.5/0.5/0.5/0.25, p 0.8; gray 0.2; blur 0.5);
    ``ColorAugment.mild()`` is the masking view of Trusted Mask Perturbation (jitter 0.25/0.25/0.25/0.05, p 0.8;
    no grayscale; blur 0.5): the masked view must still be recognisable from its visible context.
    """

    def __init__(self, jitter: Sequence[float], p_jitter: float, p_gray: float, p_blur: float):
        self.jitter = ColorJitter(*jitter)
        self.p_jitter, self.p_gray, self.p_blur = p_jitter, p_gray, p_blur

    @classmethod
    def strong(cls) -> ColorAugment:
        return cls((0.5, 0.5, 0.5, 0.25), p_jitter=0.8, p_gray=0.2, p_blur=0.5)

    @classmethod
    def mild(cls) -> ColorAugment:
        return cls((0.25, 0.25, 0.25, 0.05), p_jitter=0.8, p_gray=0.0, p_blur=0.5)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if random.random() < self.p_jitter:
            image = self.jitter(image)
        if self.p_gray > 0 and random.random() < self.p_gray:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if random.random() < self.p_blur:
            image = gaussian_blur(image, float(np.random.uniform(0.1, 2.0)))
        return image.clamp(0.0, 1.0)


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(image - mean) / std`` per channel; returns a new float32 tensor."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image - m) / s
