"""Baselines for the ablations: the fixed confidence threshold and alternative per-pixel scores (spec Sec. 3)."""

from __future__ import annotations

import torch

from ._backends import resolve
from ._checks import check_choice, check_fraction, check_logits, compute_dtype, pixel_validity, valid_mask
from .pcos_weights import PCOSResult
from .residual_features import class_sum, features_with_validity

SCORES = ("confidence", "entropy", "residual_entropy", "margin", "dispersion")


def threshold_weights(
    logits: torch.Tensor, ignore: torch.Tensor | None = None, *, valid: torch.Tensor | None = None,
    tau: float = 0.95, backend: str = "auto"
) -> PCOSResult:
    """FixMatch / UniMatch selection: ``w = [pmax >= tau] & valid``.

    Args:
        logits: ``B x C x H x W``; ignore / valid: optional ``B x H x W`` (see :func:`residual_features`).
        tau: confidence threshold in [0, 1]; 0 keeps every valid pixel with finite logits (UniMatch's Cityscapes
            ``conf_thresh: 0``).

    Returns:
        :class:`PCOSResult` with float32 0/1 ``weight``, int64 ``label``, bool ``reliable`` and no stats; at an
        invalid pixel ``label`` is 0 (a class id) and ``weight`` 0, as :func:`pcos_weights` returns them.
    """
    check_logits(logits)
    check_fraction(tau, "tau")
    mask = pixel_validity(logits, ignore, valid)
    _, impl = resolve("threshold_weights", backend, logits.device)  # the residual_features kernels
    f0, _, label = impl(logits, mask, False)
    reliable = (f0 >= tau) & (f0 > 0)  # a valid pixel with finite logits has f0 = pmax >= 1 / C; the others 0
    return PCOSResult(reliable.to(torch.float32), label, reliable, None)


def selection_scores(logits: torch.Tensor, ignore: torch.Tensor | None = None, *,
                     valid: torch.Tensor | None = None, score: str = "entropy") -> torch.Tensor:
    """Per-pixel reliability scores for the ablation of the paper's supplementary Tab. 13 (reference only).

    ``"confidence"`` = pmax, ``"entropy"`` = H(p), ``"residual_entropy"`` = -sum_{k != k'} p_k log p_k,
    ``"margin"`` = pmax - second largest p, ``"dispersion"`` = v of :func:`residual_features`.
    Higher means more reliable for confidence / margin / dispersion, lower for the entropies.

    Returns a ``B x H x W`` tensor (float32, float64 for float64 logits); invalid pixels get NaN.
    """
    check_logits(logits)
    check_choice(score, "score", SCORES)
    mask = valid_mask(logits, ignore, valid)
    f0, v, label, keep = features_with_validity(logits, mask, False)
    z = logits.to(compute_dtype(logits))
    z = torch.where(keep.unsqueeze(1), z, torch.zeros((), dtype=z.dtype, device=z.device))
    p = torch.softmax(z, dim=1)
    plogp = torch.special.xlogy(p, p)
    if score == "confidence":
        out = f0
    elif score == "dispersion":
        out = v
    elif score in ("entropy", "residual_entropy"):
        out = -(class_sum(plogp) - plogp.gather(1, label.unsqueeze(1)).squeeze(1))
        if score == "entropy":
            # + the top class's -pmax log pmax = log1p(R) / (1 + R), R = sum_{k != k'} exp(z_k - z_k') (Sec. 1): from
            # the softmax it is 0 wherever pmax rounds to 1, some percent of H for a confident pixel
            top = label.unsqueeze(1)
            rest = torch.exp(z - z.gather(1, top)).scatter(1, top, 0.0)
            r = class_sum(rest)
            out = out + torch.log1p(r) / (1 + r)
    else:
        top2 = p.topk(2, dim=1).values
        out = top2[:, 0] - top2[:, 1]
    return torch.where(keep, out, torch.full((), float("nan"), dtype=out.dtype, device=out.device))
