"""residual_features: every fused backend against the float64 reference.

Seeded random cases over sizes, C, dtypes, layouts, ignore masks, temperatures and non-finite logits; adversarial
cases (odd sizes, every layout, non-finite and ignored pixels, even and near-even residuals, extreme logits, one
class); the low-precision rule (error <= 2x PyTorch's own computation in that dtype); determinism; bad input.

The kernels are held to per-pixel tolerances that follow the rounding of the formulas (see ``feature_tolerance``);
labels must be equal.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from conftest import layout, masks, require_backend, spy_constexpr

import csl_kernels
from csl_kernels._checks import valid_mask

OP = "residual_features"
# The kernels test finiteness with z - z, which numpy (Triton's interpreter) reports for +-inf.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
LAYOUTS = ("contiguous", "channels_last", "transposed", "strided", "class_slice", "batch_slice")


def underflow_floor(dtype: torch.dtype) -> float:
    """Absolute error a backend's features (and what is computed from them) may show for logits of ``dtype``: float32
    exp underflows where float64 does not (R < 1e-38), so values below 1e-37 may come out as 0."""
    return 1e-300 if dtype == torch.float64 else 1e-37


def feature_tolerance(f0: torch.Tensor, v: torch.Tensor, r: torch.Tensor, dtype: torch.dtype):
    """Per-pixel error bounds ``(tol_f0, tol_v)`` of a backend's features against the float64 reference values
    ``f0``, ``v`` (``r``: float64 residual mass), for logits of ``dtype``.

    Float32 arithmetic: f0 to a few ulp plus the relative error of R (~ulp(z) |z|, carried into f0 as ~r times it);
    v to ``|v| + sqrt(|v| r)``, the size of the rounding of ``p_k - m`` (the ``E[x^2] - m^2`` shortcut is off by ~eps r,
    1e-3 of that scale on near-even residuals), plus ~eps^2 r (even a perfect float32 residual of equal values has
    that much noise). float32 exp underflows where float64 does not (R < 1e-38): an absolute floor far below any
    meaningful value. Measured worst cases are 2-10x below these bounds.
    """
    floor = underflow_floor(dtype)
    if dtype == torch.float64:
        return (2e-15 * f0.abs() + 2e-13 * r + floor,
                1e-11 * (v.abs() + (v.abs() * r).sqrt()) + 1e-29 * r + floor)
    return (5e-7 * f0.abs() + 1e-5 * r + floor,
            5e-5 * (v.abs() + (v.abs() * r).sqrt()) + 1e-12 * r + floor)


def make_logits(seed: int, *, batch: int, classes: int, height: int, width: int, dtype: torch.dtype = torch.float32,
                scale: float = 3.0, ignore: str = "none", p_ignore: float = 0.2, p_nonfinite: float = 0.0,
                kind: str = "contiguous", device: torch.device | str = "cpu"):
    """``(logits, ignore)``: Gaussian logits with per-class offsets and a per-pixel temperature (so an image holds
    both confident and uncertain pixels); ``p_nonfinite`` of the pixels get a NaN, +inf or -inf logit."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    temp = torch.exp(0.8 * torch.randn(batch, 1, height, width, generator=g, dtype=f64))
    z = torch.randn(batch, classes, height, width, generator=g, dtype=f64) * scale * temp
    z = z + torch.randn(batch, classes, 1, 1, generator=g, dtype=f64) * scale
    if p_nonfinite > 0:
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=f64)
        pixel = torch.rand(batch, 1, height, width, generator=g) < p_nonfinite
        cls = torch.randint(0, classes, (batch, 1, height, width), generator=g)
        hit = pixel & (torch.arange(classes).view(1, classes, 1, 1) == cls)
        z = torch.where(hit, bad[torch.randint(0, 3, z.shape, generator=g)], z)
    valid = torch.rand(batch, height, width, generator=g) >= p_ignore
    if ignore == "none":
        ign = None
    elif ignore == "bool":
        ign = valid
    else:
        labels = torch.randint(0, classes, (batch, height, width), generator=g)
        ign = torch.where(valid, labels, 255).to(torch.uint8 if ignore == "uint8" else torch.int64)
    z = layout(z.to(dtype).to(device), kind)
    ign = None if ign is None else layout(ign.to(device), kind)
    return z, ign


def reference64(z: torch.Tensor, ign, confidence: str = "prob"):
    """The float64 reference on the (upcast) same logits, on the CPU."""
    ign = None if ign is None else ign.cpu()
    return csl_kernels.residual_features(z.detach().cpu().double(), **masks(ign), confidence=confidence,
                                         backend="reference")


def residual_mass64(z: torch.Tensor) -> torch.Tensor:
    """r = sum of the non-max probabilities, float64 (0 where a logit is not finite)."""
    z = z.detach().cpu().double()
    finite = torch.isfinite(z).all(dim=1, keepdim=True)
    z = torch.where(finite, z, 0.0)
    p = torch.softmax(z, dim=1)
    is_max = torch.arange(z.shape[1]).view(1, -1, 1, 1) == z.argmax(dim=1, keepdim=True)
    return p.masked_fill(is_max, 0.0).sum(dim=1)


def assert_features_match(out, ref, z: torch.Tensor) -> None:
    f0, v, label = out
    r0, rv, rl = ref
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    shape = (z.shape[0], z.shape[2], z.shape[3])
    assert f0.dtype == v.dtype == out_dtype and label.dtype == torch.long
    assert f0.shape == v.shape == label.shape == shape
    f0, v, label = f0.cpu(), v.cpu(), label.cpu()
    assert torch.isfinite(f0).all() and torch.isfinite(v).all()
    assert torch.equal(label, rl)
    assert (v <= 0).all()
    r = residual_mass64(z)
    tol_f0, tol_v = feature_tolerance(r0, rv, r, z.dtype)
    f0_err = (f0.double() - r0).abs()
    assert (f0_err <= tol_f0).all(), f"f0 error {(f0_err / tol_f0).max():.3e} of the tolerance"
    v_err = (v.double() - rv).abs()
    assert (v_err <= tol_v).all(), f"v error {(v_err / tol_v).max():.3e} of the tolerance"


def assert_invalid_zero(out, keep: torch.Tensor) -> None:
    """Ignored and non-finite pixels give exactly (0, 0, 0)."""
    for t in out:
        t = t.cpu()
        assert torch.equal(t[~keep], torch.zeros_like(t[~keep]))


def keep_mask(z: torch.Tensor, ign) -> torch.Tensor:
    finite = torch.isfinite(z.detach().cpu()).all(dim=1)
    valid = valid_mask(z.detach().cpu(), **masks(None if ign is None else ign.cpu()))
    return finite if valid is None else finite & valid


RANDOM_SEEDS = range(100)


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_cases_match_float64_reference(fused_backend, seed):
    device = require_backend(OP, fused_backend)
    rng = random.Random(seed)
    classes = rng.choice((2, 3, 8, 11, 21, 21, 40, 150))  # class tiles of 2-32; 11: CamVid
    side = 6 if classes == 150 else 14
    case = dict(batch=rng.randint(1, 2), classes=classes, height=rng.randint(1, side), width=rng.randint(1, side),
                dtype=rng.choice((torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)),
                scale=rng.choice((0.3, 1.0, 3.0, 10.0, 30.0)), ignore=rng.choice(("none", "bool", "int64", "uint8")),
                p_ignore=rng.choice((0.0, 0.2, 0.7)), p_nonfinite=rng.choice((0.0, 0.0, 0.1)),
                kind=rng.choice(LAYOUTS), device=device)
    if case["dtype"] == torch.float16:
        case["scale"] = min(case["scale"], 3.0)  # keep |z| well inside the float16 range
    z, ign = make_logits(seed, **case)
    confidence = rng.choice(("prob", "log"))
    out = csl_kernels.residual_features(z, **masks(ign), confidence=confidence, backend=fused_backend)
    ref = reference64(z, ign, confidence)
    assert_features_match(out, ref, z)
    assert_invalid_zero(out, keep_mask(z, ign))


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 21, 1, 1), (1, 3, 7, 13), (2, 21, 7, 13), (1, 150, 7, 13),
                                   (1, 300, 3, 5), (1, 5, 65, 129)])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_odd_sizes_and_layouts(fused_backend, shape, kind):
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, ign = make_logits(sum(shape), batch=b, classes=c, height=h, width=w, ignore="int64", kind=kind,
                         device=device)
    for confidence in ("prob", "log"):
        out = csl_kernels.residual_features(z, **masks(ign), confidence=confidence, backend=fused_backend)
        assert_features_match(out, reference64(z, ign, confidence), z)


@pytest.mark.parametrize(("shape", "kind", "dtype"), [
    ((2, 2, 5, 7), "contiguous", torch.float32), ((1, 21, 7, 13), "channels_last", torch.float32),
    ((2, 21, 6, 9), "class_slice", torch.float64), ((1, 150, 5, 7), "transposed", torch.float32),
    ((2, 40, 4, 6), "batch_slice", torch.bfloat16), ((1, 3, 9, 1), "strided", torch.float16)])
@pytest.mark.parametrize("confidence", [None, "prob"])
def test_released_rule_matches_float64_reference(fused_backend, shape, kind, dtype, confidence):
    """rule="released" (spec Sec. 2b: log confidence by default, the residual variance over C slots) on every fused
    backend against the float64 reference: C = 2 to 150, layouts, dtypes, ignored and non-finite pixels, and one
    image with every pixel ignored."""
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, ign = make_logits(sum(shape) + 1, batch=b, classes=c, height=h, width=w, dtype=dtype, ignore="bool",
                         p_ignore=0.2, p_nonfinite=0.1, kind=kind, device=device)
    if b > 1:
        ign = ign.clone()
        ign[-1] = False  # the last image: every pixel ignored
    options = {} if confidence is None else {"confidence": confidence}
    out = csl_kernels.residual_features(z, **masks(ign), rule="released", backend=fused_backend, **options)
    ref = csl_kernels.residual_features(z.cpu().double(), **masks(ign.cpu()), rule="released", backend="reference",
                                        **options)
    keep = keep_mask(z, ign)
    assert keep.any()
    assert_invalid_zero(out, keep)
    assert_features_match(out, ref, z)
    # The rule is really applied: its dispersion differs from the paper rule's on the kept pixels.
    paper = csl_kernels.residual_features(z, **masks(ign), backend=fused_backend, **options)
    assert not torch.equal(paper.v.cpu()[keep], out.v.cpu()[keep])


def test_triton_int64_offsets_path(monkeypatch):
    """Images of >= 2^31 elements switch the kernel to int64 offsets; forced here on small inputs of every layout."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import residual_features as module

    monkeypatch.setattr(module, "wide", lambda *tensors, **kwargs: True)
    launched = spy_constexpr(monkeypatch, module, "_residual_features_kernel", "WIDE")
    for kind in LAYOUTS:
        z, ign = make_logits(3, batch=2, classes=150, height=5, width=7, ignore="int64", kind=kind, device=device)
        out = csl_kernels.residual_features(z, **masks(ign), backend="triton")
        assert_features_match(out, reference64(z, ign), z)
    assert launched == [True] * len(LAYOUTS)


@pytest.mark.parametrize("classes", [2, 21, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_and_ignored_pixels_give_zeros(fused_backend, classes, dtype):
    device = require_backend(OP, fused_backend)
    z, ign = make_logits(classes, batch=2, classes=classes, height=5, width=6, dtype=dtype, ignore="bool",
                         p_ignore=0.3, p_nonfinite=0.3, device=device)
    z[1, :, 0, 0] = float("-inf")  # every class -inf
    z[1, :, 0, 1] = float("nan")
    z[1, classes - 1, 0, 2] = float("inf")  # +inf in the last class tile only
    keep = keep_mask(z, ign)
    assert (~torch.isfinite(z.cpu()).all(dim=1)).sum() >= 3 and keep.any()
    out = csl_kernels.residual_features(z, **masks(ign), backend=fused_backend)
    assert_invalid_zero(out, keep)
    assert_features_match(out, reference64(z, ign), z)
    # A poisoned pixel never changes its neighbours: same result as with the poison replaced by zeros.
    clean = torch.where(torch.isfinite(z), z, torch.zeros((), dtype=z.dtype, device=z.device))
    out_clean = csl_kernels.residual_features(clean, **masks(ign), backend=fused_backend)
    for a, b in zip(out, out_clean, strict=True):
        assert torch.equal(a.cpu()[keep], b.cpu()[keep])


def test_all_ignored_and_empty(fused_backend):
    device = require_backend(OP, fused_backend)
    z, _ = make_logits(1, batch=2, classes=4, height=3, width=5, device=device)
    for ign in (torch.full((2, 3, 5), 255, device=device), torch.zeros(2, 3, 5, dtype=torch.bool, device=device)):
        assert_invalid_zero(csl_kernels.residual_features(z, **masks(ign), backend=fused_backend),
                            torch.zeros(2, 3, 5, dtype=torch.bool))
    f0, v, label = csl_kernels.residual_features(torch.randn(2, 4, 0, 3, device=device), backend=fused_backend)
    assert f0.shape == v.shape == label.shape == (2, 0, 3)


@pytest.mark.parametrize("classes", [2, 3, 21, 33, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_even_residual(fused_backend, classes, dtype):
    """Residual mass spread evenly: v = 0 up to the rounding of the mean of equal values (|v| ~ eps^2 r; the
    E[x^2] - m^2 shortcut would leave ~eps r), and exactly 0 for C = 2."""
    device = require_backend(OP, fused_backend)
    z = torch.zeros(1, classes, 2, 3, dtype=dtype)
    z[0, 1, 0] = torch.tensor([0.5, 4.0, 30.0], dtype=dtype)  # the max is not class 0 in the first row
    z[0, 0, 1] = torch.tensor([0.0, 9.0, 80.0], dtype=dtype)  # column 0: all classes tie, label 0
    z = z.to(device)
    f0, v, label = csl_kernels.residual_features(z, backend=fused_backend)
    assert label.cpu().tolist() == [[[1, 1, 1], [0, 0, 0]]]
    if classes == 2:
        assert torch.equal(v.cpu(), torch.zeros_like(v.cpu()))
    bound = 1e-9 if dtype == torch.float32 else 1e-25
    assert (v.cpu().double().abs() <= bound * residual_mass64(z)).all()
    assert_features_match((f0, v, label), reference64(z, None), z)


@pytest.mark.parametrize("noise", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("classes", [3, 21, 150])
def test_near_even_residual(fused_backend, noise, classes):
    """Residuals spread almost evenly: var << m^2, where the E[x^2] - m^2 shortcut loses every digit."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(classes)
    z = torch.randn(2, classes, 3, 4, generator=g, dtype=torch.float64) * noise
    z[:, 1] += torch.linspace(0.5, 20.0, 12, dtype=torch.float64).view(1, 3, 4)
    z = z.float().to(device)
    assert_features_match(csl_kernels.residual_features(z, backend=fused_backend), reference64(z, None), z)


@pytest.mark.parametrize("classes", [2, 21, 150])
def test_one_class_wins_by_a_moderate_gap(fused_backend, classes):
    """One class leads every pixel by 0.5-3.5 (R small but not 0: v is not trivially 0 where C > 2), in float32 and
    float64."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(classes)
    z = torch.randn(2, classes, 5, 6, generator=g, dtype=torch.float64)
    k = classes // 2
    z[:, k] = z.amax(dim=1) + 0.5 + 3 * torch.rand(2, 5, 6, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        zd = z.to(dtype).to(device)
        out = csl_kernels.residual_features(zd, backend=fused_backend)
        assert_features_match(out, reference64(zd, None), zd)
        assert (out.label.cpu() == k).all()
        assert (out.v.cpu() < 0).all() if classes > 2 else (out.v.cpu() == 0).all()  # one residual: no spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits(fused_backend, dtype):
    """Huge logits and gaps (exp underflows, R = 0): f0 = 1 (log: 0) exactly; one class wins every pixel of image 0."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(9)
    big = 6.0e4 if dtype == torch.float16 else 1.0e6
    z = (torch.randn(2, 150, 3, 4, generator=g, dtype=torch.float64) * big / 8).clamp(-big / 2, big / 2)
    z[0, 17] = big
    z = z.to(dtype).to(device)
    for confidence in ("prob", "log"):
        out = csl_kernels.residual_features(z, confidence=confidence, backend=fused_backend)
        assert_features_match(out, reference64(z, None, confidence), z)
        assert (out[2][0].cpu() == 17).all()
        assert torch.equal(out[0][0].cpu(), torch.full((3, 4), 1.0 if confidence == "prob" else 0.0))


def torch_low_precision(z: torch.Tensor, confidence: str):
    """PyTorch's own computation of (f0, v) in the logits' dtype (softmax, max, residual statistics)."""
    c = z.shape[1]
    p = torch.softmax(z, dim=1)
    pmax, label = p.max(dim=1)
    f0 = torch.log_softmax(z, dim=1).max(dim=1).values if confidence == "log" else pmax
    is_max = torch.arange(c, device=z.device).view(1, c, 1, 1) == label.unsqueeze(1)
    p_res = p.masked_fill(is_max, 0)
    r = p_res.sum(dim=1)
    m = r / (c - 1)
    dev = (p_res - m.unsqueeze(1)).masked_fill(is_max, 0)
    var = (dev * dev).sum(dim=1) / (c - 1)
    v = -((c - 1) ** 2 / (2 * (r + 1e-8))) * var
    return f0, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(4))
def test_low_precision_error_at_most_twice_pytorch(fused_backend, dtype, seed):
    device = require_backend(OP, fused_backend)
    classes = (2, 21, 150, 40)[seed]
    # Moderate logits: PyTorch's own float16 residual (r) must not underflow to 0, or its v is NaN.
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(2, classes, 5, 7, generator=g) * 2).to(dtype).to(device)
    if seed % 2:
        z = z.contiguous(memory_format=torch.channels_last)
    for confidence in ("prob", "log"):
        f0, v, _ = csl_kernels.residual_features(z, confidence=confidence, backend=fused_backend)
        r0, rv, _ = reference64(z, None, confidence)
        t0, tv = torch_low_precision(z, confidence)
        assert torch.isfinite(t0).all() and torch.isfinite(tv).all()  # the yardstick itself is meaningful
        for ours, theirs, ref in ((f0, t0, r0), (v, tv, rv)):
            err = (ours.cpu().double() - ref).abs().max().item()
            torch_err = (theirs.cpu().double() - ref).abs().max().item()
            assert err <= 2 * torch_err, (confidence, err, torch_err)


@pytest.mark.parametrize("shape", [(2, 21, 33, 65), (1, 150, 9, 11)])
def test_bitwise_deterministic(fused_backend, shape):
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, ign = make_logits(3, batch=b, classes=c, height=h, width=w, ignore="bool", p_nonfinite=0.05, device=device)
    first = csl_kernels.residual_features(z, **masks(ign), confidence="log", backend=fused_backend)
    second = csl_kernels.residual_features(z, **masks(ign), confidence="log", backend=fused_backend)
    for a, b_ in zip(first, second, strict=True):
        assert torch.equal(a, b_)


def test_reference_matches_direct_float64_formulas():
    """The reference itself against the spec's formulas written out naively in float64 (moderate logits)."""
    z, ign = make_logits(4, batch=2, classes=7, height=4, width=5, dtype=torch.float64, scale=1.0, ignore="bool")
    f0, v, label = csl_kernels.residual_features(z, **masks(ign), backend="reference")
    p = torch.softmax(z, dim=1)
    pmax, lab = p.max(dim=1)
    others = p.masked_fill(torch.arange(7).view(1, 7, 1, 1) == lab.unsqueeze(1), float("nan"))
    r = 1 - pmax
    var = ((others - (r / 6).unsqueeze(1)) ** 2).nansum(dim=1) / 6
    v_direct = -(36 / (2 * (r + 1e-8))) * var
    keep = ign
    torch.testing.assert_close(f0[keep], pmax[keep], rtol=1e-12, atol=0)
    torch.testing.assert_close(v[keep], v_direct[keep], rtol=1e-9, atol=1e-15)
    assert torch.equal(label[keep], lab[keep])
    f0_log, v_log, _ = csl_kernels.residual_features(z, **masks(ign), confidence="log", backend="reference")
    torch.testing.assert_close(f0_log[keep], torch.log_softmax(z, dim=1).amax(dim=1)[keep], rtol=1e-12, atol=0)
    assert torch.equal(v_log, v)  # the confidence feature does not change the dispersion
    # Supplementary Sec. E.1: [0.5, 0.5, 0, ...] must rank below [0.5, 0.01, ..., 0.01] in v.
    probs = torch.tensor([[0.5, 0.5] + [1e-12] * 49, [0.5] + [0.01] * 50], dtype=torch.float64)
    _, v_pair, _ = csl_kernels.residual_features(probs.log().view(2, 51, 1, 1), backend="reference")
    assert v_pair[0].item() < v_pair[1].item() <= 0


def test_triton_custom_op_registration_and_compile():
    device = require_backend(OP, "triton")
    from csl_kernels.triton.residual_features import residual_features_triton

    z, ign = make_logits(5, batch=2, classes=5, height=3, width=4, ignore="bool", device=device)
    op = torch.ops.csl_triton.residual_features.default
    torch.library.opcheck(op, (z, ign, False))
    torch.library.opcheck(op, (z.double().contiguous(memory_format=torch.channels_last), None, True))
    compiled = torch.compile(lambda x: residual_features_triton(x, ign, True)[1] * 2, fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(z), residual_features_triton(z, ign, True)[1] * 2)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda z: (z[0], None, {}), ValueError, "logits"),
        (lambda z: (z.long(), None, {}), TypeError, "logits"),
        (lambda z: (z.numpy(), None, {}), TypeError, "logits"),
        (lambda z: (z[:, :1], None, {}), ValueError, "at least 2 classes"),
        (lambda z: (z, torch.zeros(2, 4, 4, dtype=torch.long), {}), ValueError, "ignore"),
        (lambda z: (z, torch.zeros(2, 4, 5), {}), TypeError, "ignore"),
        (lambda z: (z, [[0]], {}), TypeError, "ignore"),
        (lambda z: (z, None, {"confidence": "logit"}), ValueError, "confidence"),
        (lambda z: (z, None, {"backend": "gpu"}), ValueError, "unknown backend .gpu."),
    ],
)
def test_bad_input_errors(make, error, match):
    z, ign, kwargs = make(torch.randn(2, 3, 4, 5))
    with pytest.raises(error, match=match):
        csl_kernels.residual_features(z, **masks(ign), **kwargs)


MASKED_OPS = {
    "residual_features": lambda z, **kw: csl_kernels.residual_features(z, **kw, backend="reference"),
    "pcos_weights": lambda z, **kw: csl_kernels.pcos_weights(z, **kw, backend="reference"),
    "threshold_weights": lambda z, **kw: csl_kernels.threshold_weights(z, **kw, tau=0.5, backend="reference"),
    "selection_scores": lambda z, **kw: csl_kernels.selection_scores(z, **kw, score="margin"),
    "weighted_cross_entropy": lambda z, **kw: csl_kernels.weighted_cross_entropy(
        z, z.argmax(1), torch.ones(z.shape[0], *z.shape[2:]), **kw, backend="reference"),
}


@pytest.mark.parametrize("op", sorted(MASKED_OPS))
def test_valid_keyword_and_the_refused_bool_ignore(op):
    """A bool mask goes in as valid= (True = valid), an integer map as ignore= (255 = ignored); a bool ignore= is
    refused (True could mean either); both at once is an error."""
    call = MASKED_OPS[op]
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, 3, 5, generator=g) * 3
    valid = torch.rand(2, 3, 5, generator=g) > 0.3
    ignore = torch.where(valid, 1, 255)
    expected = call(z, ignore=ignore)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = call(z, valid=valid)
    with pytest.raises(TypeError, match=r"ignore is a bool tensor, which is ambiguous: .*valid=ignore_mask != 255"):
        call(z, ignore=valid)
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (expected, got)), strict=True):
        if a is not None:
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert not torch.equal(call(z, valid=valid)[0] if op != "weighted_cross_entropy" else call(z, valid=valid),
                           call(z, valid=None)[0] if op != "weighted_cross_entropy" else call(z, valid=None))
    with pytest.raises(ValueError, match="not both"):
        call(z, ignore=ignore, valid=valid)
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        call(z, valid=ignore)
    with pytest.raises(ValueError, match="valid must have shape"):
        call(z, valid=valid[:, :2])


def test_one_pixel_wide_slice(fused_backend):
    """A W = 1 slice of a wider tensor (its W stride is not its H stride): the pixels lie along the H stride."""
    device = require_backend(OP, fused_backend)
    z = (torch.randn(2, 5, 4, 6, generator=torch.Generator().manual_seed(13)) * 3).to(device)[..., 2:3]
    got = csl_kernels.residual_features(z, backend=fused_backend)
    ref = csl_kernels.residual_features(z, backend="reference")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
