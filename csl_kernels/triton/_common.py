"""Helpers shared by the Triton kernels: input layout (pixel strides, int64 offsets), launch guards and Chan's merge
of (count, mean, M2) records.

Every op has the same shape: its ``@triton.jit`` kernels, a ``<op>_launch`` function that allocates the outputs,
picks the launch configuration (tuning.py) and launches under
:func:`device_guard`, a ``torch.library.custom_op`` ``csl_triton::<op>`` that calls it, the op's fake kernel and the
``"triton"`` implementation registered with :mod:`csl_kernels._backends`. Inputs are trusted: the public entry of the
op checked them.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .._checks import IGNORE_INDEX

# Read once, like Triton itself does when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# libdevice calls do not exist under the interpreter; kernels take this as a constexpr to pick a portable fallback.
USE_LIBDEVICE = not INTERPRET
# Launch option for kernels whose products must stay unfused (the interpreter never fuses and takes no such option).
NO_FP_FUSION = {} if INTERPRET else {"enable_fp_fusion": False}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a compute dtype (:func:`csl_kernels._checks.compute_dtype`)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# Host-side integer helpers in plain Python: triton.cdiv / triton.next_power_of_2 are constexpr functions whose calls
# unwrap their arguments (~3 us each), and a launcher makes several per call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(1, int(n)) - 1).bit_length()


# Offsets at or above this may not fit in int32 (with headroom for the in-kernel additions).
INT32_LIMIT = 2**31 - 2**16


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int, bool]:
    """How every kernel finds the pixels of a ``B x ... x H x W`` tensor: ``(sb, sh, sw, flat)`` such that pixel
    ``p = y * W + x`` of image ``b`` lies at ``b * sb + y * sh + x * sw`` (plus ``k * stride(1)`` for class or channel
    ``k``), and, when ``flat`` (evenly spaced rows: contiguous NCHW, channels_last, slices over batch or classes), at
    ``b * sb + p * sw``. Any layout is read in place; :func:`pixel_offsets` computes the offsets in the kernels.
    """
    h, w = t.shape[-2], t.shape[-1]
    sb, sh, sw = t.stride(0), t.stride(-2), t.stride(-1)
    if w == 1:
        sw = sh  # p = y
    return sb, sh, sw, h == 1 or sh == w * sw


@triton.jit
def pixel_offsets(p, W, sh, sw, FLAT: tl.constexpr):
    """Offsets of pixels ``p = y * W + x`` inside one image (strides and ``FLAT`` from :func:`pixel_strides`)."""
    if FLAT:  # no division
        return p * sw
    return (p // W) * sh + (p % W) * sw


def wide(*tensors: torch.Tensor, extra: tuple[int, ...] = ()) -> bool:
    """True when an offset inside one image of any of ``tensors`` (its span over every dim but the batch) or one of
    the ``extra`` products may not fit in int32: the kernel then computes its offsets in int64 (constexpr ``WIDE``)."""
    for t in tensors:
        if t.is_contiguous() and t.numel() < INT32_LIMIT:  # spans fewer elements than the tensor has
            continue
        if sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:], strict=True)) >= INT32_LIMIT:
            return True
    return any(n >= INT32_LIMIT for n in extra)


# CUDA's limit on the grid's y dimension, where every kernel here puts the images.
MAX_GRID_Y = 65535


def batch_slices(bsz: int) -> list[slice] | None:
    """Every kernel takes one image per program row (grid y, at most ``MAX_GRID_Y`` rows): ``None`` when one launch
    takes the batch, else the slices of at most ``MAX_GRID_Y`` images that a launcher launches one after another."""
    if bsz <= MAX_GRID_Y:
        return None
    return [slice(start, min(start + MAX_GRID_Y, bsz)) for start in range(0, bsz, MAX_GRID_Y)]


def rows(t: torch.Tensor | None, images: slice) -> torch.Tensor | None:
    """The images ``images`` of a per-image tensor (dim 0), or ``None``."""
    return None if t is None else t[images]


def validity_flags(valid: torch.Tensor | None) -> tuple[bool, bool]:
    """The kernels' ``(HAS_VALID, IGNORE_MAP)`` for what :func:`csl_kernels._checks.pixel_validity` returned: a bool
    mask is read in place as ``*i1``, an integer ignore map compared in place (:func:`valid_at`)."""
    return valid is not None, valid is not None and valid.dtype != torch.bool


def valid_pointer(valid: torch.Tensor | None, logits: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
    """``(pointer, HAS_VALID, IGNORE_MAP)``: the contiguous mask or map and its :func:`validity_flags`, or the logits
    as a pointer the kernel never reads when there is neither."""
    return (logits if valid is None else valid.contiguous(), *validity_flags(valid))


IGNORED = tl.constexpr(IGNORE_INDEX)  # the ignore value, as the kernels see it


@triton.jit
def valid_at(valid_ptr, offsets, mask, IGNORE_MAP: tl.constexpr):
    """Whether the pixels at ``offsets`` of a bool mask (True = valid) or, with ``IGNORE_MAP``, of an integer ignore
    map (255 = ignored) are valid (``mask``: which offsets to read; False elsewhere)."""
    if IGNORE_MAP:
        return tl.load(valid_ptr + offsets, mask=mask, other=IGNORED) != IGNORED
    return tl.load(valid_ptr + offsets, mask=mask, other=0) != 0


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """Launch on the tensor's CUDA device (Triton launches on the current device): a guard that switches devices
    where the tensor is on another one than the current, else a no-op."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


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
