"""Pseudo-label quality metrics of the paper's supplementary Tab. 9 (spec Sec. 6)."""

from __future__ import annotations

import torch

from ._checks import (
    IGNORE_INDEX,
    check_bool,
    check_int,
    check_int8_holds,
    check_integer_tensor,
    check_positive_int,
    check_same_shape,
)

COUNT_KEYS = ("predicted", "selected", "correct", "selected_correct")


def scored_pixels(label: torch.Tensor, target: torch.Tensor, num_classes: int,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The pixels the pseudo-label metrics and :func:`~csl_kernels.confusion_matrix` count: ``target`` a class id in
    ``[0, num_classes)`` other than ``ignore_index``, and ``label`` (the prediction) one too. Compared in int64: in
    a narrow dtype 255 or num_classes would wrap (an int8 255 is -1), and torch does not compare uint16 / uint32 /
    uint64 tensors."""
    label, target = label.long(), target.long()
    return ((target != ignore_index) & (target >= 0) & (target < num_classes) & (label >= 0)
            & (label < num_classes))


def pseudo_label_counts(label: torch.Tensor, reliable: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-class counts ``4 x num_classes`` (int64), rows in the order of ``COUNT_KEYS``.

    Over the scored pixels (:func:`scored_pixels`: a target that is a class id, not ``ignore_index``) predicted as
    class k: predicted, selected (reliable), correct (prediction == target) and selected-and-correct. Counts add up
    over batches. No boolean indexing, so it never synchronises with the GPU. An int8 ``target`` cannot hold the
    default ignore value 255 and is refused with it. An ``ignore_index`` inside ``[0, num_classes)`` takes that class
    out (as in :func:`~csl_kernels.confusion_matrix`; with more than 255 classes the default 255 is one).
    """
    check_integer_tensor(label, "label")
    check_bool(reliable, "reliable")
    check_integer_tensor(target, "target")
    check_same_shape(label=label, reliable=reliable, target=target)
    check_positive_int(num_classes, "num_classes")
    check_int(ignore_index, "ignore_index")
    check_int8_holds(target, ignore_index, "target", f"ignore_index={ignore_index}")
    valid = scored_pixels(label, target, num_classes, ignore_index)
    label, target = label.long(), target.long()
    selected = valid & reliable
    correct = valid & (label == target)
    rows = torch.stack([valid, selected, correct, selected & correct]).reshape(4, -1)
    index = torch.where(rows, label.reshape(1, -1), num_classes)  # bin num_classes collects the rest
    counts = torch.zeros(4, num_classes + 1, dtype=torch.int64, device=label.device).scatter_add(
        1, index, torch.ones_like(index))  # out of place: torch.func.vmap batches it
    return counts[:, :num_classes]


def metrics_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rates from accumulated :func:`pseudo_label_counts` (a ``4 x C`` tensor); per class (NaN where undefined) and
    ``overall_*``."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a torch.Tensor (pseudo_label_counts' 4 x C), got {type(counts).__name__}")
    if counts.dim() != 2 or counts.shape[0] != len(COUNT_KEYS):
        raise ValueError(f"counts must be {len(COUNT_KEYS)} x C ({', '.join(COUNT_KEYS)}), got shape "
                         f"{tuple(counts.shape)}")
    if counts.dtype == torch.bool or counts.dtype.is_floating_point or counts.dtype.is_complex:
        raise TypeError(f"counts must be an integer tensor (pseudo_label_counts'), got {counts.dtype}")
    predicted, selected, correct, selected_correct = counts.double()

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))

    out = {
        "sampling_rate": ratio(selected, predicted),
        "accuracy": ratio(selected_correct, selected),
        "recall": ratio(selected_correct, correct),
        "overall_sampling_rate": ratio(selected.sum(), predicted.sum()),
        "overall_accuracy": ratio(selected_correct.sum(), selected.sum()),
        "overall_recall": ratio(selected_correct.sum(), correct.sum()),
    }
    out.update({key: row.long() for key, row in zip(COUNT_KEYS, counts, strict=True)})
    return out


def pseudo_label_metrics(label: torch.Tensor, reliable: torch.Tensor, target: torch.Tensor, num_classes: int,
                         ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Sampling rate (selected / predicted), accuracy (correct among selected) and recall
    (selected-and-correct / all correct), per class and overall.

    Args:
        label: ``B x H x W`` int pseudo-labels; reliable: ``B x H x W`` bool selection; target: ``B x H x W``
            ground truth with ``ignore_index`` (255) = ignored; num_classes: C.
    """
    return metrics_from_counts(pseudo_label_counts(label, reliable, target, num_classes, ignore_index))
