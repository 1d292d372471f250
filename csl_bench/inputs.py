"""Benchmark inputs: segmentation-like logits, padding maps, and rotating copies that defeat the GPU L2 cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from csl_kernels import IGNORE_INDEX

from .settings import Shape


def make_logits(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Segmentation-like logits: blobs of classes, confident regions and ambiguous ones (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape.batch, shape.classes, shape.height, shape.width
    cells = torch.randint(0, c, (b, 1, h // 24 + 1, w // 24 + 1), generator=g).float()
    label = F.interpolate(cells, size=(h, w), mode="nearest").long()
    margin = F.interpolate(torch.rand(b, 1, h // 16 + 2, w // 16 + 2, generator=g), size=(h, w),
                           mode="bilinear", align_corners=False) * 12.0
    logits = torch.randn(b, c, h, w, generator=g) * 1.5
    logits.scatter_add_(1, label, margin)
    return logits.to(device=device, dtype=dtype)


def make_ignore(shape: Shape, device: torch.device) -> torch.Tensor:
    """int64 ``B x H x W`` as UniMatch's data loaders give it: 255 on a padded right/bottom border of odd images."""
    ignore = torch.zeros(shape.batch, shape.height, shape.width, dtype=torch.int64)
    ignore[1::2, :, shape.width - shape.width // 8:] = IGNORE_INDEX
    ignore[1::2, shape.height - shape.height // 10:, :] = IGNORE_INDEX
    return ignore.to(device)


def clone_inputs(inputs: tuple) -> tuple:
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            out.append(y.requires_grad_(x.requires_grad))
        else:
            out.append(x)
    return tuple(out)


def tensor_bytes(inputs: tuple) -> int:
    return sum(x.numel() * x.element_size() for x in inputs if isinstance(x, torch.Tensor))


def rotating_buffers(inputs: tuple, device: torch.device) -> list[tuple]:
    """Enough independent copies of the inputs that cycling through them defeats the GPU L2 cache."""
    if device.type != "cuda":
        return [inputs]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    size = max(1, tensor_bytes(inputs))
    count = min(12, max(2, math.ceil(4 * l2 / size)))  # 12: trusted_mask at voc321 (21 MB) on an H200
    free, _ = torch.cuda.mem_get_info(device)
    count = max(1, min(count, int(0.3 * free // size)))
    return [inputs] + [clone_inputs(inputs) for _ in range(count - 1)]


__all__ = ["clone_inputs", "make_ignore", "make_logits", "rotating_buffers", "tensor_bytes"]
