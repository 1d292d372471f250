"""pcos_weights: every fused backend against the float64 reference, and the closed form against an SVD oracle.

Seeded random cases over sizes, C, dtypes, layouts, ignore masks, non-finite logits, alpha, confidence and groups;
adversarial cases (odd sizes and layouts, multi-chunk images, all-ignored and all-non-finite images, one class,
rank-one features, empty clusters); the closed-form assignment against ``torch.linalg.svd`` of the 2 x N feature
matrix; the low-precision rule; determinism; the custom op; bad input.

Where the math is well-conditioned the discrete outputs (label, count, chosen, reliable, n_nonfinite) must be equal.
A group is well-conditioned when the SVD oracle on the float64 features has ``s2 / s1`` and every pixel's assignment
margin well above what the feature rounding can move; a pixel's weight is compared unless the preservation test
``phi > mu`` is within feature rounding (then the weight may legitimately jump). Float32 features carry ~1e-7
relative rounding, so float32 statistics are held to 5e-5 of their scale (measured: <= 6e-6) and weights to their
sensitivity to the feature errors (measured: <= 3.3e-5, on a cluster with sd = 1e-4); float64 runs to ~1e-11.
"""

from __future__ import annotations

import decimal
import functools
import math
import random

import numpy as np
import pytest
import torch
from conftest import layout, masks, require_backend, spec_weight, spy_constexpr
from test_residual_features import (
    LAYOUTS,
    feature_tolerance,
    make_logits,
    residual_mass64,
    torch_low_precision,
    underflow_floor,
)

import csl_kernels
from csl_kernels._checks import valid_mask

OP = "pcos_weights"
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:index_reduce:UserWarning")]
EPS = 1e-8


def svd_assignment(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, group: torch.Tensor,
                   n_groups: int) -> dict[str, torch.Tensor]:
    """Clusters the way the authors' code finds them: a loop over groups, boolean indexing and ``torch.linalg.svd``
    of the 2 x N feature matrix, ``argmax_i |V[n, i]|`` (ties 0), float64; everything 0 in a rank-one group
    (``s2 <= 1e-12 s1``, or feature columns collinear: ``det G <= 1e-8 a c``, spec Sec. 2.3, with ``det G`` from the
    singular values, ``(s1 s2)^2``, which do not cancel). Also returns per group the singular values ``s``, left
    singular vectors ``u`` (G x 2 x 2, column i = u_i) and ``collinearity`` = ``det G / (a c)`` (1 without pixels)."""
    x, y = x.reshape(-1).double().cpu(), y.reshape(-1).double().cpu()
    keep, group = keep.reshape(-1).cpu(), group.reshape(-1).cpu()
    out = dict(cluster=torch.zeros_like(group), s=torch.zeros(n_groups, 2, dtype=torch.float64),
               u=torch.eye(2, dtype=torch.float64).repeat(n_groups, 1, 1),
               collinearity=torch.ones(n_groups, dtype=torch.float64))
    for g in range(n_groups):
        sel = keep & (group == g)
        if not sel.any():
            continue
        u, s, vh = torch.linalg.svd(torch.stack((x[sel], y[sel])), full_matrices=False)
        out["s"][g, : s.numel()] = s
        out["u"][g, :, : s.numel()] = u
        gram_ac = (x[sel] * x[sel]).sum() * (y[sel] * y[sel]).sum()
        if s.numel() == 2 and gram_ac > 0:
            out["collinearity"][g] = (s[0] * s[1]) ** 2 / gram_ac
        if s.numel() == 2 and s[1] > 1e-12 * s[0] and out["collinearity"][g] > 1e-8:
            out["cluster"][sel] = (vh[1].abs() > vh[0].abs()).long()
    return out


def cluster_stats(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, group: torch.Tensor, cluster: torch.Tensor,
                  n_groups: int, alpha: float, rule: str = "paper") -> dict[str, torch.Tensor]:
    """Spec steps 4-6 for a given assignment, float64: counts, means, unbiased variances, reliable cluster, weights
    (``rule="released"``: pixels below the mean dispersion keep weight 1, spec Sec. 2b)."""
    x, y = x.reshape(-1).double().cpu(), y.reshape(-1).double().cpu()
    keep, group, cluster = keep.reshape(-1).cpu(), group.reshape(-1).cpu(), cluster.reshape(-1).cpu()
    f64 = torch.float64
    slot = group * 2 + cluster
    count = torch.zeros(2 * n_groups, dtype=torch.long).index_add_(0, slot, keep.long())
    n = count.to(f64).clamp_min(1)
    sums = torch.zeros(2 * n_groups, 2, dtype=f64).index_add_(0, slot, torch.stack((x, y), dim=1) * keep[:, None])
    mu = sums / n[:, None]
    dev = (torch.stack((x, y), dim=1) - mu[slot]) * keep[:, None]
    m2 = torch.zeros(2 * n_groups, 2, dtype=f64).index_add_(0, slot, dev * dev)
    var = torch.where((count > 1)[:, None], m2 / (n - 1).clamp_min(1)[:, None], 0.0)
    mu, var, count = mu.view(n_groups, 2, 2), var.view(n_groups, 2, 2), count.view(n_groups, 2)
    chosen = ((count[:, 1] > 0) & ((count[:, 0] == 0) | (mu[:, 1, 0] > mu[:, 0, 0]))).long()
    rows = torch.arange(n_groups)
    m, v = mu[rows, chosen][group], var[rows, chosen][group]
    weight = spec_weight(x, y, m, v, alpha, rule)
    return dict(count=count, mu=mu, var=var, chosen=chosen, weight=torch.where(keep, weight, 0.0))


def svd_pcos(x, y, keep, group, n_groups: int, alpha: float) -> dict[str, torch.Tensor]:
    """The SVD oracle: :func:`svd_assignment` then :func:`cluster_stats`."""
    assignment = svd_assignment(x, y, keep, group, n_groups)
    return {**assignment, **cluster_stats(x, y, keep, group, assignment["cluster"], n_groups, alpha)}


def reference64(z, ign, **kwargs):
    ign = None if ign is None else ign.cpu()
    return csl_kernels.pcos_weights(z.detach().cpu().double(), **masks(ign), backend="reference", return_stats=True,
                                    **kwargs)


def keep_mask(z: torch.Tensor, ign) -> torch.Tensor:
    z = z.detach().cpu()
    finite = torch.isfinite(z).all(dim=1)
    valid = valid_mask(z, **masks(None if ign is None else ign.cpu()))
    return finite if valid is None else finite & valid


def pixel_groups(label: torch.Tensor, num_classes: int, groups: str) -> torch.Tensor:
    b = label.shape[0]
    image = torch.arange(b).view(b, 1, 1).expand_as(label)
    return image * num_classes + label if groups == "class" else image


def check_invariants(out, z: torch.Tensor, ign, groups: str) -> None:
    """Dtypes, shapes and the rules that hold whatever the numbers: never NaN, w in [0, 1], 0 off the valid pixels,
    reliable = (w == 1) & valid, and the per-group statistics of empty groups are 0."""
    b, c, h, w = z.shape
    lead = (b, c) if groups == "class" else (b,)
    assert out.weight.dtype == torch.float32 and out.weight.shape == (b, h, w)
    assert out.label.dtype == torch.long and out.label.shape == (b, h, w)
    assert out.reliable.dtype == torch.bool and out.reliable.shape == (b, h, w)
    st = out.stats
    for name, shape, dtype in (("mu", (*lead, 2, 2), torch.float64), ("var", (*lead, 2, 2), torch.float64),
                               ("count", (*lead, 2), torch.long), ("eigenvalues", (*lead, 2), torch.float64),
                               ("chosen", lead, torch.long), ("n_nonfinite", (b,), torch.long)):
        t = getattr(st, name)
        assert t.dtype == dtype and t.shape == shape, (name, t.dtype, t.shape)
        assert t.device == z.device
    weight = out.weight.cpu()
    keep = keep_mask(z, ign)
    assert not torch.isnan(weight).any()
    assert ((weight >= 0) & (weight <= 1)).all()
    assert torch.equal(weight[~keep], torch.zeros_like(weight[~keep]))
    assert torch.equal(out.reliable.cpu(), (weight == 1) & keep)
    assert torch.equal(out.label.cpu()[~keep], torch.zeros_like(out.label.cpu()[~keep]))
    count = st.count.cpu().reshape(-1, 2)
    assert count.sum() == keep.sum()
    assert ((st.var.cpu() >= 0).all() and (st.eigenvalues.cpu() >= 0).all()
            and (st.eigenvalues.cpu()[..., 0] >= st.eigenvalues.cpu()[..., 1]).all())
    empty = count == 0
    assert torch.equal(st.mu.cpu().reshape(-1, 2, 2)[empty], torch.zeros(int(empty.sum()), 2, dtype=torch.float64))
    assert (st.chosen.cpu().reshape(-1)[count[:, 1] == 0] == 0).all()  # an empty cluster is never chosen


MAX_AMBIGUOUS = 4  # ambiguous pixels per group resolved by trying every assignment of them


def assert_pcos_match(out, ref, z: torch.Tensor, ign, *, alpha: float, confidence: str | None, groups: str,
                      rule: str = "paper") -> None:
    """``out`` (a fused backend) and ``ref`` (the float64 reference on the same logits) against each other and
    against the SVD oracle run on the float64 reference features.

    A backend computes its features with the rounding of its dtype (bounded per pixel by ``feature_tolerance``), so
    a pixel whose cluster can flip within those bounds is *ambiguous*: for a group with a few ambiguous pixels the
    oracle tries every assignment of them and keeps the one that matches the backend's counts and means; the
    backend's statistics and weights must then match that assignment's. Groups with ``s2 / s1`` too small for the
    eigenvectors to be stable, or with many ambiguous pixels, are not compared (their eigenvalues still are).
    """
    check_invariants(out, z, ign, groups)
    check_invariants(ref, z.detach().cpu().double(), None if ign is None else ign.cpu(), groups)
    b, c = z.shape[:2]
    n_groups = b * c if groups == "class" else b
    assert torch.equal(out.label.cpu(), ref.label)
    assert torch.equal(out.stats.n_nonfinite.cpu(), ref.stats.n_nonfinite)
    f64 = torch.float64
    # Statistics: relative to the features' scale; float64 features agree to ~1e-16, float32 ones to ~1e-7.
    tol, ratio_min, rel_min, w_floor = (1e-11, 1e-5, 1e-8, 1e-12) if z.dtype == f64 else (5e-5, 1e-3, 1e-4, 1e-6)
    ign64 = None if ign is None else ign.cpu()
    f0, v, label = csl_kernels.residual_features(z.detach().cpu().double(), **masks(ign64), confidence=confidence,
                                                 rule=rule, backend="reference")
    keep = keep_mask(z, ign).reshape(-1)
    group = pixel_groups(label, c, groups).reshape(-1)
    x, y = f0.reshape(-1), v.reshape(-1)
    dx_err, dy_err = feature_tolerance(x, y, residual_mass64(z).reshape(-1), z.dtype)
    assignment = svd_assignment(x, y, keep, group, n_groups)
    oracle = cluster_stats(x, y, keep, group, assignment["cluster"], n_groups, alpha, rule)
    st, rs = out.stats, ref.stats
    rcount = rs.count.reshape(-1, 2)
    s1, s2 = assignment["s"][:, 0], assignment["s"][:, 1]
    scale_x = torch.zeros(n_groups, dtype=f64).index_reduce_(0, group, torch.where(keep, x.abs(), 0.0), "amax")
    scale_y = torch.zeros(n_groups, dtype=f64).index_reduce_(0, group, torch.where(keep, y.abs(), 0.0), "amax")
    n_pixels = oracle["count"].sum(dim=1)
    # One pixel, or v = 0 everywhere (C = 2: exactly rank one): every implementation puts it all in cluster 0.
    trivial = (n_pixels <= 1) | (scale_y == 0)
    # A group within a factor of 2 of the collinear cut (spec Sec. 2.3) goes either way by rounding.
    near_cut = (assignment["collinearity"] > 0.5e-8) & (assignment["collinearity"] < 2e-8)
    stable = trivial | ((s2 > ratio_min * s1) & ~near_cut)
    # The reference (same float64 features) agrees with the oracle wherever the eigenvectors are stable.
    assert torch.equal(rcount[stable], oracle["count"][stable])
    # Ambiguous pixels: the margin |u2.phi| s1 - |u1.phi| s2 is within what the feature errors can move, or the
    # relative margin between |V[n, 1]| and |V[n, 0]| is within what eigenvector rounding can move.
    u, s = assignment["u"][group], assignment["s"][group]
    p0, p1 = (u[:, 0, 0] * x + u[:, 1, 0] * y).abs(), (u[:, 0, 1] * x + u[:, 1, 1] * y).abs()
    slack = (s[:, 0] * (u[:, 0, 1].abs() * dx_err + u[:, 1, 1].abs() * dy_err)
             + s[:, 1] * (u[:, 0, 0].abs() * dx_err + u[:, 1, 0].abs() * dy_err))
    margin = p1 * s[:, 0] - p0 * s[:, 1]
    rel = margin.abs() / torch.maximum(p1 * s[:, 0], p0 * s[:, 1]).clamp_min(1e-300)
    ambiguous = keep & ~trivial[group] & ((margin.abs() <= 4 * slack) | (rel <= rel_min))
    cluster = assignment["cluster"].clone()
    checked = stable.clone()
    mu_out = st.mu.cpu().reshape(-1, 2, 2)
    for g in torch.nonzero(stable & (torch.zeros(n_groups, dtype=torch.long).index_add_(0, group, ambiguous.long())
                                     > 0)).flatten().tolist():
        idx = torch.nonzero(ambiguous & (group == g)).flatten()
        if idx.numel() > MAX_AMBIGUOUS:
            checked[g] = False
            continue
        best, best_err = None, float("inf")
        for bits in range(2 ** idx.numel()):
            trial = cluster.clone()
            trial[idx] = torch.tensor([(bits >> i) & 1 for i in range(idx.numel())])
            sel = group == g
            stats = cluster_stats(x[sel], y[sel], keep[sel], torch.zeros_like(group[sel]), trial[sel], 1, alpha,
                                  rule)
            if torch.equal(stats["count"][0], st.count.cpu().reshape(-1, 2)[g]):
                err = (stats["mu"][0] - mu_out[g]).abs().sum().item()
                if err < best_err:
                    best, best_err = trial, err
        # No assignment of the ambiguous pixels gives the backend's counts: its clustering is wrong.
        assert best is not None, (f"group {g}: counts {st.count.cpu().reshape(-1, 2)[g].tolist()} match no "
                                  f"assignment of its {idx.numel()} ambiguous pixels")
        cluster = best
    if keep.sum() >= 30:  # tiny images are often ill-conditioned; larger ones must mostly be checked
        assert checked[group][keep].float().mean() >= 0.5, "too few checked pixels: the case checks little"
    expected = cluster_stats(x, y, keep, group, cluster, n_groups, alpha, rule)
    # Eigenvalues: always comparable (they are smooth in the features).
    lam, rlam = st.eigenvalues.cpu().reshape(-1, 2), rs.eigenvalues.reshape(-1, 2)
    assert ((lam - rlam).abs() <= tol * rlam[:, :1] + 1e-300).all(), (lam - rlam).abs().max()
    # Checked groups: equal counts and chosen cluster, close means and variances.
    assert torch.equal(st.count.cpu().reshape(-1, 2)[checked], expected["count"][checked])
    mu, emu = mu_out[checked], expected["mu"][checked]
    var, evar = st.var.cpu().reshape(-1, 2, 2)[checked], expected["var"][checked]
    scale = torch.stack((scale_x, scale_y), dim=-1)[checked].unsqueeze(1)  # G x 1 x 2
    mu_err = (mu - emu).abs()
    assert (mu_err <= tol * scale + underflow_floor(z.dtype)).all(), (mu_err / scale.clamp_min(1e-300)).max()
    # A variance moves by ~2 sd * (feature error) + (feature error)^2 when the features are rounded.
    var_tol = tol * (evar + scale * evar.sqrt() + 1e-4 * scale * scale) + 1e-300
    assert ((var - evar).abs() <= var_tol).all(), ((var - evar).abs() / var_tol).max()
    gap = (emu[:, 1, 0] - emu[:, 0, 0]).abs() > 10 * tol * scale[:, 0, 0]
    assert torch.equal(st.chosen.cpu().reshape(-1)[checked][gap], expected["chosen"][checked][gap])
    # Weights of the checked groups, except where the preservation test phi > mu is within rounding: mu* moves by
    # at most the mean feature error of its cluster. (v = 0 everywhere in a group is exact: no border there.)
    rows = torch.arange(n_groups)
    chosen = expected["chosen"]
    mu_star = expected["mu"][rows, chosen][group]
    var_star = expected["var"][rows, chosen][group]
    dx, dy = x - mu_star[:, 0], y - mu_star[:, 1]
    w_open = torch.exp(-(dx * dx / (var_star[:, 0] + EPS) + dy * dy / (var_star[:, 1] + EPS)) / alpha)
    slot = group * 2 + cluster
    n_slot = torch.zeros(2 * n_groups, dtype=f64).index_add_(0, slot, keep.double()).clamp_min(1)
    mu_dx = torch.zeros(2 * n_groups, dtype=f64).index_add_(0, slot, dx_err * keep) / n_slot
    mu_dy = torch.zeros(2 * n_groups, dtype=f64).index_add_(0, slot, dy_err * keep) / n_slot
    star = group * 2 + chosen[group]
    border = ((dx.abs() <= 2 * (dx_err + mu_dx[star]))
              | ((dy.abs() <= 2 * (dy_err + mu_dy[star])) & (scale_y[group] > 0)))
    border &= keep & (w_open < 1 - 1e-6)
    compare = keep & ~border & checked[group]
    if keep.sum() >= 30:
        assert compare.sum() >= 0.5 * keep.sum(), "too few compared weights: the case checks little"
    # A weight moves with the feature errors of the pixel and of mu*, amplified by |z| (1 + |z|) / sd: near-certain
    # clusters have sd ~ sqrt(eps) = 1e-4, where one float32 ulp of f0 near 1 moves z by 6e-4.
    sd_x, sd_y = (var_star[:, 0] + EPS).sqrt(), (var_star[:, 1] + EPS).sqrt()
    z0, z1 = dx.abs() / sd_x, dy.abs() / sd_y
    spread = z0 * (1 + z0) * (dx_err + mu_dx[star]) / sd_x + z1 * (1 + z1) * (dy_err + mu_dy[star]) / sd_y
    w_tol = w_floor + 8 * w_open * spread / alpha
    weight = out.weight.cpu().reshape(-1).double()
    err = (weight - expected["weight"].float().double()).abs()
    assert (err <= w_tol)[compare].all(), (err / w_tol)[compare].max()
    assert torch.equal(out.reliable.cpu().reshape(-1)[compare], (expected["weight"].float() == 1)[compare])
    # The reference itself against the oracle (same features: no ambiguity at this scale).
    ref_err = (ref.weight.reshape(-1).double() - oracle["weight"].float().double()).abs()[stable[group]]
    assert (ref_err <= 1e-6).all(), ref_err.max()


RANDOM_SEEDS = range(110)


def random_case(seed: int, device):
    rng = random.Random(seed)
    classes = rng.choice((2, 3, 8, 11, 21, 21, 40, 150))  # class tiles of 2-32; 11: CamVid
    side = 5 if classes == 150 else 12
    dtype = rng.choice((torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16))
    scale = rng.choice((0.3, 1.0, 3.0, 10.0))
    case = dict(batch=rng.randint(1, 3), classes=classes, height=rng.randint(1, side), width=rng.randint(1, side),
                dtype=dtype, scale=min(scale, 3.0) if dtype == torch.float16 else scale,
                ignore=rng.choice(("none", "bool", "int64", "uint8")), p_ignore=rng.choice((0.0, 0.2, 0.7)),
                p_nonfinite=rng.choice((0.0, 0.0, 0.1)), kind=rng.choice(LAYOUTS), device=device)
    options = dict(alpha=rng.choice((1.0, 3.7, 8.0, 64.0)), confidence=rng.choice(("prob", "log")),
                   groups=rng.choice(("image", "image", "class")))
    return make_logits(seed, **case), options


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_cases_match_float64_reference(fused_backend, seed):
    device = require_backend(OP, fused_backend)
    (z, ign), options = random_case(seed, device)
    out = csl_kernels.pcos_weights(z, **masks(ign), backend=fused_backend, return_stats=True, **options)
    assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)


@pytest.mark.parametrize("groups", ["image", "class"])
@pytest.mark.parametrize(
    ("shape", "kind"),
    [(s, k) for s in [(1, 2, 1, 1), (2, 21, 1, 1), (1, 3, 7, 13), (2, 21, 7, 13), (1, 150, 7, 13), (1, 300, 3, 5)]
     for k in ("contiguous", "channels_last", "transposed", "class_slice")]
    + [((1, 5, 65, 129), "contiguous"), ((1, 21, 65, 129), "channels_last")],
)
def test_odd_sizes_and_layouts(fused_backend, shape, kind, groups):
    """Includes multi-chunk images (65 x 129 = 9 chunks of partial sums merged per group)."""
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, ign = make_logits(sum(shape), batch=b, classes=c, height=h, width=w, ignore="int64", kind=kind, device=device)
    options = dict(alpha=8.0, confidence="prob" if h % 2 else "log", groups=groups)
    out = csl_kernels.pcos_weights(z, **masks(ign), backend=fused_backend, return_stats=True, **options)
    assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)


@pytest.mark.parametrize("groups", ["image", "class"])
def test_triton_int64_offsets_path(monkeypatch, groups):
    """Images of >= 2^31 elements switch the feature pass to int64 offsets (it read int32 offsets before, which wrap
    there); forced here on small inputs of every layout."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import pcos_weights as module

    monkeypatch.setattr(module, "wide", lambda *tensors, **kwargs: True)
    launched = spy_constexpr(monkeypatch, module, "_pcos_features_kernel", "WIDE")
    for kind in ("contiguous", "channels_last", "transposed", "class_slice"):
        z, ign = make_logits(5, batch=2, classes=21, height=7, width=13, ignore="int64", kind=kind, device=device)
        options = dict(alpha=8.0, confidence="prob", groups=groups)
        out = csl_kernels.pcos_weights(z, **masks(ign), backend="triton", return_stats=True, **options)
        assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)
    assert launched == [True] * 4


@pytest.mark.parametrize("groups", ["image", "class"])
def test_all_ignored_and_all_non_finite_images(fused_backend, groups):
    device = require_backend(OP, fused_backend)
    z, _ = make_logits(7, batch=3, classes=6, height=5, width=4, device=device)
    valid = torch.ones(3, 5, 4, dtype=torch.bool, device=device)
    valid[1] = False  # image 1: every pixel ignored
    z[2, 3] = float("nan")  # image 2: every pixel non-finite
    z[2, 0, 0, 0] = float("inf")
    out = csl_kernels.pcos_weights(z, valid=valid, groups=groups, backend=fused_backend, return_stats=True)
    ref = reference64(z, valid, groups=groups)
    options = dict(alpha=8.0, confidence="prob", groups=groups)
    assert_pcos_match(out, ref, z, valid, **options)
    assert out.stats.n_nonfinite.cpu().tolist() == [0, 0, 20]
    for t in (out.weight, out.reliable.float(), out.label.float()):
        assert not t[1:].cpu().any()
    st = out.stats
    for t in (st.mu, st.var, st.count, st.eigenvalues, st.chosen):
        assert not t[1:].cpu().any()
    assert out.reliable[0].any()


@pytest.mark.parametrize("groups", ["image", "class"])
@pytest.mark.parametrize("confidence", ["prob", "log"])
def test_one_class_images(fused_backend, groups, confidence):
    """Every pixel has the same pseudo-label: with class groups all other groups are empty."""
    device = require_backend(OP, fused_backend)
    z, ign = make_logits(8, batch=2, classes=21, height=6, width=7, scale=1.0, ignore="bool", device=device)
    g = torch.Generator().manual_seed(8)
    z[:, 4] = z.amax(dim=1) + 0.5 + 3 * torch.rand(2, 6, 7, generator=g).to(device)  # class 4 wins every pixel
    options = dict(alpha=8.0, confidence=confidence, groups=groups)
    out = csl_kernels.pcos_weights(z, **masks(ign), backend=fused_backend, return_stats=True, **options)
    assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)
    keep = keep_mask(z, ign)
    assert (out.label.cpu()[keep] == 4).all()
    if groups == "class":
        count = out.stats.count.cpu()
        assert torch.equal(count.sum(dim=-1)[:, 4], keep.sum(dim=(1, 2)))
        assert count.sum() == count[:, 4].sum()


@pytest.mark.parametrize("classes", [2, 21, 150])
@pytest.mark.parametrize("groups", ["image", "class"])
def test_non_finite_logits_never_poison_the_image(fused_backend, classes, groups):
    """NaN / +inf / -inf pixels are invalid and counted (ignored ones too); the rest of the result is bitwise the
    same as with those pixels ignored."""
    device = require_backend(OP, fused_backend)
    z, ign = make_logits(classes, batch=2, classes=classes, height=4, width=6, ignore="bool", p_ignore=0.2,
                         p_nonfinite=0.25, device=device)
    z[0, :, 0, 0] = float("-inf")
    z[0, 0, 0, 1] = float("nan")
    z[1, classes - 1, 3, 5] = float("inf")
    bad = ~torch.isfinite(z).all(dim=1)
    options = dict(alpha=8.0, confidence="prob", groups=groups)
    out = csl_kernels.pcos_weights(z, **masks(ign), backend=fused_backend, return_stats=True, **options)
    assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)
    assert torch.equal(out.stats.n_nonfinite.cpu(), bad.sum(dim=(1, 2)).cpu())
    assert not out.weight[bad].any()
    clean = torch.where(bad.unsqueeze(1), torch.zeros((), dtype=z.dtype, device=device), z)
    out_clean = csl_kernels.pcos_weights(clean, valid=ign & ~bad, backend=fused_backend, return_stats=True, **options)
    for a, b in zip((*out[:3], *out.stats[:5]), (*out_clean[:3], *out_clean.stats[:5]), strict=True):
        assert torch.equal(a, b)


def test_non_finite_pixels_are_counted_per_image_in_multi_chunk_images(fused_backend):
    """Images of more than one 4096-pixel chunk (65 x 65): n_nonfinite counts each image's own non-finite pixels,
    those past its first chunk included."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 2, 65, 65, generator=g)
    z[0, 1, 64, 60:] = float("nan")  # image 0, past its first 4096 pixels
    z[1, 0, 0, :2] = float("inf")
    for groups in ("image", "class"):
        out = csl_kernels.pcos_weights(z.to(device), groups=groups, backend=fused_backend, return_stats=True)
        assert out.stats.n_nonfinite.cpu().tolist() == [5, 2]


@pytest.mark.parametrize("confidence", ["prob", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_one_features(fused_backend, confidence, dtype):
    """Identical pixels, and C = 2 (v = 0 everywhere): every pixel in cluster 0, cluster 1 empty and never chosen
    (even with log confidence, where its zero mean would beat the negative mean of cluster 0)."""
    device = require_backend(OP, fused_backend)
    z = torch.tensor([0.3, 2.0, -1.0, 0.7], dtype=dtype).view(1, 4, 1, 1).expand(2, 4, 5, 6).to(device)
    valid = torch.ones(2, 5, 6, dtype=torch.bool, device=device)
    valid[1, :2] = False
    for groups in ("image", "class"):
        out = csl_kernels.pcos_weights(z, valid=valid, confidence=confidence, groups=groups, backend=fused_backend,
                                       return_stats=True)
        check_invariants(out, z, valid, groups)
        count = out.stats.count.cpu().reshape(-1, 2)
        assert count[:, 1].sum() == 0 and count[:, 0].sum() == 30 + 18
        assert torch.equal(out.reliable.cpu(), valid.cpu())  # phi == mu: z = 0, w = 1
        assert (out.stats.chosen == 0).all()
    z2, ign = make_logits(3, batch=2, classes=2, height=5, width=7, dtype=dtype, ignore="int64", device=device)
    out = csl_kernels.pcos_weights(z2, **masks(ign), confidence=confidence, backend=fused_backend, return_stats=True)
    ref = reference64(z2, ign, confidence=confidence)
    assert_pcos_match(out, ref, z2, ign, alpha=8.0, confidence=confidence, groups="image")
    st = out.stats
    assert (st.eigenvalues[:, 1] == 0).all() and (st.count[:, 1] == 0).all() and (st.chosen == 0).all()
    assert (st.mu[:, 1] == 0).all()
    if confidence == "log":
        assert (st.mu[:, 0, 0] < 0).all()


@pytest.mark.parametrize("groups", ["image", "class"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_saturated_pixel_at_the_feature_origin_is_in_cluster_0(fused_backend, dtype, groups):
    """Log confidence: a pixel whose winning logit is 1000 above the others has p_max = 1 exactly, so phi = (0, 0) and
    |V[n, 0]| = |V[n, 1]| = 0, a tie that goes to cluster 0 (spec: argmax, ties 0) in a group that is not rank one.
    The harness of assert_pcos_match lets an ambiguous pixel go either way, so the counts are compared exactly here."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(2, 3, 5, 6, generator=g) * 2).to(dtype)
    z[:, 0, 0, :4] = 1000.0  # class 0 saturated (exp(-1000) = 0 in float64 too): f0 = -log1p(0) = 0, v = 0
    z[:, 1, 4, 2:] = 1000.0  # class 1 saturated
    options = dict(alpha=8.0, confidence="log", groups=groups)
    out = csl_kernels.pcos_weights(z.to(device), backend=fused_backend, return_stats=True, **options)
    ref = reference64(z, None, **options)
    f0, v, _ = csl_kernels.residual_features(z.double(), confidence="log", backend="reference")
    assert ((f0 == 0) & (v == 0)).sum() == 2 * 8
    eig, n = ref.stats.eigenvalues.reshape(-1, 2), ref.stats.count.reshape(-1, 2).sum(dim=1)
    assert (eig[n > 3, 1] > 1e-6 * eig[n > 3, 0]).all()  # the groups with pixels are not rank one
    assert torch.equal(out.stats.count.cpu(), ref.stats.count)
    assert torch.equal(out.stats.chosen.cpu(), ref.stats.chosen)
    torch.testing.assert_close(out.stats.mu.cpu(), ref.stats.mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_identical_pixels_identical_features_one_cluster(backend, dtype):
    """Constant images in the low-precision dtypes, widths off the vector widths: every pixel gets the same features
    bit for bit, whatever its position (a reduction whose order depends on it gives features a last bit apart, which
    leaves the features rank two and splits identical pixels into two clusters), so all are in cluster 0."""
    device = require_backend(OP, backend)
    for classes, width in ((3, 6), (21, 7), (150, 17)):
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            z = (3 * torch.randn(1, classes, 1, 1, generator=gen)).to(dtype).expand(2, classes, 3, width)
            z = z.contiguous().to(device)
            feats = csl_kernels.residual_features(z, backend=backend)
            assert feats.f0.unique().numel() == 1 and feats.v.unique().numel() == 1, (classes, width, seed)
            out = csl_kernels.pcos_weights(z, backend=backend, return_stats=True)
            assert (out.stats.count[:, 1] == 0).all() and (out.stats.count[:, 0] == 3 * width).all()
            assert out.reliable.all(), (classes, width, seed)  # phi == mu: weight 1


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
@pytest.mark.parametrize("groups", ["image", "class"])
def test_closed_form_assignment_equals_svd(backend, groups):
    """On well-conditioned inputs the closed-form 2 x 2 eigen-decomposition assigns every pixel exactly as the SVD
    of the 2 x N feature matrix does (supplementary C.1): same clusters, hence equal counts and means."""
    device = require_backend(OP, backend)
    g = torch.Generator().manual_seed(21)
    z = torch.randn(2, 5, 9, 10, generator=g, dtype=torch.float64) * 2.0
    z[:, 1] += 1.5  # a dominant class: a confident and an uncertain population
    z = z.to(device)
    f0, v, label = csl_kernels.residual_features(z.cpu(), backend="reference")
    keep = torch.ones_like(label, dtype=torch.bool)
    n_groups = 10 if groups == "class" else 2
    oracle = svd_pcos(f0, v, keep, pixel_groups(label, 5, groups), n_groups, 8.0)
    populated = oracle["count"].sum(dim=1) > 1
    assert populated.sum() >= 2
    ratio = oracle["s"][:, 1] / oracle["s"][:, 0].clamp_min(1e-300)
    assert (ratio[populated] > 1e-3).all()
    assert (oracle["count"][populated] > 0).all(dim=1).any()  # both clusters occur
    out = csl_kernels.pcos_weights(z, groups=groups, backend=backend, return_stats=True)
    st = out.stats
    assert torch.equal(st.count.cpu().reshape(-1, 2), oracle["count"])
    torch.testing.assert_close(st.mu.cpu().reshape(-1, 2, 2), oracle["mu"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.var.cpu().reshape(-1, 2, 2), oracle["var"], rtol=1e-9, atol=1e-14)
    assert torch.equal(st.chosen.cpu().reshape(-1), oracle["chosen"])
    torch.testing.assert_close(out.weight.cpu().double().reshape(-1), oracle["weight"].float().double(),
                               rtol=0, atol=1e-6)
    s = torch.linalg.svdvals(torch.stack((f0.reshape(2, -1), v.reshape(2, -1)), dim=1))  # image groups only
    if groups == "image":
        torch.testing.assert_close(st.eigenvalues.cpu(), s * s, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda"])
def test_statistics_of_float32_features_are_float64(backend):
    """All statistics are float64, also for float32 logits, whose features are float32: the cluster means and
    variances equal the float64 SVD oracle's on the backend's own features to float64 rounding, far below the
    rounding of float32 sums."""
    device = require_backend(OP, backend)
    g = torch.Generator().manual_seed(21)
    z = torch.randn(2, 5, 9, 10, generator=g, dtype=torch.float64) * 2.0
    z[:, 1] += 1.5  # a dominant class: a confident and an uncertain population
    z = z.float().to(device)
    f0, v, label = (t.cpu() for t in csl_kernels.residual_features(z, backend=backend))
    assert f0.dtype == torch.float32
    keep = torch.ones_like(label, dtype=torch.bool)
    oracle = svd_pcos(f0.double(), v.double(), keep, pixel_groups(label, 5, "image"), 2, 8.0)
    assert (oracle["count"] > 1).all()
    st = csl_kernels.pcos_weights(z, backend=backend, return_stats=True).stats
    assert torch.equal(st.count.cpu(), oracle["count"])
    torch.testing.assert_close(st.mu.cpu(), oracle["mu"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(st.var.cpu(), oracle["var"], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
@pytest.mark.parametrize(("spread", "ratios", "expected"), [
    (2e-3, (1e-12, 1e-6), None),  # s2 / s1 ~ 6e-8: split with a clear margin, the counts of the argmax |V| rule
    (2e-5, (1e-12, 1e-11), [55, 9]),  # ~6.4e-12, 6x above the cut: split (as torch.linalg.svd splits them)
    (5e-6, (1e-13, 1e-12), [64, 0]),  # ~4e-13, below it: rank one, every pixel in cluster 0
])
def test_pcos_rank_one_cut_is_1e_12_of_s1(backend, spread, ratios, expected):
    """Spec Sec. 2.3: with feature columns far from collinear, every pixel goes to cluster 0 only when
    s2 <= 1e-12 * s1. Pixels whose logits (a, d, 0) have a
    tiny residual imbalance d lie close to a line through the origin but are not rank one unless d is small enough:
    the spread of d puts s2 / s1 on either side of the cut, and near it by a factor of about 6."""
    device = require_backend(OP, backend)
    g = torch.Generator().manual_seed(0)
    n = 64
    z = torch.zeros(1, 3, 1, n, dtype=torch.float64)
    z[0, 0, 0] = 0.5 + 3 * torch.rand(n, generator=g, dtype=torch.float64)
    z[0, 1, 0] = spread * torch.rand(n, generator=g, dtype=torch.float64)
    f0, v, _ = csl_kernels.residual_features(z, backend="reference")
    _, s, vh = torch.linalg.svd(torch.stack((f0.reshape(-1), v.reshape(-1))), full_matrices=False)
    assert ratios[0] < s[1] / s[0] < ratios[1]
    if expected is None:  # the split torch.linalg.svd's vectors give (torch.linalg.svd of the 2 x N float64 features)
        cluster = (vh[1].abs() > vh[0].abs()).long()
        expected = [int((cluster == 0).sum()), int((cluster == 1).sum())]
        assert expected[1] > 0
    out = csl_kernels.pcos_weights(z.to(device), backend=backend, return_stats=True)
    assert out.stats.count.cpu().tolist() == [expected]


def _column_collinearity(f0: torch.Tensor, v: torch.Tensor) -> float:
    """(a c - b^2) / (a c) of the group's uncentred Gram matrix: the squared sine of the angle between its f0 and v
    columns (0: collinear, spec Sec. 2.3)."""
    x, y = f0.double().reshape(-1), v.double().reshape(-1)
    a, b, c = (x * x).sum(), (x * y).sum(), (y * y).sum()
    return float((a * c - b * b) / (a * c))


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
@pytest.mark.parametrize(("collinearity", "expected"), [(3e-8, [1, 1]), (3e-9, [2, 0])])
def test_pcos_collinear_feature_columns_are_rank_one(backend, collinearity, expected):
    """Spec Sec. 2.3: a group is rank one too when a c - b^2 <= 1e-8 a c. Two float64 pixels whose logits differ by a
    step sized to put that ratio 3x above the cut split into one pixel per cluster (the argmax |V| rule of any 2 x 2
    orthogonal V); 3x under it, both go to cluster 0 (the s2 <= 1e-12 s1 cut alone would split them: s2 / s1 ~ 5e-5)."""
    device = require_backend(OP, backend)
    g = torch.Generator().manual_seed(3)
    base = 2 * torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64)
    step = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64)

    def pair(size: float) -> torch.Tensor:
        return torch.cat((base, base + size * step), dim=3)

    def collinearity_of(size: float) -> float:
        f0, v, _ = csl_kernels.residual_features(pair(size), backend="reference")
        return _column_collinearity(f0, v)

    size = 1e-3 * math.sqrt(collinearity / collinearity_of(1e-3))  # the ratio grows as the step squared
    z = pair(size)
    assert collinearity / 1.01 < collinearity_of(size) < collinearity * 1.01
    st = csl_kernels.pcos_weights(z.to(device), backend=backend, return_stats=True).stats
    assert st.count.cpu().tolist() == [expected]
    assert st.eigenvalues[0, 1] > 1e-18 * st.eigenvalues[0, 0]  # not rank one by the singular-value cut


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
@pytest.mark.parametrize("confidence", ["prob", "log"])
def test_pixels_a_float32_rounding_apart_are_one_cluster_in_every_backend(backend, confidence):
    """Three float32 pixels whose logits differ by ~1e-6 (a few units in the last place: their features lie on one
    line through the origin to within what float32 resolves) are one cluster in every backend. Split by the singular
    values alone, their s2 / s1 (~1e-7) came from each backend's last-bit rounding of the features and sums, and the
    backends split a third of such groups differently."""
    device = require_backend(OP, backend)
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        classes = (3, 5, 21)[seed % 3]
        base = 2 * torch.randn(1, classes, 1, 1, generator=g)
        z = base.expand(1, classes, 1, 3) + 1e-6 * torch.randn(1, classes, 1, 3, generator=g)
        f0, v, _ = csl_kernels.residual_features(z, confidence=confidence, backend="reference")
        assert 0 < _column_collinearity(f0, v) < 1e-9
        for groups in ("image", "class"):
            st = csl_kernels.pcos_weights(z.to(device), confidence=confidence, groups=groups, backend=backend,
                                          return_stats=True).stats
            count = st.count.cpu().reshape(-1, 2)
            assert count[:, 1].sum() == 0 and count[:, 0].sum() == 3, (seed, groups, count.tolist())


def _exp_far_from_a_midpoint(x: float) -> float | None:
    """exp(x) rounded to nearest, where the exact value lies within a tenth of a unit in the last place of it (so at
    least 0.9 units from either neighbour) and math.exp agrees; else None. CUDA's double exp (also Triton's libdevice
    one) is not correctly rounded: an exact value near a rounding midpoint may round the other way there."""
    exact = decimal.Decimal(x).exp(decimal.Context(prec=60))
    nearest = float(exact)
    if math.exp(x) != nearest:
        return None
    off = (exact - decimal.Decimal(nearest)) / decimal.Decimal(math.ulp(nearest))
    return nearest if abs(off) <= 0.1 else None


def _tied_confidence_logits() -> torch.Tensor:
    """C = 3 float64 logits (0, a, b) with exp(a) + exp(b) == 1 exactly: pmax = 1 / (1 + 1) = 0.5 exactly at every
    pixel, while the residual dispersion differs from pixel to pixel. Both exponentials lie far from a rounding
    midpoint (``_exp_far_from_a_midpoint``) and the softmax sum is 2 in any order of adding them, so the tie holds
    with a GPU's exp and reduction order too, not only with glibc's."""
    pairs = []
    for i in range(12):
        for j in range(2000):  # the first e near 0.02 + 0.0371 i whose pair qualifies
            a = math.log(0.02 + 0.0371 * i + 1e-4 * j)
            b = math.log1p(-math.exp(a))
            ea, eb = _exp_far_from_a_midpoint(a), _exp_far_from_a_midpoint(b)
            if ea is not None and eb is not None and ea + eb == 1.0 and 1.0 + ea + eb == 1.0 + eb + ea == 2.0:
                pairs.append((a, b))
                break
    assert len(pairs) == 12
    z = torch.zeros(1, 3, 1, len(pairs), dtype=torch.float64)
    z[0, 1, 0] = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    z[0, 2, 0] = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    return z


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
def test_pcos_tied_cluster_means_choose_cluster_0_and_a_pixel_at_the_mean_is_not_preserved(backend):
    """Spec Sec. 2.5: c* = argmax_c mu_c[0], ties: 0. Sec. 2.6: weight 1 only if phi[0] > mu[0] (strictly) or
    phi[1] > mu[1]; a pixel exactly at the mean confidence gets the Gaussian weight."""
    device = require_backend(OP, backend)
    z = _tied_confidence_logits()
    out = csl_kernels.pcos_weights(z.to(device), backend=backend, return_stats=True)
    st = out.stats
    count, mu, var = st.count.cpu()[0], st.mu.cpu()[0], st.var.cpu()[0]
    assert (count > 0).all() and mu[0, 0] == mu[1, 0] == 0.5  # two clusters, the same mean confidence
    assert st.chosen.cpu().tolist() == [0]
    f0, v, _ = csl_kernels.residual_features(z, backend="reference")
    x, y = f0.reshape(-1), v.reshape(-1)
    assert (x == 0.5).all()
    expected = spec_weight(x, y, mu[0], var[0])
    assert (expected < 1).sum() >= 3
    torch.testing.assert_close(out.weight.cpu().reshape(-1).double(), expected, rtol=1e-6, atol=1e-7)


@functools.cache
def _dispersion_tie_images(rule: str, n_images: int = 60) -> torch.Tensor:
    """C = 3 images of 18 pixels: 8 copies of pixel A, 8 of pixel B, 2 of a low-confidence pixel D. A and B have the
    same float32 residual dispersion under ``rule`` on the reference backend and different confidences (pairs found
    among 200000 random logits). A and B make one cluster, D the other. A backend whose own arithmetic rounds A's and
    B's dispersions apart breaks the tie in some images; the test reads from each backend's statistics which kept it."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    candidates = torch.zeros(1, 3, 1, n)
    candidates[0, 1, 0] = -2.0 - 0.5 * torch.rand(n, generator=g)
    candidates[0, 2, 0] = -2.5 - 3.0 * torch.rand(n, generator=g)
    f0, v, _ = csl_kernels.residual_features(candidates, rule=rule, backend="reference")
    x, y = f0.reshape(-1), v.reshape(-1)
    order = torch.argsort(y, stable=True)
    tied = torch.nonzero((y[order][1:] == y[order][:-1]) & (x[order][1:] != x[order][:-1])).reshape(-1)[:n_images]
    assert len(tied) == n_images
    z = torch.zeros(n_images, 3, 1, 18)
    z[:, :, 0, :8] = candidates[0, :, 0, order[tied]].T.unsqueeze(-1)
    z[:, :, 0, 8:16] = candidates[0, :, 0, order[tied + 1]].T.unsqueeze(-1)
    z[:, :, 0, 16:] = torch.tensor([0.0, -0.2, -0.3]).view(1, 3, 1)
    return z


@pytest.mark.parametrize("rule", ["paper", "released"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
def test_a_pixel_at_the_mean_dispersion_is_not_preserved(backend, rule):
    """Spec Sec. 2.6 / 2b: the dispersion preserves a pixel only strictly above (paper) or below (released) the
    reliable cluster's mean. In a cluster whose pixels all have the same dispersion (its variance exactly 0) the half
    below the mean confidence gets the Gaussian weight exp(-z_0^2 / 8), with z_1 = 0, not 1."""
    device = require_backend(OP, backend)
    z = _dispersion_tie_images(rule)
    out = csl_kernels.pcos_weights(z.to(device), rule=rule, backend=backend, return_stats=True)
    st = out.stats
    images = torch.arange(z.shape[0])
    chosen = st.chosen.cpu()
    count, var = st.count.cpu()[images, chosen], st.var.cpu()[images, chosen]
    assert (count == 16).all()  # A and B are the reliable cluster, D the other
    tie = (var[:, 1] == 0) & (var[:, 0] > 0)
    assert tie.sum() >= 3, f"{int(tie.sum())} of {z.shape[0]} images kept the tie on {backend}"
    weight = out.weight.cpu()[tie, 0, :16]
    a, b = weight[:, 0], weight[:, 8]
    assert (weight[:, :8] == a[:, None]).all() and (weight[:, 8:] == b[:, None]).all()
    # One of A and B lies above the mean confidence (weight 1), the other as far below it: with 8 + 8 pixels,
    # (x - mu_0)^2 = 15 / 16 of the unbiased variance.
    assert ((a == 1) != (b == 1)).all()
    z0_squared = 15 / 16 * var[tie, 0] / (var[tie, 0] + 1e-8)
    torch.testing.assert_close(torch.minimum(a, b).double(), torch.exp(-z0_squared / 8), rtol=1e-6, atol=0)
    assert (torch.minimum(a, b) < 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(6))
def test_low_precision_error_at_most_twice_pytorch(fused_backend, dtype, seed):
    """Weight error (vs the float64 reference) <= 2x that of PCOS on PyTorch's own features in that dtype: the mean
    over the pixels, the largest one and the 99th percentile; image and class groups, with and without ignored
    pixels. (C = 150 with class groups is left out: 42 pixels in 150 groups are one-pixel groups, weight 1 in every
    dtype.)"""
    device = require_backend(OP, fused_backend)
    classes, groups, p_ignore = ((2, "image", 0.0), (21, "class", 0.0), (150, "image", 0.0), (21, "image", 0.3),
                                 (2, "class", 0.3), (21, "class", 0.3))[seed]
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(2, classes, 6, 7, generator=g) * 2).to(dtype)
    valid = torch.rand(2, 6, 7, generator=g) >= p_ignore
    out = csl_kernels.pcos_weights(z.to(device), valid=valid.to(device), groups=groups, backend=fused_backend)
    ref = reference64(z, valid, groups=groups)
    f0, v = torch_low_precision(z, "prob")
    label = ref.label
    n_groups = 2 * classes if groups == "class" else 2
    oracle = svd_pcos(f0.double().reshape(-1), v.double().reshape(-1), valid.reshape(-1),
                      pixel_groups(label, classes, groups).reshape(-1), n_groups, 8.0)
    err = (out.weight.cpu().double() - ref.weight.double()).abs().reshape(-1)
    torch_err = (oracle["weight"] - ref.weight.double().reshape(-1)).abs()
    assert torch_err.max() > 0  # the yardstick measures something
    assert err.mean() <= 2 * torch_err.mean(), (err.mean(), torch_err.mean())
    assert err.max() <= 2 * torch_err.max(), (err.max(), torch_err.max())
    # and the tail below the largest error, which one pixel of PyTorch's alone can make large (bf16, C = 150: 0.47)
    assert err.quantile(0.99) <= 2 * torch_err.quantile(0.99), (err.quantile(0.99), torch_err.quantile(0.99))


@pytest.mark.parametrize(("shape", "groups"), [((2, 21, 33, 65), "image"), ((2, 21, 17, 65), "class"),
                                               ((1, 150, 9, 11), "class")])
def test_bitwise_deterministic(fused_backend, shape, groups):
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, ign = make_logits(5, batch=b, classes=c, height=h, width=w, ignore="bool", p_nonfinite=0.02, device=device)
    first = csl_kernels.pcos_weights(z, **masks(ign), groups=groups, backend=fused_backend, return_stats=True)
    second = csl_kernels.pcos_weights(z, **masks(ign), groups=groups, backend=fused_backend, return_stats=True)
    for a, b_ in zip((*first[:3], *first.stats), (*second[:3], *second.stats), strict=True):
        assert torch.equal(a, b_)


def test_triton_feature_pass_goes_wide_where_its_last_chunk_passes_int32():
    """The feature pass's pixel index runs to the end of the last chunk, up to a chunk past the image: class groups
    of class-broadcast logits with 46340^2 pixels (below the int32 limit, spanning little) reach 2^31 there, and an
    int32 index would wrap to a negative pixel that passes ``p < HW``. Proved on the plan (an input that large is not
    run here)."""
    pytest.importorskip("triton")
    from csl_kernels.triton import _common
    from csl_kernels.triton import pcos_weights as tp

    side, classes = 46340, 150
    logits = torch.empty(1, 1, 1, 1).expand(1, classes, side, side)  # no memory: every stride 0
    hw = side * side
    plan = tp.launch_plan(1, classes, hw, True, tp.DEFAULT_CONFIG)
    use_int64 = _common.wide(logits, extra=(hw,))
    assert not use_int64 and plan.chunks * plan.tiles * plan.block_p > 2**31 - 1
    assert tp.features_wide(use_int64, plan)
    image_plan = tp.launch_plan(1, classes, hw, False, tp.DEFAULT_CONFIG)  # small records: chunks end near hw
    assert not tp.features_wide(use_int64, image_plan)


def test_triton_group_tiles(monkeypatch):
    """The per-group reductions run one group per program until there are enough programs, within the tile that
    compiles without spills; packing more groups into a program gives the same results (bitwise under the
    interpreter, whose reductions follow the same order whatever the tile)."""
    from csl_kernels.triton import pcos_weights as tp

    for n_groups in (1, 16, 256, 336, 2400, 10**6):
        for block_k in (1, 2, 128):
            tile = tp.group_tile(n_groups, block_k)
            assert 1 <= tile * block_k <= max(block_k, tp.GROUP_TILE)
            assert tile == 1 or n_groups > tp.MIN_GROUP_PROGRAMS
    device = require_backend(OP, "triton")
    z, ign = make_logits(7, batch=6, classes=5, height=40, width=60, ignore="bool", p_nonfinite=0.01, device=device)
    for groups in ("image", "class"):
        one = csl_kernels.pcos_weights(z, **masks(ign), groups=groups, backend="triton", return_stats=True)
        plan_args = (6, 5, 40 * 60, groups == "class", tp.DEFAULT_CONFIG)
        assert tp.launch_plan(*plan_args).block_grp == 1
        with monkeypatch.context() as m:
            m.setattr(tp, "MIN_GROUP_PROGRAMS", 1)  # every group of the call in one program's tile
            # The remembered plan of this shape is not reused: the limits it was computed with are part of its key.
            assert tp.launch_plan(*plan_args).block_grp == tp.next_pow2(6 * (5 if groups == "class" else 1))
            packed = csl_kernels.pcos_weights(z, **masks(ign), groups=groups, backend="triton", return_stats=True)
        if device.type == "cpu":
            for a, b in zip((*one[:3], *one.stats), (*packed[:3], *packed.stats), strict=True):
                assert torch.equal(a, b)
        else:  # a GPU may reduce a group in another order in another tile layout: the last bits may differ
            assert torch.equal(one.label, packed.label)
            torch.testing.assert_close(one.weight, packed.weight, rtol=0, atol=1e-6)
            torch.testing.assert_close(one.stats.mu, packed.stats.mu, rtol=1e-12, atol=1e-15)
            assert torch.equal(one.stats.count, packed.stats.count)


def test_triton_class_group_cluster_tiles_stay_within_the_spill_free_width(monkeypatch):
    """The class-group cluster pass keeps the feature pass's tile up to CLASS_CLUSTER_BLOCK pixels: at C = 2 the
    candidate Config(2048, 8) makes 1024-pixel feature tiles, whose cluster kernel spilled 20 B per thread for sm_80;
    it runs two 512-pixel tiles per feature tile, covering the same pixels, and matches the float64 reference."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import pcos_weights as tp
    from csl_kernels.triton import tuning

    wide = tuning.Config(2048, 8)
    assert wide in tp.TUNABLE.candidates
    for classes in (2, 3, 21, 150):
        for config in tp.TUNABLE.candidates:
            plan = tp.launch_plan(1, classes, 40 * 60, True, config)
            assert plan.cluster_p <= tp.CLASS_CLUSTER_BLOCK
            assert plan.cluster_p * plan.cluster_tiles == plan.block_p * plan.tiles, (classes, config)
    assert tp.launch_plan(1, 2, 40 * 60, True, wide)[:2] == (1024, 2)
    assert tp.launch_plan(1, 2, 40 * 60, True, wide).cluster_p == 512
    seen = spy_constexpr(monkeypatch, tp, "_pcos_cluster_kernel", "BLOCK_P")
    z, ign = make_logits(3, batch=1, classes=2, height=40, width=60, ignore="int64", p_nonfinite=0.01, device=device)
    options = dict(alpha=8.0, confidence="prob", groups="class")
    with tuning.forced({tp.TUNABLE.name: wide}):
        out = csl_kernels.pcos_weights(z, **masks(ign), backend="triton", return_stats=True, **options)
    assert seen == [512]
    assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)


@pytest.mark.parametrize("groups", ["image", "class"])
def test_triton_chunk_records_are_reduced_block_by_block(monkeypatch, groups):
    """The per-group reductions (Gram sums, cluster records) walk an image's chunk records MAX_BLOCK_K (128) at a
    time: an image needs more than 128 chunks to reach a second step, too many for the interpreter. With chunks of
    128 pixels and steps of 2 records, the 5 chunks of a 20 x 30 image take three steps, the last one partial
    (with non-finite pixels, whose per-chunk counts are summed the same way)."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import pcos_weights as tp

    monkeypatch.setattr(tp, "MIN_CHUNK", 128)
    monkeypatch.setattr(tp, "MAX_BLOCK_K", 2)
    plan = tp.launch_plan(2, 5, 20 * 30, groups == "class", tp.DEFAULT_CONFIG)
    assert (plan.chunks, plan.block_k) == (5, 2)
    z, ign = make_logits(11, batch=2, classes=5, height=20, width=30, ignore="int64", p_nonfinite=0.02,
                         device=device)
    options = dict(alpha=8.0, confidence="prob", groups=groups)
    out = csl_kernels.pcos_weights(z, **masks(ign), backend="triton", return_stats=True, **options)
    assert (out.stats.n_nonfinite > 0).all()  # also summed over the three steps, with the statistics
    assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)


def test_stats_optional_and_empty_input(fused_backend):
    device = require_backend(OP, fused_backend)
    z, _ = make_logits(2, batch=2, classes=3, height=4, width=4, device=device)
    assert csl_kernels.pcos_weights(z, backend=fused_backend).stats is None
    for shape, groups, group_shape in (((2, 3, 0, 4), "class", (2, 3)), ((2, 3, 5, 0), "image", (2,))):
        out = csl_kernels.pcos_weights(torch.randn(*shape, device=device), groups=groups, backend=fused_backend,
                                       return_stats=True)
        assert out.weight.shape == (2, *shape[2:]) and out.stats.mu.shape == (*group_shape, 2, 2)
        # no pixel: every statistic is 0 (the fused kernels allocate them empty and zero them for such an input)
        for name, value in out.stats._asdict().items():
            assert value.numel() > 0 and not value.any(), (groups, name, value)


def test_triton_custom_op_registration_and_compile():
    device = require_backend(OP, "triton")
    from csl_kernels.triton.pcos_weights import pcos_weights_triton

    z, ign = make_logits(6, batch=2, classes=5, height=3, width=4, ignore="bool", device=device)
    op = torch.ops.csl_triton.pcos_weights.default
    torch.library.opcheck(op, (z, ign, 8.0, False, False))
    ignore_map = torch.where(ign, 0, csl_kernels.IGNORE_INDEX).to(torch.uint8)  # the other form of validity
    torch.library.opcheck(op, (z, ignore_map, 8.0, False, True))
    torch.library.opcheck(op, (z.to(torch.bfloat16), None, 3.7, True, True))
    torch.library.opcheck(op, (layout(z.double(), "channels_last"), ign, 64.0, False, True))

    def weights(x):
        weight, *_, count, _, chosen, _ = pcos_weights_triton(x, ign, 8.0, False, True)
        return weight * 2, count, chosen

    compiled = torch.compile(weights, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(z), weights(z), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda z: (z, None, {"alpha": 0.0}), ValueError, "alpha"),
        (lambda z: (z, None, {"alpha": -8.0}), ValueError, "alpha"),
        (lambda z: (z, None, {"alpha": float("nan")}), ValueError, "alpha"),
        (lambda z: (z, None, {"alpha": "8"}), ValueError, "alpha"),
        (lambda z: (z, None, {"alpha": True}), ValueError, r"alpha must be a positive finite number, got True"),
        (lambda z: (z, None, {"alpha": float("inf")}), ValueError, "alpha must be a positive finite number"),
        (lambda z: (z, None, {"alpha": 10**400}), ValueError, "alpha must be a positive finite number, got 1000"),
        (lambda z: (z, None, {"alpha": torch.tensor(8.0)}), ValueError,
         r"alpha must be a positive finite number, got tensor\(8\.\) \(torch.Tensor\): a Python float is needed"),
        (lambda z: (z, None, {"alpha": np.float32(8)}), ValueError, r"numpy.float32\): a Python int or float is"),
        (lambda z: (z.to_sparse(), None, {}), TypeError, "logits must be a dense"),
        (lambda z: (z, None, {"confidence": "logit"}), ValueError, "confidence"),
        (lambda z: (z, None, {"groups": "pixel"}), ValueError, "groups"),
        (lambda z: (z, None, {"return_stats": "no"}), TypeError, "return_stats must be True or False, got 'no'"),
        (lambda z: (z, None, {"return_stats": 1}), TypeError, "return_stats must be True or False, got 1"),
        (lambda z: (z[0], None, {}), ValueError, "logits"),
        (lambda z: (z.int(), None, {}), TypeError, "logits"),
        (lambda z: (z[:, :1], None, {}), ValueError, "at least 2 classes"),
        (lambda z: (z, torch.zeros(2, 5, 4, dtype=torch.long), {}), ValueError, "ignore"),
        (lambda z: (z, torch.zeros(2, 4, 5, dtype=torch.float32), {}), TypeError, "ignore"),
        (lambda z: (z, None, {"backend": "tpu"}), ValueError, "unknown backend .tpu."),
    ],
)
def test_bad_input_errors(make, error, match):
    z, ign, kwargs = make(torch.randn(2, 3, 4, 5))
    with pytest.raises(error, match=match):
        csl_kernels.pcos_weights(z, **masks(ign), **kwargs)


# ------------------------------------------------------------------------------------- the released code's rule


def released_reference(z: torch.Tensor, valid: torch.Tensor | None, alpha: float = 8.0) -> dict:
    """The authors' released formulas written out per image in float64 (independent of csl_kernels' reference):
    log confidence, variance over all C slots with the max slot 0, SVD assignment, weight 1 where z0 > 0 or z1 > 0
    with z1 = (mu1 - f1) / sd1. Image groups only."""
    z = z.double()
    b, c = z.shape[:2]
    p = z.softmax(dim=1)
    pmax, label = p.max(dim=1)
    q = p.scatter(1, label.unsqueeze(1), 0.0)  # the max slot set to 0
    r = q.sum(dim=1)
    m = r / (c - 1)
    var = ((q - m.unsqueeze(1)) ** 2).sum(dim=1) / (c - 1)  # over all C slots, the max slot's (0 - m)^2 included
    f0 = torch.log(pmax)
    f1 = -((c - 1) ** 2) / (2 * (r + 1e-8)) * var
    weights = torch.zeros(b, *z.shape[2:], dtype=torch.float64)
    for i in range(b):
        keep = torch.isfinite(z[i]).all(dim=0) if valid is None else valid[i] & torch.isfinite(z[i]).all(dim=0)
        x, y = f0[i][keep], f1[i][keep]
        if x.numel() == 0:
            continue
        phi = torch.stack((x, y))  # 2 x N
        _, s, vh = torch.linalg.svd(phi, full_matrices=False)
        cluster = vh.abs().argmax(dim=0) if s[1] > 1e-12 * s[0] else torch.zeros_like(x, dtype=torch.long)
        stats = []
        for cl in (0, 1):
            sel = cluster == cl
            n = int(sel.sum())
            mu = (x[sel].mean(), y[sel].mean()) if n else (torch.tensor(0.0), torch.tensor(0.0))
            sd = (x[sel].var(), y[sel].var()) if n > 1 else (torch.tensor(0.0), torch.tensor(0.0))
            stats.append((n, mu, sd))
        pick = 1 if stats[1][0] > 0 and (stats[0][0] == 0 or stats[1][1][0] > stats[0][1][0]) else 0
        _, (mu0, mu1), (v0, v1) = stats[pick]
        z0 = (x - mu0) / torch.sqrt(v0 + 1e-8)
        z1 = (mu1 - y) / torch.sqrt(v1 + 1e-8)
        w = torch.exp(-(z0**2) / alpha) * torch.exp(-(z1**2) / alpha)
        w = torch.where((z0 > 0) | (z1 > 0), 1.0, w)
        weights[i][keep] = w
    return {"weight": weights, "label": label, "f0": f0, "f1": f1}


def test_released_reference_matches_the_written_out_formulas():
    g = torch.Generator().manual_seed(21)
    for c in (2, 5, 21):
        z = torch.randn(2, c, 9, 11, generator=g, dtype=torch.float64) * 3
        valid = torch.rand(2, 9, 11, generator=g) > 0.2
        ours = csl_kernels.pcos_weights(z, valid=valid, rule="released", backend="reference")
        theirs = released_reference(z, valid)
        f = csl_kernels.residual_features(z, valid=valid, rule="released", backend="reference")
        torch.testing.assert_close(f.f0[valid], theirs["f0"][valid])
        torch.testing.assert_close(f.v[valid], theirs["f1"][valid], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.weight.double(), theirs["weight"], rtol=1e-6, atol=1e-6)
        # The released rule really differs from the paper's: another side of the dispersion keeps weight 1.
        paper = csl_kernels.pcos_weights(z, valid=valid, backend="reference")
        assert not torch.equal(paper.weight, ours.weight)


@pytest.mark.parametrize("groups", ["image", "class"])
@pytest.mark.parametrize(
    ("shape", "kind", "ignore", "confidence"),
    [((2, 21, 13, 17), "contiguous", "int64", None), ((1, 2, 7, 9), "channels_last", "bool", None),
     ((1, 150, 5, 7), "transposed", None, None), ((2, 5, 1, 1), "class_slice", "int64", None),
     # a multi-chunk image; with log confidence the oracle finds too many ambiguous pixels there (so for the paper's
     # rule too) and could check little
     ((1, 21, 65, 129), "channels_last", "int64", "prob")],
)
def test_released_rule_every_backend(fused_backend, shape, kind, ignore, confidence, groups):
    """rule="released" on every backend against the float64 reference: odd sizes, layouts, C = 2 and 150, image and
    class groups, multi-chunk images."""
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, ign = make_logits(sum(shape) + 7, batch=b, classes=c, height=h, width=w, ignore=ignore, kind=kind,
                         device=device)
    options = dict(alpha=8.0, confidence=confidence, groups=groups, rule="released")
    out = csl_kernels.pcos_weights(z, **masks(ign), backend=fused_backend, return_stats=True, **options)
    assert_pcos_match(out, reference64(z, ign, **options), z, ign, **options)


@pytest.mark.parametrize("case", ["all_ignored", "one_class", "nan_inf"])
def test_released_rule_adversarial(fused_backend, case):
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 7, 9, 10, generator=g) * 4
    valid = torch.ones(2, 9, 10, dtype=torch.bool)
    if case == "all_ignored":
        valid[0] = False
    elif case == "one_class":  # every pixel predicts class 3, with confidences that vary
        z[:, 3] = z.max(dim=1).values + 0.5 + 2.0 * torch.rand(2, 9, 10, generator=g)
    else:
        z[0, 2, 1, 1] = float("nan")
        z[1, :, 4, 4] = float("inf")
    z, valid = z.to(device), valid.to(device)
    out = csl_kernels.pcos_weights(z, valid=valid, rule="released", backend=fused_backend, return_stats=True)
    ref = csl_kernels.pcos_weights(z.double().cpu(), valid=valid.cpu(), rule="released", backend="reference",
                                   return_stats=True)
    assert torch.isfinite(out.weight).all() and torch.equal(out.label.cpu(), ref.label)
    torch.testing.assert_close(out.weight.cpu(), ref.weight, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.stats.n_nonfinite.cpu(), ref.stats.n_nonfinite)
    if case == "all_ignored":
        assert (out.weight[0] == 0).all()
    if case == "one_class":  # one label, and weights that are not all 1: the case checks the Gaussian part too
        assert (out.label.cpu() == 3).all()
        assert ((out.weight.cpu() > 0) & (out.weight.cpu() < 0.99)).sum() >= 10  # 17 of 180 in the reference


@pytest.mark.parametrize("rule", ["release", "Released", "algorithm1", None])
def test_an_unknown_rule_is_refused_not_run_as_the_papers(rule):
    """rule= must be "paper" or "released": a misspelt rule (the trainer's selection.rule passed through) is a
    ValueError naming it, on every op that takes it, not a silent run of the paper's rule."""
    z = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="rule must be one of"):
        csl_kernels.pcos_weights(z, rule=rule, backend="reference")
    with pytest.raises(ValueError, match="rule must be one of"):
        csl_kernels.residual_features(z, rule=rule, confidence="prob", backend="reference")
