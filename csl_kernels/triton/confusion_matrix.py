"""Triton confusion matrix: ``C x C`` int64 counts, rows = target, columns = prediction.

Integer additions commute, so the counts are exact and reproducible whatever the order of the atomics. Segmentation
counts pile up on a few diagonal bins; for small C (``C * C <= HIST_BINS``) each program therefore first builds a
private histogram of ``ITERS * BLOCK`` pixels and then adds it with one vector atomic, instead of one contended
atomic per pixel. Larger C (up to any size; 1000 classes = 10^6 bins) adds one atomic per kept pixel; the bins are
spread out enough there. Reference: :func:`csl_kernels.confusion_matrix.confusion_matrix_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import register
from .._eager import under_torch_func
from ..confusion_matrix import confusion_matrix_outputs_like
from ._common import cdiv, device_guard

BLOCK = 1024
ITERS = 8  # chunks of BLOCK pixels per program on the histogram path
HIST_BINS = 1024


@triton.jit
def _confusion_kernel(
    pred_ptr, target_ptr, out_ptr, N, C, ignore_index,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, HIST: tl.constexpr, NBINS: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * (ITERS * BLOCK)
    if HIST:
        hist = tl.zeros((NBINS,), tl.int32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        t = tl.load(target_ptr + offs, mask=m, other=0).to(tl.int64)
        p = tl.load(pred_ptr + offs, mask=m, other=0).to(tl.int64)
        keep = m & (t != ignore_index) & (t >= 0) & (t < C) & (p >= 0) & (p < C)
        idx = tl.where(keep, t * C + p, 0)
        if HIST:
            hist += tl.histogram(idx.to(tl.int32), NBINS, mask=keep)
        else:
            tl.atomic_add(out_ptr + idx, tl.full((BLOCK,), 1, tl.int64), mask=keep, sem="relaxed")
    if HIST:
        bins = tl.arange(0, NBINS)
        tl.atomic_add(out_ptr + bins, hist.to(tl.int64), mask=(bins < C * C) & (hist > 0), sem="relaxed")


def confusion_matrix_launch(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
                            ) -> torch.Tensor:
    out = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=pred.device)
    n = pred.numel()
    if n == 0:
        return out
    pred_c = pred.reshape(-1).contiguous()  # a strided 1-D view stays strided through reshape
    target_c = target.reshape(-1).contiguous()
    hist = num_classes * num_classes <= HIST_BINS
    iters = ITERS if hist else 1
    with device_guard(pred):
        _confusion_kernel[(cdiv(n, BLOCK * iters),)](
            pred_c, target_c, out, n, num_classes, ignore_index,
            BLOCK=BLOCK, ITERS=iters, HIST=hist, NBINS=HIST_BINS, num_warps=4,
        )
    return out


@torch.library.custom_op("csl_triton::confusion_matrix", mutates_args=())
def _confusion_matrix_op(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
                         ) -> torch.Tensor:
    return confusion_matrix_launch(pred, target, num_classes, ignore_index)


@_confusion_matrix_op.register_fake
def _(pred, target, num_classes, ignore_index):
    return confusion_matrix_outputs_like(pred, num_classes)


@register("confusion_matrix", "triton")
def confusion_matrix_triton(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
                            ) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts (rows = target); pixels with an out-of-range class are skipped."""
    if torch.compiler.is_compiling() or under_torch_func():  # traced, or batched by vmap
        return torch.ops.csl_triton.confusion_matrix(pred, target, int(num_classes), int(ignore_index))
    return confusion_matrix_launch(pred, target, int(num_classes), int(ignore_index))
