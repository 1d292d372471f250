"""Losses of the labeled batch: cross-entropy, plain or OHEM. (The weighted pseudo-label loss of the unlabeled views
is :func:`csl_kernels.weighted_cross_entropy`, called by :class:`csl.step.KernelOps`.)

All are free of host synchronisation (no ``.item()``, no data-dependent shapes), so a training step never waits for
the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from csl_kernels import IGNORE_INDEX


def _masked_mean_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean CE over the kept pixels (0 when none is kept, where ``F.cross_entropy`` would give NaN)."""
    safe = torch.where(keep, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits.float(), safe, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1)


class CrossEntropy(nn.Module):
    """Cross-entropy averaged over pixels whose target is not ``ignore_index``."""

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _masked_mean_ce(logits, target, target != self.ignore_index)


class OhemCrossEntropy(nn.Module):
    """Online hard example mining CE (``ProbOhemCrossEntropy2d`` as in UniMatch / TorchSemiSeg).

    Keeps the valid pixels whose probability of the true class is at most ``max(thresh, p_k)``, where ``p_k`` is the
    ``min_kept``-th smallest such probability, i.e. at least ``min_kept`` pixels (all valid pixels when there are
    fewer), and averages their CE. Computed with ``kthvalue`` on the whole batch instead of a data-dependent branch:
    invalid pixels count as probability 1, so with fewer than ``min_kept`` valid pixels ``p_k = 1`` and every valid
    pixel is kept, which is what the reference's early exit does.
    """

    def __init__(self, thresh: float = 0.7, min_kept: int = 200000, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not 0 <= thresh <= 1:
            raise ValueError(f"thresh must be in [0, 1], got {thresh!r}")
        if min_kept < 0:
            raise ValueError(f"min_kept must be >= 0, got {min_kept!r}")
        self.thresh, self.min_kept, self.ignore_index = float(thresh), int(min_kept), ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        if self.min_kept == 0:  # as in the reference: the threshold only applies together with min_kept
            return _masked_mean_ce(logits, target, valid)
        safe = torch.where(valid, target, torch.zeros_like(target))
        with torch.no_grad():
            prob = logits.float().softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
            prob = torch.where(valid, prob, torch.ones_like(prob)).reshape(-1)
            kth = prob.kthvalue(min(self.min_kept, prob.numel())).values
            threshold = torch.clamp_min(kth, self.thresh)
            keep = valid & (prob.view_as(valid) <= threshold)
        return _masked_mean_ce(logits, target, keep)


def build_labeled_criterion(train_cfg: dict, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """``train.criterion``: ``ce`` or ``ohem`` (``train.ohem_thresh``, ``train.ohem_min_kept``)."""
    name = train_cfg.get("criterion", "ce")
    if name == "ce":
        return CrossEntropy(ignore_index)
    if name == "ohem":
        return OhemCrossEntropy(train_cfg.get("ohem_thresh", 0.7), train_cfg.get("ohem_min_kept", 200000),
                                ignore_index)
    raise ValueError(f"train.criterion must be 'ce' or 'ohem', got {name!r}")


__all__ = ["CrossEntropy", "OhemCrossEntropy", "build_labeled_criterion"]
