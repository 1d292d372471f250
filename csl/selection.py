"""Pluggable pseudo-label selection, so the paper's comparisons run from one trainer.

- ``csl`` (default): PCOS per image (spec Sec. 2) — soft Gaussian weights, reliable = weight 1;
- ``csl_class``: PCOS per (image, pseudo-class) group (supplementary Tab. 8);
- ``threshold``: the FixMatch / UniMatch fixed confidence threshold (``tau`` = 0.95);
- ``confidence_share``: a control for CSL's choice of *which* pixels: per image, as many pixels as CSL's total
  weight there (its share), taken by confidence instead — the most confident valid pixels, at weight 1. Against
  ``csl`` (with TMP off) it differs only in which pixels carry the weight, not in how much weight there is;
- ``oracle``: a diagnostic, not semi-supervised learning: the unlabeled crops' true masks as pseudo-labels, weight 1
  on every pixel with a class, 0 on void and padding. What the unlabeled losses of the recipe give with perfect
  pseudo-labels, to tell a selection's errors from the rest of the recipe. Needs the unlabeled frames' masks.

A selector maps detached logits ``B x C x H x W``, the padding map ``B x H x W`` (255 = padded) and the crops' true
masks ``truth`` (``B x H x W``, read by ``oracle`` only) to a :class:`csl_kernels.PCOSResult`
``(weight, label, reliable)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import csl_kernels
from csl_kernels import PCOSResult
from csl_kernels._checks import check_fraction, check_positive, valid_mask
from csl_kernels.residual_features import rule_confidence

from .config import CHOICES, DEFAULTS

SELECTION_MODES = CHOICES["selection.mode"]


@dataclass(frozen=True)
class Selector:
    mode: str = "csl"
    alpha: float = 8.0
    confidence: str | None = None  # None: the rule's own (paper: prob, released: log)
    tau: float = 0.95
    rule: str = "paper"  # paper | released (csl_kernels.pcos_weights)
    backend: str = "auto"

    def __post_init__(self):
        """Every setting is checked here, also those the mode does not read: a typo fails at once, not at the first
        step (or never)."""
        if self.mode not in SELECTION_MODES:
            raise ValueError(f"selection mode must be one of {SELECTION_MODES}, got {self.mode!r}")
        check_positive(self.alpha, "alpha")
        check_fraction(self.tau, "tau")
        rule_confidence(self.rule, self.confidence)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, ignore: torch.Tensor | None,
                 truth: torch.Tensor | None = None) -> PCOSResult:
        logits = logits.detach()
        if self.mode == "oracle":
            if truth is None:
                raise ValueError("selection mode 'oracle' takes the true masks as pseudo-labels: pass truth=")
            return true_labels(truth, logits.shape[1])
        if self.mode == "threshold":
            return csl_kernels.threshold_weights(logits, ignore, tau=self.tau, backend=self.backend)
        groups = "class" if self.mode == "csl_class" else "image"
        csl = csl_kernels.pcos_weights(logits, ignore, alpha=self.alpha, confidence=self.confidence,
                                       groups=groups, rule=self.rule, backend=self.backend)
        if self.mode == "confidence_share":
            return most_confident_at_share(logits, ignore, csl)
        return csl


def most_confident_at_share(logits: torch.Tensor, ignore: torch.Tensor | None, csl: PCOSResult) -> PCOSResult:
    """Per image, the ``round(sum of csl.weight)`` valid pixels of highest softmax confidence at weight 1 (ties:
    the earlier pixel in row-major order), CSL's pseudo-labels; ``reliable`` = selected. Pixels with a non-finite
    confidence are never selected. No host synchronisation."""
    bsz = logits.shape[0]
    confidence = torch.softmax(logits.float(), dim=1).amax(dim=1).flatten(1)  # B x HW
    eligible = confidence.isfinite()
    valid = valid_mask(logits, ignore)
    if valid is not None:
        eligible &= valid.flatten(1)
    score = torch.where(eligible, confidence, -1.0)  # below every real confidence
    order = score.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, pixel]: its place in the order
    count = csl.weight.reshape(bsz, -1).sum(dim=1, dtype=torch.float64).round().long()
    selected = ((rank < count[:, None]) & eligible).view_as(csl.label)
    return PCOSResult(selected.to(csl.weight.dtype), csl.label, selected)


def true_labels(truth: torch.Tensor, num_classes: int) -> PCOSResult:
    """The ``oracle`` selection: label = the true class, weight 1 and reliable where ``truth`` holds a class in
    ``[0, num_classes)``; label 0 at weight 0 elsewhere (void, padding: the datasets' ignore_index)."""
    known = (truth >= 0) & (truth < num_classes)
    return PCOSResult(known.float(), torch.where(known, truth, 0), known)


def unused_selection_settings(selection_cfg: dict) -> list[str]:
    """The ``selection`` keys set away from their defaults that the mode does not read: ``alpha``, ``confidence``
    and ``rule`` with ``mode=threshold``, ``tau`` with the PCOS modes, all four with ``mode=oracle``."""
    mode = selection_cfg.get("mode", "csl")
    pcos_keys = ("alpha", "confidence", "rule")
    keys = {"threshold": pcos_keys, "oracle": (*pcos_keys, "tau")}.get(mode, ("tau",))
    return [f"selection.{key}={selection_cfg[key]}" for key in keys
            if key in selection_cfg and selection_cfg[key] != DEFAULTS["selection"][key]]


def build_selector(selection_cfg: dict, backend: str = "auto") -> Selector:
    """From the config's ``selection`` section (``mode``, ``alpha``, ``confidence``, ``tau``, ``rule``) and the
    kernels' ``backend`` (the config's ``kernels.backend``)."""
    return Selector(mode=selection_cfg.get("mode", "csl"), alpha=float(selection_cfg.get("alpha", 8.0)),
                    confidence=selection_cfg.get("confidence"), tau=float(selection_cfg.get("tau", 0.95)),
                    rule=selection_cfg.get("rule", "paper"), backend=backend)


__all__ = ["SELECTION_MODES", "Selector", "build_selector", "most_confident_at_share", "true_labels",
           "unused_selection_settings"]
