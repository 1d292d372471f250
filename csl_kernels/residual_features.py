"""Per-pixel CSL features: max confidence and residual dispersion (spec Sec. 1)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backends import register, resolve
from ._checks import as_valid, check_choice, check_logits, compute_dtype, pixel_validity

EPS = 1e-8
CONFIDENCE_MODES = ("prob", "log")
# "paper": Algorithm 1 (spec Sec. 1-2); "released": the authors' released code (spec Sec. 2b): log confidence, the
# residual variance over all C slots with the max slot at 0, and pixels below the cluster's mean dispersion kept.
RULES = ("paper", "released")


class ResidualFeatures(NamedTuple):
    """What every backend of ``residual_features`` returns; ignored and non-finite pixels give ``(0, 0, 0)``."""

    f0: torch.Tensor  # B x H x W compute_dtype(logits): max confidence pmax (or log pmax)
    v: torch.Tensor  # B x H x W compute_dtype(logits): residual dispersion v <= 0
    label: torch.Tensor  # B x H x W int64: pseudo-label (first maximal class)


def residual_features_outputs_like(logits: torch.Tensor) -> ResidualFeatures:
    """Empty outputs of the right shapes and dtypes (the fused backends' fake kernels and output buffers)."""
    b, _, h, w = logits.shape
    dt = compute_dtype(logits)
    return ResidualFeatures(logits.new_empty((b, h, w), dtype=dt), logits.new_empty((b, h, w), dtype=dt),
                            logits.new_empty((b, h, w), dtype=torch.long))


@register("residual_features", "reference")
def residual_features_reference(
    logits: torch.Tensor, valid: torch.Tensor | None, log_confidence: bool, released: bool = False
) -> ResidualFeatures:
    """Reference features (spec Sec. 1; ``released``: Sec. 2b), computed in ``compute_dtype(logits)``."""
    f0, v, label, _ = features_with_validity(logits, valid, log_confidence, released)
    return ResidualFeatures(f0, v, label)


def features_with_validity(
    logits: torch.Tensor, valid: torch.Tensor | None, log_confidence: bool, released: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`residual_features_reference` but also returns the final validity mask (valid and finite);
    ``valid`` in either form of :func:`~csl_kernels._checks.pixel_validity`."""
    c = logits.shape[1]
    z = logits.to(compute_dtype(logits))
    finite = torch.isfinite(z).all(dim=1)
    keep = finite if valid is None else finite & as_valid(valid)
    z = torch.where(finite.unsqueeze(1), z, torch.zeros((), dtype=z.dtype, device=z.device))
    label = z.argmax(dim=1)  # first maximal index on ties
    is_max = torch.arange(c, device=z.device).view(1, c, 1, 1) == label.unsqueeze(1)
    z_max = z.gather(1, label.unsqueeze(1))
    # exp(z_k - z_max) of the non-max classes; their sum R gives r = R / (1 + R) without cancellation.
    e_res = torch.exp(z - z_max).masked_fill(is_max, 0.0)
    big_r = class_sum(e_res)
    r = big_r / (1.0 + big_r)
    p_res = e_res / (1.0 + big_r).unsqueeze(1)
    m = r / (c - 1)
    dev = (p_res - m.unsqueeze(1)).masked_fill(is_max, 0.0)
    var = class_sum(dev * dev) / (c - 1)
    if released:  # the max slot counted as a 0 among the C - 1 others: + (0 - m)^2 / (C - 1)
        var = var + m * m / (c - 1)
    g = (c - 1) ** 2 / (2.0 * (r + EPS))
    v = -g * var
    f0 = -torch.log1p(big_r) if log_confidence else 1.0 / (1.0 + big_r)
    zero = torch.zeros((), dtype=f0.dtype, device=f0.device)
    f0 = torch.where(keep, f0, zero)
    v = torch.where(keep, v, zero)
    label = torch.where(keep, label, torch.zeros((), dtype=label.dtype, device=label.device))
    return f0, v, label, keep


def class_sum(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(dim=1)`` of a ``B x C x H x W`` tensor, every pixel's C values added in the same order: a reduction
    over the strided class dim vectorises across pixels and adds in an order that depends on the pixel's position,
    which gives identical pixels features a last bit apart (and PCOS a second cluster where the spec has one)."""
    return t.movedim(1, -1).contiguous().sum(dim=-1)


def residual_features(
    logits: torch.Tensor,
    ignore: torch.Tensor | None = None,
    *,
    valid: torch.Tensor | None = None,
    confidence: str | None = None,
    rule: str = "paper",
    backend: str = "auto",
) -> ResidualFeatures:
    """Max confidence, residual dispersion and pseudo-label of every pixel.

    Args:
        logits: ``B x C x H x W`` float16 / bfloat16 / float32 / float64, any strides, ``C >= 2``.
        ignore: optional ``B x H x W`` integer map, 255 = ignored pixel.
        valid: optional ``B x H x W`` bool mask, True = valid pixel (instead of ``ignore``).
        confidence: ``"prob"`` (``f0 = pmax``) or ``"log"`` (``f0 = log pmax``); default: the rule's (``"prob"``
            for ``"paper"``, ``"log"`` for ``"released"``).
        rule: ``"paper"`` (Algorithm 1) or ``"released"`` (the authors' released code: the residual variance also
            counts the max slot as a 0; docs/selection.md Sec. 2b).
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        :class:`ResidualFeatures` ``(f0, v, label)``: ``B x H x W`` float32 (float64 for float64 logits) max
        confidence, ``B x H x W`` residual dispersion ``v <= 0`` and ``B x H x W`` int64 pseudo-labels. Ignored and
        non-finite pixels get ``(0, 0, 0)``.
    """
    check_logits(logits)
    confidence = rule_confidence(rule, confidence)
    mask = pixel_validity(logits, ignore, valid)
    _, impl = resolve("residual_features", backend, logits.device)
    return impl(logits, mask, confidence == "log", rule == "released")


def rule_confidence(rule: str, confidence: str | None) -> str:
    """Check ``rule`` and ``confidence``; the confidence feature to use (``None``: the rule's own)."""
    check_choice(rule, "rule", RULES)
    if confidence is None:
        return "log" if rule == "released" else "prob"
    check_choice(confidence, "confidence", CONFIDENCE_MODES)
    return confidence
