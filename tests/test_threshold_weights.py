"""threshold_weights (FixMatch / UniMatch baseline) and selection_scores (ablation scores), spec Sec. 3.

Against float64 softmax formulas written out here; threshold_weights also on every fused backend (it runs on
residual_features), selection_scores on the reference (the only backend it has).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import FUSED_BACKENDS, masks, require_backend
from test_residual_features import LAYOUTS, make_logits

import csl_kernels
from csl_kernels._checks import valid_mask

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")


def device_for(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "reference" else require_backend("residual_features", backend)


def softmax64(z: torch.Tensor, ign):
    """``(p, keep)``: float64 probabilities (of zeroed logits where a pixel is invalid) and the validity mask."""
    z = z.detach().cpu().double()
    finite = torch.isfinite(z).all(dim=1)
    valid = valid_mask(z, **masks(None if ign is None else ign.cpu()))
    keep = finite if valid is None else finite & valid
    return torch.softmax(torch.where(keep.unsqueeze(1), z, 0.0), dim=1), keep


@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
@pytest.mark.parametrize("seed", range(20))
def test_threshold_matches_float64_softmax(backend, seed):
    """Random cases: C = 2 to 150, every dtype and layout, ignored and non-finite pixels; every fifth case has an image
    with every pixel ignored, and the next one images that predict a single class."""
    device = device_for(backend)
    rng = random.Random(seed)
    classes = rng.choice((2, 5, 21, 150))
    side = 5 if classes == 150 else 9
    z, ign = make_logits(seed, batch=rng.randint(1, 2), classes=classes, height=rng.randint(1, side),
                         width=rng.randint(1, side),
                         dtype=rng.choice((torch.float32, torch.float64, torch.bfloat16, torch.float16)),
                         scale=rng.choice((1.0, 3.0)), ignore=rng.choice(("none", "bool", "int64")),
                         p_nonfinite=0.0 if seed % 5 == 1 else rng.choice((0.0, 0.15)), kind=rng.choice(LAYOUTS),
                         device=device)
    if seed % 5 == 0:  # image 0: every pixel ignored
        ign = torch.ones_like(z[:, 0], dtype=torch.bool) if ign is None else ign.clone()
        ign[0] = False if ign.dtype == torch.bool else csl_kernels.IGNORE_INDEX
    elif seed % 5 == 1:  # one class everywhere, with confidences on both sides of most thresholds (in place: the
        # layout stays)
        z[:, 1] = z.max(dim=1).values + torch.rand(z[:, 1].shape, generator=torch.Generator().manual_seed(seed)).to(
            z.device, z.dtype) * 4
    tau = rng.choice((0.0, 0.3, 0.5, 0.9, 0.95))
    out = csl_kernels.threshold_weights(z, **masks(ign), tau=tau, backend=backend)
    assert out.stats is None
    assert out.weight.dtype == torch.float32 and out.reliable.dtype == torch.bool and out.label.dtype == torch.long
    assert out.weight.shape == out.label.shape == out.reliable.shape == (z.shape[0], *z.shape[2:])
    p, keep = softmax64(z, ign)
    pmax, label = p.max(dim=1)
    expected = (pmax >= tau) & keep
    exact = (pmax - tau).abs() > 1e-6  # float32 features may round across tau within ~1e-7
    assert torch.equal(out.reliable.cpu()[exact], expected[exact])
    assert torch.equal(out.weight.cpu(), out.reliable.cpu().float())
    assert torch.equal(out.label.cpu(), torch.where(keep, label, 0))
    assert not out.reliable.cpu()[~keep].any()


@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
def test_threshold_edges(backend):
    """tau = 1 keeps only pixels whose float32 pmax rounds to exactly 1; ties go to the lowest class."""
    device = device_for(backend)
    z = torch.zeros(1, 4, 1, 4)
    z[0, 2, 0, 0] = 40.0  # pmax = 1 in float32
    z[0, 1, 0, 1] = 5.0  # pmax ~ 0.98
    z[0, :, 0, 2] = torch.tensor([1.0, 3.0, 3.0, 0.0])  # tie between classes 1 and 2
    z = z.to(device)
    out = csl_kernels.threshold_weights(z, tau=1.0, backend=backend)
    assert out.reliable.cpu().tolist() == [[[True, False, False, False]]]
    assert out.label.cpu().tolist() == [[[2, 1, 1, 0]]]
    out = csl_kernels.threshold_weights(z, tau=0.25, backend=backend)
    assert out.reliable.cpu().tolist() == [[[True, True, True, True]]]  # column 3: 4 equal classes, pmax = 0.25
    ign = torch.tensor([[[255, 0, 255, 1]]], device=device)
    out = csl_kernels.threshold_weights(z, **masks(ign), tau=0.25, backend=backend)
    assert out.weight.cpu().tolist() == [[[0.0, 1.0, 0.0, 1.0]]]
    z[0, 3, 0, 3] = float("nan")
    out = csl_kernels.threshold_weights(z, **masks(ign), tau=0.0, backend=backend)  # every valid, finite pixel
    assert out.weight.cpu().tolist() == [[[0.0, 1.0, 0.0, 0.0]]]


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan"), "0.9", None])
def test_threshold_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        csl_kernels.threshold_weights(torch.randn(1, 3, 2, 2), tau=tau, backend="reference")


def scores64(z: torch.Tensor, ign) -> dict[str, torch.Tensor]:
    p, keep = softmax64(z, ign)
    plogp = torch.special.xlogy(p, p)
    top2 = p.topk(2, dim=1).values
    label = p.argmax(dim=1, keepdim=True)
    nan = torch.full((), float("nan"), dtype=torch.float64)
    out = {
        "confidence": top2[:, 0],
        "entropy": -plogp.sum(dim=1),
        "residual_entropy": -(plogp.sum(dim=1) - plogp.gather(1, label).squeeze(1)),
        "margin": top2[:, 0] - top2[:, 1],
    }
    return {k: torch.where(keep, v, nan) for k, v in out.items()}, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [2, 7, 21])
def test_selection_scores_match_float64_formulas(dtype, classes):
    z, ign = make_logits(classes, batch=2, classes=classes, height=4, width=6, dtype=dtype, scale=2.0, ignore="bool",
                         p_nonfinite=0.1)
    expected, keep = scores64(z, ign)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (2e-5, 2e-6)
    for score, want in expected.items():
        got = csl_kernels.selection_scores(z, **masks(ign), score=score)
        assert got.dtype == dtype and got.shape == keep.shape
        assert torch.isnan(got[~keep]).all() and torch.isfinite(got[keep]).all()
        torch.testing.assert_close(got[keep].double(), want[keep], rtol=rtol, atol=atol, msg=score)
    f0, v, _ = csl_kernels.residual_features(z, **masks(ign), backend="reference")
    dispersion = csl_kernels.selection_scores(z, **masks(ign), score="dispersion")
    assert torch.equal(dispersion[keep], v[keep])
    assert torch.equal(csl_kernels.selection_scores(z, **masks(ign), score="confidence")[keep], f0[keep])
    if classes == 2:  # one residual class: H_res = -p2 log p2, margin = 2 pmax - 1
        p2 = 1 - expected["confidence"][keep]
        torch.testing.assert_close(expected["residual_entropy"][keep], -p2 * torch.log(p2))
        torch.testing.assert_close(expected["margin"][keep], 2 * expected["confidence"][keep] - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_entropy_of_a_confident_pixel_keeps_its_top_class_term(dtype):
    """With pmax rounded to 1, the softmax's -pmax log pmax is 0 while it is ~R, some percent of H (4.8 % at a gap
    of 20 in float32, 2.4 % at 40 in float64); written from R it is exact to the dtype's rounding."""
    gaps = torch.tensor([5.0, 20.0, 30.0, 40.0, 80.0], dtype=torch.float64)
    z = torch.zeros(1, 3, 1, len(gaps), dtype=torch.float64)
    z[0, 0, 0] = gaps
    r = 2 * torch.exp(-gaps)
    p_rest = torch.exp(-gaps) / (1 + r)
    exact = torch.log1p(r) / (1 + r) - 2 * p_rest * torch.log(p_rest)
    got = csl_kernels.selection_scores(z.to(dtype), score="entropy")[0, 0].double()
    torch.testing.assert_close(got, exact, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)


def test_selection_scores_rank_as_documented():
    """Higher = more reliable for confidence, margin and dispersion; lower for the entropies (spec Sec. 3 / E.1)."""
    probs = torch.tensor([[0.5, 0.5] + [1e-12] * 49, [0.5] + [0.01] * 50, [0.98] + [0.0004] * 50],
                         dtype=torch.float64)
    z = probs.log().t().reshape(1, 51, 1, 3)
    s = {k: csl_kernels.selection_scores(z, score=k)[0, 0] for k in
         ("confidence", "entropy", "residual_entropy", "margin", "dispersion")}
    # pixel 2 is the most reliable by every score
    assert s["confidence"][2] > s["confidence"][1] and s["margin"][2] > s["margin"][0]
    assert s["entropy"][2] < s["entropy"][1] and s["residual_entropy"][2] < s["residual_entropy"][1]
    # same confidence for pixels 0 and 1: dispersion ranks the evenly spread residual (1) higher, margin too
    assert math.isclose(s["confidence"][0].item(), s["confidence"][1].item(), rel_tol=1e-9)
    assert s["dispersion"][0] < s["dispersion"][1] and s["margin"][0] < s["margin"][1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"score": "variance"}, ValueError, "score"),
        ({"logits": torch.randn(3, 4, 5)}, ValueError, "logits"),
        ({"logits": torch.randint(0, 3, (1, 3, 4, 5))}, TypeError, "logits"),
        ({"ignore": torch.zeros(1, 4, 4, dtype=torch.bool)}, ValueError, "ignore"),
    ],
)
def test_selection_scores_bad_input(kwargs, error, match):
    args = {"logits": torch.randn(1, 3, 4, 5), "ignore": None, "score": "entropy", **kwargs}
    with pytest.raises(error, match=match):
        csl_kernels.selection_scores(args["logits"], args["ignore"], score=args["score"])


def test_unknown_backend_names_threshold_weights():
    with pytest.raises(ValueError, match=r"threshold_weights runs the residual_features kernels: .*'bogus'"):
        csl_kernels.threshold_weights(torch.randn(1, 3, 2, 2), backend="bogus")


def test_the_default_threshold_is_0_95():
    """FixMatch / UniMatch's tau = 0.95 when none is given (spec Sec. 3)."""
    confidence = torch.tensor([0.5, 0.9, 0.92, 0.949, 0.951, 0.97, 0.999])
    probs = torch.stack([confidence, 1 - confidence])  # 2 classes, max = confidence
    logits = probs.log().view(1, 2, 1, -1)
    default = csl_kernels.threshold_weights(logits, backend="reference").weight
    assert default.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert torch.equal(default, csl_kernels.threshold_weights(logits, tau=0.95, backend="reference").weight)
