"""Trusted Mask Perturbation: hide reliable pixels under a random block grid (spec Sec. 4)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ._backends import register, resolve
from ._checks import check_bool_map, check_fraction, check_images, check_positive_int


class TrustedMask(NamedTuple):
    """What every backend of ``trusted_mask`` returns."""

    images: torch.Tensor  # B x K x H x W, the input's dtype: the images with ``fill`` in every covered pixel
    cover: torch.Tensor  # B x H x W bool: up(cells) & reliable, the pixels that were hidden


def trusted_mask_outputs_like(images: torch.Tensor) -> TrustedMask:
    """Empty outputs of the right shapes and dtypes (the fused backends' fake kernels and output buffers)."""
    bsz, _, height, width = images.shape
    return TrustedMask(torch.empty_like(images), images.new_empty((bsz, height, width), dtype=torch.bool))


def grid_size(height: int, width: int, block: int) -> tuple[int, int]:
    """``(round(H / block), round(W / block))``, half rounded up, at least one cell each way."""
    return max(1, int(height / block + 0.5)), max(1, int(width / block + 0.5))


def draw_cells(batch: int, height: int, width: int, *, block: int, rate: float,
               generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The random ``B x gh x gw`` bool block grid; each cell is covered with probability ``rate``. Drawn as float32,
    so the grid depends on the generator's state and the sizes only, not on ``torch.get_default_dtype()``."""
    gh, gw = grid_size(height, width, block)
    if generator is None:  # no generator= at all: Dynamo traces torch.rand(..., generator=None) only for fixed shapes
        cells = torch.rand(batch, gh, gw, dtype=torch.float32, device=device) < rate
    else:
        cells = torch.rand(batch, gh, gw, generator=generator, dtype=torch.float32, device=generator.device) < rate
    # Asynchronous only towards a GPU (stream-ordered); a GPU -> CPU copy is read at once by the CPU backends.
    return cells.to(device, non_blocking=device.type == "cuda")


def check_fill(fill: float, dtype: torch.dtype) -> None:
    """``fill`` is a finite real number that ``dtype`` can hold (every backend writes it as that dtype: a value out
    of range would be inf in some and an error in others). Compared, not ``math.isfinite``: a symbolic float under
    ``torch.compile(dynamic=True)`` traces through comparisons."""
    if not isinstance(fill, numbers.Real) or isinstance(fill, bool) or not -math.inf < fill < math.inf:
        raise ValueError(f"fill must be a finite number, got {fill!r}")
    if abs(fill) > torch.finfo(dtype).max:
        raise ValueError(f"fill={fill!r} does not fit the images' dtype {dtype} (largest finite value "
                         f"{torch.finfo(dtype).max:g})")


def upsample_cells(cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest upsampling: pixel (y, x) lies in cell (floor(y * gh / H), floor(x * gw / W))."""
    gh, gw = cells.shape[-2:]
    rows = torch.arange(height, device=cells.device) * gh // height
    cols = torch.arange(width, device=cells.device) * gw // width
    return cells[:, rows][:, :, cols]


@register("trusted_mask", "reference")
def trusted_mask_reference(images: torch.Tensor, cells: torch.Tensor, reliable: torch.Tensor, fill: float
                           ) -> TrustedMask:
    """Apply a drawn block grid: ``cover = up(cells) & reliable``; ``images[cover] = fill`` on every channel."""
    cover = upsample_cells(cells, images.shape[-2], images.shape[-1]) & reliable
    # Out of place (vmap batches it) and in the images' channels_last format where they have it, as the fused
    # backends' outputs (empty_like) are: images.masked_fill would return NCHW
    masked = torch.where(cover.unsqueeze(1), torch.full((), fill, dtype=images.dtype, device=images.device), images)
    return TrustedMask(masked, cover)


def trusted_mask(
    images: torch.Tensor,
    reliable: torch.Tensor,
    *,
    block: int = 32,
    rate: float = 0.7,
    generator: torch.Generator | None = None,
    fill: float = 0.0,
    backend: str = "auto",
) -> TrustedMask:
    """Trusted Mask Perturbation.

    Args:
        images: ``B x K x H x W`` floating (normalised images; any number of channels K).
        reliable: ``B x H x W`` bool, the pixels that may be hidden (``PCOSResult.reliable``).
        block: cell size in pixels; the grid has ``max(1, floor(H / block + 1/2))`` x the same for W cells.
        rate: probability that a cell is covered, in [0, 1].
        generator: optional ``torch.Generator`` for a reproducible grid (the grid is drawn on its device). Inside
            ``torch.compile(fullgraph=True)`` pass none: Dynamo cannot trace a generator argument of ``torch.rand``
            (the grid then comes from the device's default generator, seeded by ``torch.manual_seed``).
        fill: value written into hidden pixels (0 = the dataset mean after normalisation).

    Returns:
        :class:`TrustedMask` ``(images, cover)``: a new ``B x K x H x W`` tensor and the ``B x H x W`` bool mask
        that was applied.
    """
    bsz, _, height, width = check_images(images)
    check_bool_map(reliable, images, "reliable", "images")
    check_positive_int(block, "block")
    check_fraction(rate, "rate")
    check_fill(fill, images.dtype)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    cells = draw_cells(bsz, height, width, block=block, rate=rate, generator=generator, device=images.device)
    _, impl = resolve("trusted_mask", backend, images.device)
    return impl(images, cells, reliable, float(fill))
