"""Helpers shared by the Triton kernels: input layout, launch guards and Chan's merge of (count, mean, M2) records."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Read once, like Triton itself does when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# libdevice calls do not exist under the interpreter; kernels take this as a constexpr to pick a portable fallback.
USE_LIBDEVICE = not INTERPRET


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a compute dtype (:func:`csl_kernels._checks.compute_dtype`)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def pixel_strides(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(logits, sb, sc, sp)`` such that pixel ``p = y * W + x`` of image ``b``, class ``k`` lies at
    ``b * sb + k * sc + p * sp``.

    Contiguous NCHW (``sp = 1``), channels_last (``sp = C``) and any view whose rows are evenly spaced (slices over
    batch or classes) are used as they are; any other layout is made contiguous first.
    """
    _, _, h, w = logits.shape
    sb, sc, sh, sw = logits.stride()
    if w == 1:
        return logits, sb, sc, sh
    if h == 1 or sh == w * sw:
        return logits, sb, sc, sw
    logits = logits.contiguous()
    sb, sc, _, sw = logits.stride()
    return logits, sb, sc, sw


def valid_bytes(valid: torch.Tensor | None, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The validity mask as contiguous uint8 (or a dummy pointer when there is none) and whether there is one."""
    if valid is None:
        return logits, False
    return valid.contiguous().view(torch.uint8), True


def device_guard(t: torch.Tensor):
    """Launch on the tensor's CUDA device (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def chan_merge(n1, mx1, my1, qx1, qy1, n2, mx2, my2, qx2, qy2):
    """Chan et al.'s pairwise merge of two records (count, mean x, mean y, M2 x, M2 y); empty records are neutral.

    Also the combine function of ``tl.reduce`` over records, so every merge of partial statistics is this one.
    """
    n = n1 + n2
    frac = tl.where(n > 0, n2 / tl.maximum(n, 1.0), 0.0)
    dx = mx2 - mx1
    dy = my2 - my1
    mx = mx1 + dx * frac
    my = my1 + dy * frac
    qx = qx1 + qx2 + dx * dx * n1 * frac
    qy = qy1 + qy2 + dy * dy * n1 * frac
    return n, mx, my, qx, qy
