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
    return to_float(image_to_uint8(image))


def image_to_uint8(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 array -> uint8 ``3 x H x W`` view with channels-last strides (no copy): the layout in
    which torch resizes uint8 images fastest."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 image -> contiguous float32 in [0, 1] (float input is returned contiguous, unchanged)."""
    if image.dtype == torch.uint8:
        return image.float().div_(255.0).contiguous()
    return image.contiguous()


def labels_to_tensor(*maps: np.ndarray) -> torch.Tensor:
    """Stack ``H x W`` integer maps into a ``K x H x W`` tensor (uint8 when they fit, else int64)."""
    arr = np.stack([np.asarray(m) for m in maps])
    if arr.dtype not in (np.uint8, np.int16, np.int32, np.int64):
        arr = arr.astype(np.int64)
    return torch.from_numpy(arr)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking, half-pixel centres) of a uint8 or float ``3 x H x W`` image."""
    if image.dtype == torch.uint8:
        x = image[None].contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def nearest_index(out_len: int, in_len: int) -> torch.Tensor:
    """Source index of each output position for nearest resizing with half-pixel centres (PIL's NEAREST,
    torch's ``nearest-exact``): the same geometry as :func:`resize_image`, so masks stay aligned."""
    idx = ((torch.arange(out_len, dtype=torch.float64) + 0.5) * (in_len / out_len)).floor().long()
    return idx.clamp_(0, in_len - 1)


def random_scaled_size(h: int, w: int, ratio_range: Sequence[float] = (0.5, 2.0)) -> tuple[int, int]:
    """UniMatch's rescale: the long side becomes a uniform random integer in ``[L * lo, L * hi]``, aspect kept."""
    long_side = random.randint(int(max(h, w) * ratio_range[0]), int(max(h, w) * ratio_range[1]))
    if h > w:
        oh, ow = long_side, int(w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(h * long_side / w + 0.5)
    return max(oh, 1), max(ow, 1)


class WeakAugment:
    """Random scale (long side x [0.5, 2.0]) -> random ``size`` crop (padding right / bottom: image 0, labels
    ``label_fill``) -> horizontal flip (p = 0.5).

    ``image``: ``3 x H x W`` uint8 (fast path) or float; ``labels``: ``K x H x W`` integer maps. Returns the image in
    its input dtype and int64 labels. Label maps are resized by nearest-index gathering restricted to the crop
    window, which equals resizing the whole map and cropping, without materialising the resized map.
    """

    def __init__(self, size: int, label_fill: int, scale_range: Sequence[float] = (0.5, 2.0), flip_p: float = 0.5):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"crop size must be a positive int, got {size!r}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {tuple(scale_range)}")
        self.size, self.label_fill, self.scale_range, self.flip_p = size, label_fill, (lo, hi), flip_p

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size, fill = self.size, self.label_fill
        h, w = image.shape[-2:]
        if labels.shape[-2:] != (h, w):
            raise ValueError(f"labels are {tuple(labels.shape[-2:])} but the image is {(h, w)} (H x W)")
        oh, ow = random_scaled_size(h, w, self.scale_range)
        image = resize_image(image, (oh, ow))
        ph, pw = max(size - oh, 0), max(size - ow, 0)
        x = random.randint(0, ow + pw - size)
        y = random.randint(0, oh + ph - size)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0)
        image = image[:, y:y + size, x:x + size]

        if labels.dtype == torch.uint8 and not 0 <= fill <= 255:
            labels = labels.long()
        labels = F.pad(labels, (0, 1, 0, 1), value=fill)  # index h / w = the padding value
        rows = torch.cat([nearest_index(oh, h), torch.full((ph,), h, dtype=torch.long)])[y:y + size]
        cols = torch.cat([nearest_index(ow, w), torch.full((pw,), w, dtype=torch.long)])[x:x + size]
        labels = labels[:, rows][:, :, cols].long()

        if random.random() < self.flip_p:
            image, labels = image.flip(-1), labels.flip(-1)
        return image.contiguous(), labels.contiguous()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A ``2 ceil(3 sigma) + 1`` kernel, cut to what reflect padding allows on a small image (half width < side)."""
    kernel = min(2 * math.ceil(3.0 * sigma) + 1, 2 * min(image.shape[-2:]) - 1)
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
