"""Triton trusted mask (spec Sec. 4): one pass over the images applies the upsampled block grid AND the reliable mask.

The random cell draw stays in PyTorch (:func:`csl_kernels.trusted_mask.draw_cells`, with the user's generator); this
kernel reads the ``B x gh x gw`` cells and the ``B x H x W`` reliable mask, writes ``cover`` once and every channel of
the masked images once. Reference: :func:`csl_kernels.trusted_mask.trusted_mask_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import register
from .._checks import register_not_differentiable
from .._eager import op_or_launch
from ..trusted_mask import TrustedMask, trusted_mask_outputs_like
from ._common import batch_slices, cdiv, device_guard, pixel_strides, rows, wide
from .tuning import Config, Tunable, tuned

# Pixels per program (one row of an image may span several programs) and warps; the candidates are timed on the
# user's GPU (csl_kernels/triton/tuning.py), the outputs do not depend on the choice.
DEFAULT_CONFIG = Config(tile=256, num_warps=4)
CANDIDATES = (DEFAULT_CONFIG, Config(512, 4), Config(1024, 4), Config(1024, 8), Config(2048, 8))
TUNABLE = Tunable("trusted_mask", DEFAULT_CONFIG, CANDIDATES)


@triton.jit
def _trusted_mask_kernel(
    img_ptr, out_ptr, cells_ptr, reliable_ptr, cover_ptr, fill_ptr,
    K, H, W, HW, GH, GW,
    s_ib, s_ik, s_ih, s_iw,
    s_ob, s_ok, s_oh, s_ow,
    s_rb, s_rh, s_rw,
    BLOCK_P: tl.constexpr, WIDE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    if WIDE:  # H * W, y * gh, x * gw or an offset inside one image does not fit in int32
        pid_p = pid_p.to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW  # H * W from the host: the product of two int32 arguments would wrap
    y = p // W
    x = p % W
    # Nearest upsampling: pixel (y, x) lies in cell (floor(y * gh / H), floor(x * gw / W)).
    cell = b * GH * GW + (y * GH // H) * GW + (x * GW // W)
    in_cell = tl.load(cells_ptr + cell, mask=pm, other=0) != 0
    rel = tl.load(reliable_ptr + b * s_rb + y * s_rh + x * s_rw, mask=pm, other=0) != 0
    cover = in_cell & rel
    tl.store(cover_ptr + b * HW + p, cover.to(tl.uint8), mask=pm)
    fill = tl.load(fill_ptr)
    img_off = b * s_ib + y * s_ih + x * s_iw
    out_off = b * s_ob + y * s_oh + x * s_ow
    for k in range(0, K):
        channel = k
        if WIDE:  # (K - 1) * stride(1) may not fit in int32
            channel = tl.cast(k, tl.int64)  # the interpreter iterates with Python ints
        v = tl.load(img_ptr + img_off + channel * s_ik, mask=pm)
        tl.store(out_ptr + out_off + channel * s_ok, tl.where(cover, fill, v), mask=pm)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """bool tensors go to the kernel as uint8 (same storage)."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def trusted_mask_launch(images: torch.Tensor, cells: torch.Tensor, reliable: torch.Tensor, fill: float
                        ) -> TrustedMask:
    bsz, channels, height, width = images.shape
    slices = batch_slices(bsz)
    if slices is not None:
        parts = [trusted_mask_launch(images[s], rows(cells, s), reliable[s], fill) for s in slices]
        return TrustedMask(*(torch.cat(outs) for outs in zip(*parts, strict=True)))
    masked, cover = trusted_mask_outputs_like(images)
    if bsz == 0 or height * width == 0:
        return TrustedMask(masked, cover)
    gh, gw = cells.shape[1:]
    cells_c = _bytes(cells.contiguous())
    # The fill value rounded to the image dtype exactly as masked_fill rounds it (a Python float would reach the
    # kernel as float32, which is wrong for float64 images).
    fill_t = torch.full((1,), fill, dtype=images.dtype, device=images.device)
    rel = _bytes(reliable)
    use_int64 = wide(images, masked, reliable, extra=(height * width, height * gh, width * gw))
    # Every pixel's (y, x) is needed for its cell, so the three maps are read through their row and column strides.
    i_sb, i_sh, i_sw, _ = pixel_strides(images)
    o_sb, o_sh, o_sw, _ = pixel_strides(masked)
    r_sb, r_sh, r_sw, _ = pixel_strides(reliable)

    def launch(config: Config) -> None:
        _trusted_mask_kernel[(cdiv(height * width, config.tile), bsz)](
            images, masked, cells_c, rel, _bytes(cover), fill_t,
            channels, height, width, height * width, gh, gw,
            i_sb, images.stride(1), i_sh, i_sw, o_sb, masked.stride(1), o_sh, o_sw, r_sb, r_sh, r_sw,
            BLOCK_P=config.tile, WIDE=use_int64, num_warps=config.num_warps,
        )

    with device_guard(images):
        tuned(TUNABLE, images, launch)
    return TrustedMask(masked, cover)


@torch.library.custom_op("csl_triton::trusted_mask", mutates_args=())
def _trusted_mask_op(images: torch.Tensor, cells: torch.Tensor, reliable: torch.Tensor, fill: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(trusted_mask_launch(images, cells, reliable, fill))


@_trusted_mask_op.register_fake
def _(images, cells, reliable, fill):
    return tuple(trusted_mask_outputs_like(images))


@register("trusted_mask", "triton")
def trusted_mask_triton(images: torch.Tensor, cells: torch.Tensor, reliable: torch.Tensor, fill: float
                        ) -> TrustedMask:
    return TrustedMask(*op_or_launch(torch.ops.csl_triton.trusted_mask, trusted_mask_launch, images, cells, reliable,
                                     float(fill)))


register_not_differentiable(_trusted_mask_op, "trusted_mask")
