"""Weighted pseudo-label cross-entropy normalised by the number of valid pixels (spec Sec. 5)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _measured
from ._backends import register
from ._checks import (
    WEIGHT_IS_CONSTANT,
    as_valid,
    check_label,
    check_logits,
    check_weight,
    compute_dtype,
    pixel_validity,
)


class CrossEntropyOutputs(NamedTuple):
    """The forward outputs of the fused ops (``csl::weighted_cross_entropy``, ``csl_triton::weighted_cross_entropy``).
    The backends return only ``loss``; ``lse`` and ``count`` are kept for the backward pass."""

    loss: torch.Tensor  # 0-dim compute_dtype(logits)
    # B x H x W x 2 in compute_dtype(logits): the log-sum-exp of every used pixel's logits in two parts (0, 0
    # elsewhere), its max logit and log1p of the rest of the max-shifted sum, kept apart as PyTorch's
    # (z - max) - log(sum) keeps them, so that CE = (max - z_y) + log1p(rest) and the softmax
    # exp((z - max) - log1p(rest)) are as exact as PyTorch's at every scale of the logits (csrc/csl_ce.h)
    lse: torch.Tensor
    count: torch.Tensor  # 0-dim int64: N_valid, the number of valid pixels (the loss's divisor is max(N_valid, 1))


def weighted_cross_entropy_outputs_like(logits: torch.Tensor) -> CrossEntropyOutputs:
    """Empty outputs of the right shapes and dtypes (the fused backends' fake kernels)."""
    bsz, _, height, width = logits.shape
    dt = compute_dtype(logits)
    return CrossEntropyOutputs(logits.new_empty((), dtype=dt), logits.new_empty((bsz, height, width, 2), dtype=dt),
                               logits.new_empty((), dtype=torch.int64))


@register("weighted_cross_entropy", "reference")
def weighted_cross_entropy_reference(
    logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """``sum_n w_n CE(z_n, y_n) / N_valid`` with plain autograd, each pixel's term in ``compute_dtype(logits)`` (CE as
    ``logsumexp(z - z_y)``, which keeps a confident pixel's small CE exact where ``logsumexp(z) - z_y`` rounds it to an
    ulp of the max, and gives +inf for a +inf logit of another class), their sum in float64 (docs/selection.md
    Sec. 5).

    Pixels that are invalid or have weight 0 contribute exactly 0 (and a zero gradient), even when their
    logits are non-finite or their label is out of range.
    """
    dt = compute_dtype(logits)
    z = logits.to(dt)
    w = weight.to(dt)
    valid = as_valid(valid)
    used = w != 0 if valid is None else valid & (w != 0)
    z = torch.where(used.unsqueeze(1), z, torch.zeros((), dtype=dt, device=z.device))
    y = torch.where(used, label.long(), 0)
    try:
        picked = z.gather(1, y.unsqueeze(1))
    except RuntimeError as err:  # eager on the CPU: an index out of bounds, said as the cpu backend says it
        if "out of bounds" not in str(err):
            raise
        bad = y[(y < 0) | (y >= z.shape[1])].flatten()
        raise RuntimeError(f"weighted_cross_entropy: label {int(bad[0])} of a used pixel is outside "
                           f"[0, {z.shape[1]})") from None
    ce = torch.logsumexp(z - picked, dim=1)
    total = torch.where(used, w * ce, torch.zeros((), dtype=dt, device=z.device)).sum(dtype=torch.float64)
    n_valid = label.numel() if valid is None else valid.sum()
    return (total / torch.as_tensor(n_valid, device=z.device).clamp_min(1)).to(dt)


def weighted_cross_entropy(
    logits: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor,
    ignore: torch.Tensor | None = None,
    *,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted pseudo-label cross-entropy, differentiable w.r.t. ``logits``.

    Args:
        logits: ``B x C x H x W`` float16 / bfloat16 / float32 / float64.
        label: ``B x H x W`` integer pseudo-labels in ``[0, C)`` wherever the pixel is valid and weighted. A label
            out of range there is an error (docs/selection.md Sec. 5): on CPU tensors ``reference`` and ``cpu``
            raise; on CUDA tensors ``reference`` and ``cuda`` fail a device assert (as ``F.cross_entropy`` does,
            without a synchronisation to check); ``triton`` returns a NaN loss and gradient, on CUDA tensors and on
            CPU tensors under the interpreter alike.
        weight: ``B x H x W`` floating per-pixel weights, constants of the loss on every backend: a weight that
            requires grad (under grad mode) is refused, since no backend would return its gradient the same way.
            A non-finite weight on a valid pixel gives a non-finite loss and a non-finite gradient at that pixel
            (inf or NaN entries, by backend; docs/selection.md Sec. 5); on an invalid pixel it contributes 0.
        ignore: optional ``B x H x W`` integer map, 255 = ignored pixel.
        valid: optional ``B x H x W`` bool mask, True = valid pixel (instead of ``ignore``).

    The fused backends keep ``label``, ``weight`` and the ``ignore`` / ``valid`` map for the backward pass as they
    are: changing one in place before ``backward()`` raises autograd's "modified by an inplace operation" error there.
    The reference keeps ``weight`` so (the same error) and works on its own copies of the label and the map: changing
    those in place does not change its gradient, which stays the forward's.

    Returns:
        0-dim float32 loss (float64 for float64 logits) ``sum_n w_n CE_n / N_valid``;
        0 when no pixel is valid.
    """
    check_logits(logits)
    check_label(label, logits)
    check_weight(weight, logits)
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(WEIGHT_IS_CONSTANT)
    mask = pixel_validity(logits, ignore, valid)

    def forward_backward(fn):  # what a training step runs: the loss and its gradient, also from a no-grad call
        with torch.inference_mode(False), torch.enable_grad():
            z, y, w, m = (t.clone() if t is not None and t.is_inference() else t for t in (logits, label, weight, mask))
            fn(z.detach().requires_grad_(True), y, w, m).backward()

    _, impl = _measured.resolve("weighted_cross_entropy", backend, logits.device, logits, forward_backward)
    return impl(logits, label, weight, mask)
