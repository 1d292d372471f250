"""PCOS: per-group closed-form SVD separation of (confidence, dispersion) and Gaussian soft weights (spec Sec. 2)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _measured
from ._backends import register
from ._checks import check_choice, check_flag, check_logits, check_positive, pixel_validity
from .residual_features import EPS, features_with_validity, rule_confidence

GROUP_MODES = ("image", "class")
RANK_ONE_RTOL = 1e-12
# A group whose feature columns are this close to collinear, a c - b^2 <= COLLINEAR_RTOL * a c (the sine of their
# angle under 1e-4), is rank one too: that is below what float32 features resolve (pixels whose logits agree to the
# last bits reach ~1e-10), where the backends' last-bit differences would pick the split (spec Sec. 2.3).
COLLINEAR_RTOL = 1e-8


class PCOSStats(NamedTuple):
    """Per-group statistics (float64 / int64). Leading dims ``G`` are ``(B,)`` or ``(B, C)`` for class groups."""

    mu: torch.Tensor  # G x 2 clusters x 2 features (f0, v)
    var: torch.Tensor  # G x 2 x 2, unbiased
    count: torch.Tensor  # G x 2, int64
    eigenvalues: torch.Tensor  # G x 2, lambda_1 >= lambda_2 >= 0 of the uncentred Gram matrix
    chosen: torch.Tensor  # G, int64: index of the reliable cluster
    n_nonfinite: torch.Tensor  # B, int64: pixels whose logits hold NaN or +-inf


class PCOSResult(NamedTuple):
    weight: torch.Tensor  # B x H x W float32 in [0, 1]
    label: torch.Tensor  # B x H x W int64 pseudo-label; 0 (a class id) at invalid pixels, whose weight is 0
    reliable: torch.Tensor  # B x H x W bool: weight == 1 and valid
    stats: PCOSStats | None = None


class PCOSOutputs(NamedTuple):
    """What every backend of ``pcos_weights`` returns, in this order (also the outputs of the ``csl::pcos_weights``
    and ``csl_triton::pcos_weights`` ops). Group statistics are flattened to ``G = B`` groups (image groups) or
    ``G = B * C`` (class groups, group ``b * C + label``); :func:`pcos_weights` reshapes them into :class:`PCOSStats`.
    """

    weight: torch.Tensor  # B x H x W float32
    label: torch.Tensor  # B x H x W int64
    reliable: torch.Tensor  # B x H x W bool
    mu: torch.Tensor  # G x 2 x 2 float64
    var: torch.Tensor  # G x 2 x 2 float64
    count: torch.Tensor  # G x 2 int64
    eigenvalues: torch.Tensor  # G x 2 float64
    chosen: torch.Tensor  # G int64
    n_nonfinite: torch.Tensor  # B int64


def pcos_outputs_like(logits: torch.Tensor, class_groups: bool, packed: bool = False) -> PCOSOutputs:
    """Empty outputs of the right shapes and dtypes (the fused backends' fake kernels and output buffers).

    ``packed``: the float64 statistics are views of one buffer and the int64 ones of another (5 allocations instead
    of 9, for eager calls; a custom op's outputs must not share storage)."""
    b, c, h, w = logits.shape
    g = b * c if class_groups else b
    f64, i64 = torch.float64, torch.long
    weight = logits.new_empty((b, h, w), dtype=torch.float32)
    label = logits.new_empty((b, h, w), dtype=i64)
    reliable = logits.new_empty((b, h, w), dtype=torch.bool)
    if not packed:
        return PCOSOutputs(weight, label, reliable, logits.new_empty((g, 2, 2), dtype=f64),
                           logits.new_empty((g, 2, 2), dtype=f64), logits.new_empty((g, 2), dtype=i64),
                           logits.new_empty((g, 2), dtype=f64), logits.new_empty((g,), dtype=i64),
                           logits.new_empty((b,), dtype=i64))
    mu, var, eigenvalues = logits.new_empty((10 * g,), dtype=f64).split_with_sizes((4 * g, 4 * g, 2 * g))
    count, chosen, n_nonfinite = logits.new_empty((3 * g + b,), dtype=i64).split_with_sizes((2 * g, g, b))
    return PCOSOutputs(weight, label, reliable, mu.view(g, 2, 2), var.view(g, 2, 2), count.view(g, 2),
                       eigenvalues.view(g, 2), chosen, n_nonfinite)


def closed_form_eigen(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric 2 x 2 matrices ``[[a, b], [b, c]]`` (batched, float64).

    Returns ``(lambda_1, lambda_2, u_1, u_2)`` with ``lambda_1 >= lambda_2 >= 0`` (negative rounding clamped)
    and orthonormal ``u_1``, ``u_2`` of shape ``... x 2``.
    """
    half_trace = 0.5 * (a + c)
    radius = torch.sqrt((0.5 * (a - c)) ** 2 + b * b)
    lam1 = half_trace + radius
    # lambda_2 = det / lambda_1 avoids the cancellation of half_trace - radius when lambda_2 << lambda_1.
    det = a * c - b * b
    lam2 = torch.where(lam1 > 0, (det / lam1.clamp_min(torch.finfo(lam1.dtype).tiny)).clamp_min(0.0), 0.0)
    lam1 = lam1.clamp_min(0.0)
    cand_a = torch.stack((b, lam1 - a), dim=-1)
    cand_b = torch.stack((lam1 - c, b), dim=-1)
    norm_a = cand_a.norm(dim=-1, keepdim=True)
    norm_b = cand_b.norm(dim=-1, keepdim=True)
    use_a = norm_a >= norm_b
    best = torch.where(use_a, cand_a, cand_b)
    best_norm = torch.where(use_a, norm_a, norm_b)
    u1 = best / best_norm.clamp_min(torch.finfo(best.dtype).tiny)
    x_axis = torch.tensor([1.0, 0.0], dtype=a.dtype, device=a.device).expand_as(u1)
    y_axis = torch.tensor([0.0, 1.0], dtype=a.dtype, device=a.device).expand_as(u1)
    axis = torch.where((a >= c).unsqueeze(-1), x_axis, y_axis)
    u1 = torch.where(((b == 0) | (best_norm.squeeze(-1) == 0)).unsqueeze(-1), axis, u1)
    u2 = torch.stack((-u1[..., 1], u1[..., 0]), dim=-1)
    return lam1, lam2, u1, u2


def choose_cluster(mu0: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Reliable cluster: the non-empty cluster with the higher mean confidence (ties and no pixels: 0).

    ``mu0`` is ``G x 2`` (mean f0 per cluster), ``count`` is ``G x 2``. An empty cluster is never chosen
    (its mean is 0 by definition, which would beat the negative means of ``confidence="log"``).
    """
    return ((count[:, 1] > 0) & ((count[:, 0] == 0) | (mu0[:, 1] > mu0[:, 0]))).long()


@register("pcos_weights", "reference")
def pcos_weights_reference(
    logits: torch.Tensor, valid: torch.Tensor | None, alpha: float, log_confidence: bool, class_groups: bool,
    released: bool = False,
) -> PCOSOutputs:
    """Reference PCOS, batched over groups (no Python loop over images), sums in float64; ``released``: the
    authors' released rule (spec Sec. 2b)."""
    bsz, ncls = logits.shape[:2]
    f0, v, label, keep = features_with_validity(logits, valid, log_confidence, released)
    n_nonfinite = (~torch.isfinite(logits).all(dim=1)).sum(dim=(1, 2))
    n_groups = bsz * ncls if class_groups else bsz
    image = torch.arange(bsz, device=logits.device).view(bsz, 1, 1).expand_as(label)
    group = (image * ncls + label if class_groups else image).reshape(-1)
    keep_f = keep.reshape(-1)
    x = f0.reshape(-1).double() * keep_f
    y = v.reshape(-1).double() * keep_f
    fdt = torch.float64

    def group_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=fdt, device=values.device).index_add(0, index, values)

    gram_a = group_sum(x * x, group, n_groups)
    gram_b = group_sum(x * y, group, n_groups)
    gram_c = group_sum(y * y, group, n_groups)
    lam1, lam2, u1, u2 = closed_form_eigen(gram_a, gram_b, gram_c)
    s1, s2 = lam1.sqrt(), lam2.sqrt()
    gram_ac = gram_a * gram_c
    rank_one = (s2 <= RANK_ONE_RTOL * s1) | (gram_ac - gram_b * gram_b <= COLLINEAR_RTOL * gram_ac)
    proj0 = (u1[group, 0] * x + u1[group, 1] * y).abs()
    proj1 = (u2[group, 0] * x + u2[group, 1] * y).abs()
    # |V[n, 1]| > |V[n, 0]|  <=>  |u_2 . phi| * s_1 > |u_1 . phi| * s_2  (no division by a zero s_2).
    cluster = ((proj1 * s1[group] > proj0 * s2[group]) & ~rank_one[group]).long()

    slot = group * 2 + cluster
    n_slots = n_groups * 2
    count = torch.zeros(n_slots, dtype=torch.long, device=x.device).index_add(0, slot, keep_f.long())
    denom = count.clamp_min(1).to(fdt)
    mu_x = group_sum(x, slot, n_slots) / denom
    mu_y = group_sum(y, slot, n_slots) / denom
    dx = (x - mu_x[slot]) * keep_f
    dy = (y - mu_y[slot]) * keep_f
    unbiased = (count - 1).clamp_min(1).to(fdt)
    var_x = torch.where(count > 1, group_sum(dx * dx, slot, n_slots) / unbiased, 0.0)
    var_y = torch.where(count > 1, group_sum(dy * dy, slot, n_slots) / unbiased, 0.0)

    mu = torch.stack((mu_x, mu_y), dim=-1).view(n_groups, 2, 2)
    var = torch.stack((var_x, var_y), dim=-1).view(n_groups, 2, 2)
    count = count.view(n_groups, 2)
    chosen = choose_cluster(mu[..., 0], count)
    rows = torch.arange(n_groups, device=x.device)
    mu_star = mu[rows, chosen][group]
    var_star = var[rows, chosen][group]
    z0 = (x - mu_star[:, 0]) / torch.sqrt(var_star[:, 0] + EPS)
    z1 = (y - mu_star[:, 1]) / torch.sqrt(var_star[:, 1] + EPS)
    weight = torch.exp(-(z0 * z0 + z1 * z1) / alpha)
    # Kept at weight 1: above the reliable cluster's mean confidence, or on the more reliable side of its mean
    # dispersion (paper: above it; released code: below it).
    preserve = (x > mu_star[:, 0]) | ((y < mu_star[:, 1]) if released else (y > mu_star[:, 1]))
    weight = torch.where(preserve, 1.0, weight)
    weight = torch.where(keep_f, weight, 0.0).to(torch.float32).view_as(label)
    reliable = (weight == 1) & keep
    eigenvalues = torch.stack((lam1, lam2), dim=-1)
    return PCOSOutputs(weight, label, reliable, mu, var, count, eigenvalues, chosen, n_nonfinite)


def auto_variant(groups: str) -> str:
    """What ``backend="auto"`` on CUDA keys its measured choice with besides the shape class: image and class groups
    cost differently, so they are timed and cached apart (csl_kernels/_measured.py)."""
    return f"{groups}-groups"


def pcos_weights(
    logits: torch.Tensor,
    ignore: torch.Tensor | None = None,
    *,
    valid: torch.Tensor | None = None,
    alpha: float = 8.0,
    confidence: str | None = None,
    groups: str = "image",
    rule: str = "paper",
    backend: str = "auto",
    return_stats: bool = False,
) -> PCOSResult:
    """CSL soft weights for every pixel.

    Args:
        logits: ``B x C x H x W`` float16 / bfloat16 / float32 / float64, any strides, ``C >= 2``.
        ignore: optional ``B x H x W`` integer map, 255 = ignored pixel.
        valid: optional ``B x H x W`` bool mask, True = valid pixel (instead of ``ignore``).
        alpha: Gaussian width, ``w = exp(-(z_0^2 + z_1^2) / alpha)`` (8 = the authors' training setting).
        confidence: ``"prob"`` or ``"log"`` for the first feature; default: the rule's (``"prob"`` for ``"paper"``,
            ``"log"`` for ``"released"``).
        groups: ``"image"`` (one separation per image) or ``"class"`` (per image and pseudo-class).
        rule: ``"paper"`` (Algorithm 1: pixels above the reliable cluster's mean dispersion keep weight 1) or
            ``"released"`` (the authors' released code: residual variance over all C slots, pixels *below* the mean
            dispersion keep weight 1); docs/selection.md Sec. 2b.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.
        return_stats: also return the per-group :class:`PCOSStats`.

    Returns:
        :class:`PCOSResult` with ``weight`` (``B x H x W`` float32), ``label`` (int64), ``reliable`` (bool)
        and ``stats`` (None unless ``return_stats``). At an invalid pixel (ignored, or non-finite logits) ``label``
        is 0, a class id, and ``weight`` 0: a loss that reads ``label`` without ``weight`` must mask those pixels
        itself (e.g. ``label.masked_fill(ignore == 255, 255)`` for ``F.cross_entropy(..., ignore_index=255)``).
    """
    bsz, ncls = check_logits(logits)[:2]
    check_positive(alpha, "alpha")
    confidence = rule_confidence(rule, confidence)
    check_choice(groups, "groups", GROUP_MODES)
    check_flag(return_stats, "return_stats")
    mask = pixel_validity(logits, ignore, valid)
    args = (logits, mask, float(alpha), confidence == "log", groups == "class", rule == "released")
    _, impl = _measured.resolve("pcos_weights", backend, logits.device, logits, lambda fn: fn(*args),
                                variant=auto_variant(groups))
    out = impl(*args)
    stats = None
    if return_stats:
        lead = (bsz, ncls) if groups == "class" else (bsz,)
        stats = PCOSStats(
            mu=out.mu.reshape(*lead, 2, 2),
            var=out.var.reshape(*lead, 2, 2),
            count=out.count.reshape(*lead, 2),
            eigenvalues=out.eigenvalues.reshape(*lead, 2),
            chosen=out.chosen.reshape(lead),
            n_nonfinite=out.n_nonfinite,
        )
    return PCOSResult(out.weight, out.label, out.reliable, stats)
