"""Pluggable pseudo-label selection, so the paper's comparisons run from one trainer.

- ``csl`` (default): PCOS per image (spec Sec. 2) — soft Gaussian weights, reliable = weight 1;
- ``csl_class``: PCOS per (image, pseudo-class) group (supplementary Tab. 8);
- ``threshold``: the FixMatch / UniMatch fixed confidence threshold (``tau`` = 0.95).

A selector maps detached logits ``B x C x H x W`` and the padding map ``B x H x W`` (255 = padded) to a
:class:`csl_kernels.PCOSResult` ``(weight, label, reliable)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import csl_kernels
from csl_kernels import PCOSResult

SELECTION_MODES = ("csl", "threshold", "csl_class")


@dataclass(frozen=True)
class Selector:
    mode: str = "csl"
    alpha: float = 8.0
    confidence: str | None = None  # None: the rule's own (paper: prob, released: log)
    tau: float = 0.95
    rule: str = "paper"  # paper | released (csl_kernels.pcos_weights)
    backend: str = "auto"

    def __post_init__(self):
        if self.mode not in SELECTION_MODES:
            raise ValueError(f"selection mode must be one of {SELECTION_MODES}, got {self.mode!r}")

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, ignore: torch.Tensor | None) -> PCOSResult:
        logits = logits.detach()
        if self.mode == "threshold":
            return csl_kernels.threshold_weights(logits, ignore, tau=self.tau, backend=self.backend)
        groups = "class" if self.mode == "csl_class" else "image"
        return csl_kernels.pcos_weights(logits, ignore, alpha=self.alpha, confidence=self.confidence,
                                        groups=groups, rule=self.rule, backend=self.backend)


def build_selector(selection_cfg: dict, backend: str = "auto") -> Selector:
    """From the config's ``selection`` section (``mode``, ``alpha``, ``confidence``, ``tau``, ``rule``) and the
    kernels' ``backend`` (the config's ``kernels.backend``)."""
    return Selector(mode=selection_cfg.get("mode", "csl"), alpha=float(selection_cfg.get("alpha", 8.0)),
                    confidence=selection_cfg.get("confidence"), tau=float(selection_cfg.get("tau", 0.95)),
                    rule=selection_cfg.get("rule", "paper"), backend=backend)


__all__ = ["SELECTION_MODES", "Selector", "build_selector"]
