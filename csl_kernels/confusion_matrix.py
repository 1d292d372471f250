"""Confusion-matrix accumulation for mIoU."""

from __future__ import annotations

import torch

from ._backends import register, resolve
from ._checks import IGNORE_INDEX, check_int, check_integer_tensor, check_positive_int, check_same_shape
from ._eager import under_torch_func
from .metrics import scored_pixels


def confusion_matrix_outputs_like(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """An empty ``num_classes x num_classes`` int64 matrix (the fused backends' fake kernels)."""
    return pred.new_empty((num_classes, num_classes), dtype=torch.int64)


@register("confusion_matrix", "reference")
def confusion_matrix_reference(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
                               ) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts, rows = target, columns = prediction.

    Pixels whose target is ``ignore_index`` are skipped; so are pixels whose target or prediction lies outside
    ``[0, num_classes)``.
    """
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = scored_pixels(p, t, num_classes, ignore_index)
    cells = num_classes * num_classes
    flat = torch.where(keep, t * num_classes + p, cells)  # skipped pixels count in one extra cell, then dropped
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=t.device).scatter_add(0, flat, torch.ones_like(flat))
    return counts[:cells].view(num_classes, num_classes)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, *,
                     ignore_index: int = IGNORE_INDEX, backend: str = "auto") -> torch.Tensor:
    """Confusion matrix of integer predictions against targets.

    Args:
        pred: ``B x H x W`` (any shape) integer predictions.
        target: same shape, integer ground truth; ``ignore_index`` marks pixels to skip.
        num_classes: C (up to at least 1000). An ``ignore_index`` inside ``[0, C)`` takes that class out (its row
            counts nothing): with more than 255 classes the default 255 is such a class id, so pass an
            ``ignore_index`` outside ``[0, C)`` (e.g. -1) unless that is meant.

    Returns:
        ``C x C`` int64 counts, rows = target class, columns = predicted class.

    Pixels whose target is ``ignore_index`` or outside ``[0, C)`` are skipped. A prediction outside ``[0, C)`` where
    the target is a class is a ValueError: skipped, it would drop a miss and raise that class's IoU (the check
    synchronises with the GPU once per call; under ``torch.compile`` and ``torch.func`` transforms it is not made and
    such pixels are skipped).
    """
    check_integer_tensor(pred, "pred")
    check_integer_tensor(target, "target")
    check_same_shape(pred=pred, target=target)
    check_positive_int(num_classes, "num_classes")
    check_int(ignore_index, "ignore_index")
    _refuse_stray_predictions(pred, target, num_classes, ignore_index)
    _, impl = resolve("confusion_matrix", backend, pred.device)
    return impl(pred, target, num_classes, ignore_index)


def _refuse_stray_predictions(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    # Shapes without data, a graph being traced, vmap's batched tensors: no value to look at (the ops skip them).
    if pred.device.type == "meta" or torch.compiler.is_compiling() or under_torch_func():
        return
    # The pixels scored_pixels takes by their target (its label the target itself) but not by the prediction.
    stray = scored_pixels(target, target, num_classes, ignore_index) & ~scored_pixels(pred, target, num_classes,
                                                                                      ignore_index)
    if bool(stray.any()):
        raise ValueError(f"pred holds {int(stray.sum())} class id(s) outside [0, {num_classes}) where the target is a "
                         f"class (e.g. {int(pred[stray][0])}); a confusion matrix cannot count them as misses, so map "
                         f"them to a class or mark those pixels ignore_index ({ignore_index}) in the target")


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (float64; NaN for classes absent from both target and prediction) of a ``C x C`` confusion
    matrix (rows = target, columns = prediction, as :func:`confusion_matrix` returns)."""
    if not isinstance(confusion, torch.Tensor):
        raise TypeError(f"confusion must be a torch.Tensor, got {type(confusion).__name__}")
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square C x C matrix, got shape {tuple(confusion.shape)}")
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
