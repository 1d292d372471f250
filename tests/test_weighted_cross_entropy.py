"""weighted_cross_entropy: every fused backend against the float64 reference (loss and gradient).

Random seeded cases over sizes, C in {2, 21, 150}, dtypes, layouts, ignore masks and zero weights; adversarial cases
(odd sizes, non-contiguous, all ignored, non-finite logits and bad labels on unused pixels, huge logits, one class);
float64 gradcheck; the low-precision rule (error <= 2x PyTorch's own F.cross_entropy in that dtype); determinism.
"""

from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED_BACKENDS, child_limit, layout, masks, require_backend, skip_or_fail, spy_constexpr

import csl_kernels
from csl_kernels._checks import valid_mask
from csl_kernels.weighted_cross_entropy import weighted_cross_entropy_reference

OP = "weighted_cross_entropy"


def make_case(seed: int, *, batch: int, classes: int, height: int, width: int, dtype: torch.dtype,
              ignore: str = "bool", p_ignore: float = 0.2, p_zero: float = 0.2, scale: float = 3.0,
              label_dtype: torch.dtype = torch.int64, poison: bool = True, kind: str = "contiguous",
              device: torch.device | str = "cpu"):
    """``(logits, label, weight, ignore)``; unused pixels (ignored or weight 0) get poisoned logits and labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, classes, height, width, generator=g, dtype=torch.float64) * scale
    z = z + torch.randn(batch, classes, 1, 1, generator=g, dtype=torch.float64) * scale  # class offsets
    label = torch.randint(0, classes, (batch, height, width), generator=g)
    weight = torch.rand(batch, height, width, generator=g) * 2
    weight[torch.rand(batch, height, width, generator=g) < p_zero] = 0
    valid = torch.rand(batch, height, width, generator=g) >= p_ignore
    unused = ~valid | (weight == 0)
    if poison:
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64)
        pick = torch.randint(0, 3, z.shape, generator=g)
        z = torch.where(unused.unsqueeze(1) & (torch.rand(z.shape, generator=g) < 0.5), bad[pick], z)
        bad_label = 255 if label_dtype == torch.uint8 else (-1 if seed % 2 else classes)
        label = torch.where(unused & ~valid, torch.full_like(label, bad_label), label)
    if ignore == "none":
        ign = None
        z = torch.where(~valid.unsqueeze(1), z.nan_to_num(0.0, 0.0, 0.0), z)  # every pixel is valid then
        label = label.clamp(0, classes - 1)
    elif ignore == "bool":
        ign = valid
    else:
        ign = torch.where(valid, label.clamp(0, classes - 1), 255).to(torch.uint8 if ignore == "uint8" else torch.int64)
    z = layout(z.to(dtype).to(device), kind)
    label = layout(label.to(label_dtype).to(device), kind)
    weight = layout(weight.to(device), kind)
    ign = None if ign is None else layout(ign.to(device), kind)
    return z, label, weight, ign


def reference64(z, label, weight, ign, grad_scale: float = 1.0):
    """float64 reference loss and gradient on the (upcast) same logits."""
    z64 = z.detach().double().requires_grad_()
    loss = weighted_cross_entropy_reference(z64, label, weight, valid_mask(z64, **masks(ign)))
    (loss * grad_scale).backward()
    return loss.detach(), z64.grad


def run(backend, z, label, weight, ign, grad_scale: float = 1.0):
    z = z.detach().clone().requires_grad_()
    loss = csl_kernels.weighted_cross_entropy(z, label, weight, **masks(ign), backend=backend)
    (loss * grad_scale).backward()
    return loss.detach(), z.grad


def unused_mask(z, weight, ign) -> torch.Tensor:
    valid = valid_mask(z, **masks(ign))
    used = weight != 0 if valid is None else valid & (weight != 0)
    return (~used).unsqueeze(1).expand_as(z)


def assert_matches(loss, grad, ref_loss, ref_grad, z, weight, ign):
    if z.dtype == torch.float64:
        rtol, atol = 1e-12, 1e-14
    else:
        rtol, atol = 1e-5, 1e-6
    assert loss.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert loss.shape == ()
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=rtol, atol=atol)
    assert grad.dtype == z.dtype and grad.shape == z.shape
    # softmax(z) = exp((z - max) - log1p(rest)) carries an absolute error of a few ulp(|z|), times the pixel's
    # w / N_valid.
    unused = unused_mask(z, weight, ign)
    eps = torch.finfo(torch.float64 if z.dtype == torch.float64 else torch.float32).eps
    z_max = float(z.detach()[~unused].abs().max()) if (~unused).any() else 0.0
    n_valid = max(int(valid_mask(z, **masks(ign)).sum()) if ign is not None else weight.numel(), 1)
    coef = float(weight.abs().max()) / n_valid if weight.numel() else 0.0
    atol_grad = 16 * eps * max(1.0, z_max) * coef
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=0, atol=atol_grad)
    # Unused pixels: exactly zero gradient (not merely small), whatever their logits.
    assert torch.equal(grad[unused], torch.zeros_like(grad[unused]))


RANDOM_SEEDS = range(150)


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_cases_match_float64_reference(fused_backend, seed):
    device = require_backend(OP, fused_backend)
    rng = random.Random(seed)
    classes = rng.choice((2, 5, 11, 21, 21, 150))  # class tiles of 2-64; 11: CamVid
    side = 6 if classes == 150 else 16
    case = dict(batch=rng.randint(1, 2), classes=classes, height=rng.randint(1, side), width=rng.randint(1, side),
                dtype=rng.choice((torch.float32, torch.float32, torch.float64)),
                ignore=rng.choice(("none", "bool", "int64", "uint8")), p_ignore=rng.choice((0.0, 0.2, 0.6)),
                p_zero=rng.choice((0.0, 0.3)), scale=rng.choice((0.5, 3.0, 10.0)),
                label_dtype=rng.choice((torch.int64, torch.int32, torch.uint8)),
                kind=rng.choice(("contiguous", "channels_last", "transposed", "strided", "class_slice", "batch_slice")),
                device=device)
    z, label, weight, ign = make_case(seed, **case)
    loss, grad = run(fused_backend, z, label, weight, ign)
    ref_loss, ref_grad = reference64(z, label, weight, ign)
    assert_matches(loss, grad, ref_loss, ref_grad, z, weight, ign)


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 21, 1, 1), (1, 2, 7, 13), (2, 21, 7, 13), (1, 150, 7, 13),
                                   (1, 21, 65, 129), (1, 3, 65, 129)])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided", "transposed", "class_slice", "batch_slice"])
def test_odd_sizes_and_layouts(fused_backend, shape, kind):
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, label, weight, ign = make_case(sum(shape), batch=b, classes=c, height=h, width=w, dtype=torch.float32,
                                      kind=kind, device=device)
    loss, grad = run(fused_backend, z, label, weight, ign)
    assert_matches(loss, grad, *reference64(z, label, weight, ign), z, weight, ign)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_ignored_or_zero_weight_gives_exact_zeros(fused_backend, dtype):
    device = require_backend(OP, fused_backend)
    z = torch.full((2, 5, 4, 3), float("nan"), dtype=dtype, device=device)
    label = torch.full((2, 4, 3), 255, device=device)
    weight = torch.rand(2, 4, 3, device=device)
    for ign in (torch.full((2, 4, 3), 255, device=device), torch.zeros(2, 4, 3, dtype=torch.bool, device=device)):
        loss, grad = run(fused_backend, z, label, weight, ign)
        assert loss.item() == 0.0 and not torch.signbit(loss)
        assert torch.equal(grad, torch.zeros_like(grad))
    # Every pixel valid but every weight 0: still exactly 0 (N_valid > 0 now).
    loss, grad = run(fused_backend, z, label, torch.zeros_like(weight), None)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_empty_input(fused_backend):
    device = require_backend(OP, fused_backend)
    z = torch.randn(2, 4, 0, 5, device=device)
    label = torch.zeros(2, 0, 5, dtype=torch.long, device=device)
    loss, grad = run(fused_backend, z, label, torch.ones(2, 0, 5, device=device), None)
    assert loss.item() == 0.0 and grad.shape == z.shape


@pytest.mark.parametrize("classes", [2, 21, 150])
def test_non_finite_logits_and_bad_labels_on_unused_pixels(fused_backend, classes):
    device = require_backend(OP, fused_backend)
    z, label, weight, ign = make_case(classes, batch=2, classes=classes, height=5, width=7, dtype=torch.float32,
                                      p_ignore=0.4, p_zero=0.3, device=device)
    unused = unused_mask(z, weight, ign)
    assert not torch.isfinite(z[unused]).all()  # the case really is poisoned
    loss, grad = run(fused_backend, z, label, weight, ign)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Same loss as with the poison replaced by harmless values.
    clean = torch.where(unused, torch.zeros_like(z), z)
    ref_loss, ref_grad = reference64(clean, label.clamp(0, classes - 1), weight, ign)
    assert_matches(loss, grad, ref_loss, ref_grad, z, weight, ign)


# the cpu backend's check is a TORCH_CHECK in the extension; the others say it on the device (an assert or a NaN)
@pytest.mark.parametrize("fused_backend", [pytest.param(b, marks=pytest.mark.cpp_error_path) if b == "cpu" else b
                                           for b in FUSED_BACKENDS])
def test_used_pixel_with_out_of_range_label(fused_backend):
    device = require_backend(OP, fused_backend)
    z = torch.randn(1, 3, 2, 2, device=device)
    label = torch.tensor([[[0, 1], [2, 3]]], device=device)  # 3 is outside [0, 3) on a used pixel
    weight = torch.ones(1, 2, 2, device=device)
    if fused_backend == "cuda":  # a device-side assert poisons the process's CUDA context: run it in a subprocess
        import subprocess
        import sys

        code = ("import torch, csl_kernels\n"
                "z = torch.randn(1, 3, 2, 2, device='cuda', requires_grad=True)\n"
                "label = torch.tensor([[[0, 1], [2, 3]]], device='cuda')\n"
                "loss = csl_kernels.weighted_cross_entropy(z, label, torch.ones(1, 2, 2, device='cuda'), "
                "backend='cuda')\n"
                "loss.backward()\n"
                "torch.cuda.synchronize()\n"
                "print('finished', bool(loss.isnan()), bool(z.grad[0, :, 1, 1].isnan().all()))\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=child_limit(300))
        if proc.returncode == 0:  # a build with device asserts compiled out: NaN, as the Triton kernels give
            assert "finished True True" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        else:  # the device assert's text is printed by the device (stdout) and named in the error (stderr); an
            # illegal memory access or any other crash says neither
            said = proc.stdout + proc.stderr
            assert "label out of range" in said or "device-side assert triggered" in said, (
                proc.stdout[-1000:] + proc.stderr[-2000:])
        return
    if fused_backend == "triton":  # no host synchronisation: the loss says it with a NaN
        loss, grad = run(fused_backend, z, label, weight, None)
        assert torch.isnan(loss)
        assert torch.isnan(grad[0, :, 1, 1]).all() and torch.isfinite(grad[0, :, :1]).all()
    else:
        with pytest.raises(RuntimeError, match="outside"):
            run(fused_backend, z, label, weight, None)


def test_triton_negative_label_on_a_used_pixel_is_nan():
    """A used pixel's label below 0 is out of range as one >= C is: the loss and the pixel's gradient row are NaN,
    not a loss without the label term (-1 matches no class, so the gathered logit would silently be 0)."""
    device = require_backend(OP, "triton")
    z = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0)).to(device)
    label = torch.tensor([[[0, 1], [2, -1]]], device=device)
    weight = torch.ones(1, 2, 2, device=device)
    loss, grad = run("triton", z, label, weight, None)
    assert torch.isnan(loss)
    assert torch.isnan(grad[0, :, 1, 1]).all() and torch.isfinite(grad[0, :, :1]).all()


def test_reference_names_an_out_of_range_label_as_the_cpu_backend_does():
    z = torch.randn(1, 3, 2, 2)
    label = torch.tensor([[[0, 1], [2, 7]]])
    with pytest.raises(RuntimeError, match=r"^weighted_cross_entropy: label 7 of a used pixel is outside \[0, 3\)$"):
        csl_kernels.weighted_cross_entropy(z, label, torch.ones(1, 2, 2), backend="reference")
    weight = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # the pixel unused: no error, and no contribution
    loss = csl_kernels.weighted_cross_entropy(z, label, weight, backend="reference")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_huge_logits_and_minus_inf_classes(fused_backend, dtype):
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(1, 150, 3, 5, generator=g, dtype=torch.float64) * 1.0e4).clamp(-6.0e4, 6.0e4)
    z[:, :64] = float("-inf")  # a whole first class tile of -inf (the online log-sum-exp must not make NaN)
    z[:, 100, 0, 0] = float("-inf")  # and one -inf among finite logits
    label = torch.randint(64, 150, (1, 3, 5), generator=g)
    label[0, 0, 0] = 101
    z = z.to(dtype).to(device)
    label, weight = label.to(device), torch.ones(1, 3, 5, device=device)
    loss, grad = run(fused_backend, z, label, weight, None)
    ref_loss, ref_grad = reference64(z, label, weight, None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=0, atol=float(ref_grad.abs().max()) * 1e-2)
    assert torch.equal(grad[:, :64], torch.zeros_like(grad[:, :64]))


def test_one_class_everywhere(fused_backend):
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 21, 6, 5, generator=g)
    z[:, 7] += 8.0  # one class dominates every pixel: small per-pixel CE
    label = torch.full((2, 6, 5), 7)
    z, label, weight = z.to(device), label.to(device), torch.rand(2, 6, 5, generator=g).to(device)
    loss, grad = run(fused_backend, z, label, weight, None)
    ref_loss, ref_grad = reference64(z, label, weight, None)
    assert 0 < loss.item() < 0.05
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=1e-4, atol=0)
    assert_matches(loss, grad, ref_loss, ref_grad, z, weight, None)


@pytest.mark.parametrize("layout", ["one image", "three images"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
def test_pixel_terms_are_added_in_float64(backend, layout):
    """The pixels' loss terms are added in float64, within a block of pixels as across blocks and images: pixels 0
    and 2 (the same logits and label, weights 1e8 and -1e8) cancel exactly and leave pixel 1's term, which a float32
    running sum loses (1e8 * CE + CE_1 rounds to 1e8 * CE in float32) and gives 0."""
    device = require_backend(OP, backend)
    z = torch.tensor([[0.3, -0.4], [1.1, 0.2], [0.3, -0.4]], dtype=torch.float32)
    label = torch.tensor([1, 0, 1])
    weight = torch.tensor([1e8, 1.0, -1e8], dtype=torch.float32)
    if layout == "one image":  # one 1 x 3 image: one program of every backend
        z, label, weight = z.t().reshape(1, 2, 1, 3), label.view(1, 1, 3), weight.view(1, 1, 3)
    else:
        z, label, weight = z.view(3, 2, 1, 1), label.view(3, 1, 1), weight.view(3, 1, 1)
    z, label, weight = z.to(device), label.to(device), weight.to(device)
    loss, grad = run(backend, z, label, weight, None)
    ref_loss, ref_grad = reference64(z, label, weight, None)
    assert ref_loss > 0.1
    assert_matches(loss, grad, ref_loss, ref_grad, z, weight, None)


def test_triton_partial_sums_are_reduced_block_by_block(monkeypatch):
    """The loss adds the forward programs' partial sums and counts REDUCE_BLOCK at a time (1024: a batch needs more
    programs than that to reach a second block, too slow for the interpreter): with blocks of 4, the 6 programs of
    3 images fill a block and part of the next, whose sums and counts count too."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import weighted_cross_entropy as module

    monkeypatch.setattr(module, "REDUCE_BLOCK", 4)
    z, label, weight, ign = make_case(8, batch=3, classes=21, height=7, width=13, dtype=torch.float32, device=device)
    assert module._plan("forward", module.DEFAULT_CONFIG, z, ign).n_parts == 6
    loss, grad = run("triton", z, label, weight, ign)
    assert_matches(loss, grad, *reference64(z, label, weight, ign), z, weight, ign)


def test_grad_output_scaling(fused_backend):
    device = require_backend(OP, fused_backend)
    z, label, weight, ign = make_case(11, batch=2, classes=21, height=6, width=5, dtype=torch.float32, device=device)
    loss, grad = run(fused_backend, z, label, weight, ign, grad_scale=-3.5)
    assert_matches(loss, grad, *reference64(z, label, weight, ign, grad_scale=-3.5), z, weight, ign)


@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
def test_weights_are_constants(backend):
    """A weight that requires grad is refused on every backend (the fused ones would drop its gradient, the
    reference would return it: which one ran would decide); detached, the same weights train the logits."""
    device = require_backend(OP, backend)
    z, label, weight, ign = make_case(12, batch=1, classes=5, height=4, width=4, dtype=torch.float32, device=device)
    z = z.detach().clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    with pytest.raises(RuntimeError, match=r"weight requires grad.*weight\.detach\(\)"):
        csl_kernels.weighted_cross_entropy(z, label, weight, **masks(ign), backend=backend)
    csl_kernels.weighted_cross_entropy(z, label, weight.detach(), **masks(ign), backend=backend).backward()
    assert weight.grad is None
    z64 = z.detach().cpu().double().requires_grad_()
    ign64 = None if ign is None else ign.cpu()
    csl_kernels.weighted_cross_entropy(z64, label.cpu(), weight.detach().cpu().double(), **masks(ign64),
                                       backend="reference").backward()
    torch.testing.assert_close(z.grad.cpu().double(), z64.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: nothing to differentiate, nothing refused
        csl_kernels.weighted_cross_entropy(z, label, weight, **masks(ign), backend=backend)


def test_reference_float64_gradcheck():
    z, label, weight, ign = make_case(1, batch=2, classes=4, height=3, width=3, dtype=torch.float64, poison=False)
    valid = valid_mask(z, **masks(ign))
    z = z.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: weighted_cross_entropy_reference(x, label, weight, valid), (z,))


def test_float64_gradcheck(fused_backend):
    device = require_backend(OP, fused_backend)
    z, label, weight, ign = make_case(2, batch=1, classes=4, height=2, width=3, dtype=torch.float64, poison=False,
                                      p_ignore=0.3, p_zero=0.2, device=device)
    z = z.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: csl_kernels.weighted_cross_entropy(x, label, weight, **masks(ign), backend=fused_backend), (z,))


def torch_low_precision(z, label, weight, ign):
    """PyTorch's own computation, as a training loss writes it (UniMatch's): F.cross_entropy in the logits' dtype,
    times the float32 weights (which promotes the product to float32), summed in float32. Only the per-pixel
    cross-entropy and its gradient are computed in the low-precision dtype: the yardstick does not count the
    rounding of the scalar loss to that dtype, which no fused backend does."""
    valid = valid_mask(z, **masks(ign))
    used = valid & (weight != 0)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    ce = F.cross_entropy(torch.where(used.unsqueeze(1), z, zero), torch.where(used, label.long(), 0),
                         reduction="none")
    weighted = weight.float() * ce
    assert weighted.dtype == torch.float32
    return torch.where(used, weighted, 0.0).sum() / valid.sum().clamp_min(1)


def assert_within_twice_pytorch(backend, z, label, weight, ign) -> torch.Tensor:
    """The low-precision rule: the backend's loss and gradient error (vs float64) <= 2x PyTorch's own
    (:func:`torch_low_precision`) in the logits' dtype. Returns the backend's gradient."""
    ref_loss, ref_grad = reference64(z, label, weight, ign)
    loss, grad = run(backend, z, label, weight, ign)
    zt = z.detach().clone().requires_grad_()
    torch_loss = torch_low_precision(zt, label, weight, ign)
    torch_loss.backward()
    loss_err = abs(loss.double().cpu() - ref_loss.cpu()).item()
    torch_loss_err = abs(torch_loss.detach().double().cpu() - ref_loss.cpu()).item()
    grad_err = (grad.double() - ref_grad).abs().max().item()
    torch_grad_err = (zt.grad.double() - ref_grad).abs().max().item()
    assert loss_err <= 2 * torch_loss_err, (loss_err, torch_loss_err)
    assert grad_err <= 2 * torch_grad_err, (grad_err, torch_grad_err)
    return grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(6))
def test_low_precision_error_at_most_twice_pytorch(fused_backend, dtype, seed):
    """Loss and gradient error (vs float64) <= 2x PyTorch's own in that dtype, in every layout; seeds 3-5 also put
    NaN / inf logits and out-of-range labels on unused pixels, whose gradient must stay exactly 0."""
    device = require_backend(OP, fused_backend)
    classes = (2, 21, 150)[seed % 3]
    h, w = (5, 6) if classes == 150 else (9, 11)
    kind = ("contiguous", "channels_last", "transposed", "strided", "class_slice", "batch_slice")[seed]
    z, label, weight, ign = make_case(seed, batch=2, classes=classes, height=h, width=w, dtype=dtype,
                                      ignore="int64", scale=4.0, poison=seed >= 3, kind=kind, device=device)
    grad = assert_within_twice_pytorch(fused_backend, z, label, weight, ign)
    assert grad.dtype == dtype
    used = valid_mask(z, **masks(ign)) & (weight != 0)
    assert not grad.cpu().movedim(1, -1)[~used.cpu()].any()  # NaN would count as non-zero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_confident_pseudo_labels_error_at_most_twice_pytorch(fused_backend, dtype):
    """The low-precision rule on what pseudo-labels are: the label is the argmax, its logit 8-20 above the others
    (a trained model's confident pixels), where the loss per pixel is 1e-4 to 1e-9. With a float32 lse = max +
    log1p(rest), CE = lse - z_y and exp(z - lse) were rounded to an ulp of the max (~2e-6 at 20): up to 24x PyTorch's
    error in float32 / float16; the log-sum-exp kept in its two parts (csrc/csl_ce.h) keeps them as exact as
    (z - max) - log(sum)."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 5, 4, 6, generator=g)
    gap = torch.linspace(8.0, 20.0, 24).view(1, 4, 6)
    z[:, 0] = z[:, 1:].amax(dim=1) + gap
    z = z.to(dtype).to(device)
    label = torch.zeros(1, 4, 6, dtype=torch.long, device=device)
    weight = torch.ones(1, 4, 6, device=device)
    ign = torch.zeros(1, 4, 6, dtype=torch.long, device=device)  # every pixel valid
    assert_within_twice_pytorch(fused_backend, z, label, weight, ign)


@pytest.mark.parametrize(("dtype", "logits"), [
    # One float holding max + log1p(rest) would lose these CEs: a loss of 0 and a label gradient of 0 (float64), the
    # softmax 1 at every class (float32, bfloat16)
    (torch.float64, [1031.0, 1000.0]),  # CE 3.4e-14
    (torch.float32, [1e17, 1e17]),  # CE log 2
    (torch.bfloat16, [-3e38, -3e38, -3e38]),  # CE log 3
])
def test_cross_entropy_stays_exact_at_logits_far_larger_than_it(fused_backend, dtype, logits):
    """Spec Sec. 5's precision rule (as exact as PyTorch's F.cross_entropy, whose (z - max) - log(sum) keeps the max
    apart from the log of the sum) where the logits' magnitude is far above the CE: the loss and gradient of one pixel
    labelled with its max class, against their exact values (log1p of the rest, softmax - onehot), to a few ulp of 1
    in the computation's dtype (F.cross_entropy meets them, but for its loss rounded to bfloat16)."""
    device = require_backend(OP, fused_backend)
    z = torch.tensor(logits, dtype=torch.float64).view(1, -1, 1, 1).to(dtype).to(device)
    label = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
    weight = torch.ones(1, 1, 1, device=device)
    loss, grad = run(fused_backend, z, label, weight, None)
    shifted = [math.exp(v - z.double()[0, 0].item()) for v in z.double().flatten().tolist()]  # exp(z_k - z_y)
    rest = sum(shifted[1:])
    expected = torch.tensor([shifted[0] / (1 + rest) - 1] + [e / (1 + rest) for e in shifted[1:]],
                            dtype=torch.float64).view_as(z)
    loss_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(loss.item(), math.log1p(rest), rtol=0, atol=4 * loss_eps)
    torch.testing.assert_close(grad.double().cpu(), expected, rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_bfloat16_gradient_is_rounded_to_nearest_not_truncated(fused_backend):
    """A bfloat16 gradient is the float32 one rounded to nearest (ties to even), as torch rounds, not truncated (as
    the Triton interpreter's own float32 -> bfloat16 cast does): nearly every element equals the float64 reference
    gradient rounded to bfloat16, where truncation leaves about half of them one unit in the last place towards 0."""
    device = require_backend(OP, fused_backend)
    z, label, weight, ign = make_case(4, batch=2, classes=21, height=9, width=11, dtype=torch.bfloat16,
                                      ignore="bool", device=device)
    _, ref_grad = reference64(z, label, weight, ign)
    _, grad = run(fused_backend, z, label, weight, ign)
    assert grad.dtype == torch.bfloat16
    used = ~unused_mask(z, weight, ign).cpu()
    same = grad.cpu()[used] == ref_grad.cpu().to(torch.bfloat16)[used]
    assert used.sum() > 2000 and same.double().mean() >= 0.99, same.double().mean()


def test_custom_op_refuses_a_weight_gradient(fused_backend):
    """Called as a custom op (as torch.compile records it), a weight that requires grad raises in backward with the
    public call's message: the op has no gradient for it, and a None there would pass for one."""
    device = require_backend(OP, fused_backend)
    namespace = torch.ops.csl_triton if fused_backend == "triton" else torch.ops.csl
    op = namespace.weighted_cross_entropy
    z, label, weight, _ = make_case(13, batch=1, classes=5, height=3, width=4, dtype=torch.float32, poison=False,
                                    device=device)
    z = z.detach().requires_grad_()
    loss = op(z, label, weight.clone().requires_grad_(), None)[0]
    with pytest.raises(RuntimeError, match=r"weight requires grad.*weight\.detach\(\)"):
        torch.autograd.grad(loss, z)
    (grad,) = torch.autograd.grad(op(z, label, weight, None)[0], z)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 21, 33, 65), (1, 150, 9, 11)])
def test_bitwise_deterministic(fused_backend, shape):
    device = require_backend(OP, fused_backend)
    b, c, h, w = shape
    z, label, weight, ign = make_case(7, batch=b, classes=c, height=h, width=w, dtype=torch.float32, device=device)
    loss1, grad1 = run(fused_backend, z, label, weight, ign)
    loss2, grad2 = run(fused_backend, z, label, weight, ign)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)


def test_triton_custom_op_registration_and_compile():
    device = require_backend(OP, "triton")
    from csl_kernels.triton.weighted_cross_entropy import weighted_cross_entropy_triton

    z, label, weight, ign = make_case(4, batch=2, classes=5, height=3, width=4, dtype=torch.float32, poison=False,
                                      device=device)
    valid = valid_mask(z, **masks(ign))
    ignore_map = torch.where(valid, 0, csl_kernels.IGNORE_INDEX).to(torch.int16)  # the other form of validity
    z = z.detach().requires_grad_()
    for v in (valid, None, ignore_map):
        torch.library.opcheck(torch.ops.csl_triton.weighted_cross_entropy, (z, label, weight, v))
    compiled = torch.compile(lambda x: weighted_cross_entropy_triton(x, label, weight, valid) * 2, fullgraph=True,
                             backend="aot_eager")
    loss_c = compiled(z)
    loss_c.backward()
    grad_c, z.grad = z.grad, None
    loss_e = weighted_cross_entropy_triton(z, label, weight, valid) * 2
    loss_e.backward()
    assert torch.equal(loss_c, loss_e) and torch.equal(grad_c, z.grad)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda z, y, w: (z[0], y, w, None), ValueError, "logits"),
        (lambda z, y, w: (z.long(), y, w, None), TypeError, "logits"),
        (lambda z, y, w: (z[:, :1], y, w, None), ValueError, "at least 2 classes"),
        (lambda z, y, w: (z, y[:, :2], w, None), ValueError, "label"),
        (lambda z, y, w: (z, y.float(), w, None), TypeError, "label"),
        (lambda z, y, w: (z, y, w.long(), None), TypeError, "weight"),
        (lambda z, y, w: (z, y, w[0], None), ValueError, "weight"),
        (lambda z, y, w: (z, y, w, y[:1]), ValueError, "ignore"),
        (lambda z, y, w: (z, y, w, w), TypeError, "ignore"),
    ],
)
def test_bad_input_errors(make, error, match):
    z, y, w = torch.randn(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long), torch.ones(2, 4, 5)
    with pytest.raises(error, match=match):
        csl_kernels.weighted_cross_entropy(*make(z, y, w), backend="reference")


def test_triton_int64_offsets_path(monkeypatch):
    """Images of >= 2^31 elements switch the kernels to int64 offsets; forced here on a small input."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import weighted_cross_entropy as module

    monkeypatch.setattr(module, "wide", lambda *tensors, **kwargs: True)
    monkeypatch.setattr(module, "_PLANS", {})  # launch plans (with WIDE) made by earlier calls of these shapes
    forward = spy_constexpr(monkeypatch, module, "_ce_forward_kernel", "WIDE")
    backward = spy_constexpr(monkeypatch, module, "_ce_backward_kernel", "WIDE")
    kinds = ("channels_last", "transposed")
    for kind in kinds:
        z, label, weight, ign = make_case(9, batch=2, classes=150, height=3, width=5, dtype=torch.float32,
                                          kind=kind, device=device)
        loss, grad = run("triton", z, label, weight, ign)
        assert_matches(loss, grad, *reference64(z, label, weight, ign), z, weight, ign)
    assert len(forward) >= len(kinds) and len(backward) >= len(kinds) and all(forward + backward)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])  # Triton: the test above (this size takes 10 s interpreted)
def test_bfloat16_gradient_is_the_float32_gradient_rounded_to_nearest_even(backend):
    """A bfloat16 input is computed in float32 (as its float32 copy is) and the gradient stored with
    round-to-nearest-even, as ``Tensor.to(torch.bfloat16)`` rounds: bit for bit, ties included (the case has some)."""
    device = require_backend(OP, backend)
    g = torch.Generator().manual_seed(21)
    z = (torch.randn(2, 21, 96, 96, generator=g) * 3).bfloat16().to(device)
    label = torch.randint(0, 21, (2, 96, 96), generator=g).to(device)
    weight = torch.rand(2, 96, 96, generator=g).to(device)
    grads = [run(backend, logits, label, weight, None)[1] for logits in (z, z.float())]
    bits = grads[1].view(torch.int32)
    assert ((bits & 0x1FFFF) == 0x8000).sum() >= 2  # exact ties whose bfloat16 rounds down to the even neighbour
    assert torch.equal(grads[0].view(torch.int16), grads[1].bfloat16().view(torch.int16))


def test_one_pixel_wide_slice(fused_backend):
    """A W = 1 slice of a wider tensor (its W stride is not its H stride): the pixels lie along the H stride."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(12)
    base = (torch.randn(2, 5, 4, 6, generator=g) * 3).to(device).requires_grad_()
    label = torch.randint(0, 5, (2, 4, 1), generator=g).to(device)
    weight = torch.rand(2, 4, 1, generator=g).to(device)
    results = []
    for backend in (fused_backend, "reference"):
        loss = csl_kernels.weighted_cross_entropy(base[..., 2:3], label, weight, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, base)))
    (loss, grad), (ref, ref_grad) = results
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert grad[..., :2].abs().sum() == 0 and grad[..., 2].abs().sum() > 0


@pytest.mark.parametrize("classes", [2, 4, 150])
@pytest.mark.parametrize("case", ["plus_inf_other_class", "plus_inf_label_class", "all_minus_inf", "nan"])
def test_non_finite_logits_agree_with_the_reference(fused_backend, case, classes):
    """+inf in a non-label logit gives an infinite loss on every backend, not NaN on one and inf on another; the
    other pixels' gradients are unchanged."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(1, classes, 3, 5, generator=g, dtype=torch.float64)
    label = torch.randint(0, classes, (1, 3, 5), generator=g)
    weight = torch.ones(1, 3, 5, dtype=torch.float64)
    other = (label[0, 1, 2] + classes - 1) % classes  # in the last class tile for C = 150 and label 0
    if case == "plus_inf_other_class":
        z[0, other, 1, 2] = float("inf")
    elif case == "plus_inf_label_class":
        z[0, label[0, 1, 2], 1, 2] = float("inf")
    elif case == "all_minus_inf":
        z[0, :, 1, 2] = float("-inf")
    else:
        z[0, other, 1, 2] = float("nan")
    ref_loss, ref_grad = run("reference", z, label, weight, None)
    # lse - z_label: +inf elsewhere -> inf (F.cross_entropy says NaN there), +inf at the label -> NaN, all -inf -> NaN
    assert {"plus_inf_other_class": torch.isposinf, "plus_inf_label_class": torch.isnan, "all_minus_inf": torch.isnan,
            "nan": torch.isnan}[case](ref_loss)
    loss, grad = run(fused_backend, z.float().to(device), label.to(device), weight.float().to(device), None)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, equal_nan=True)
    finite_pixels = torch.ones(3, 5, dtype=torch.bool)
    finite_pixels[1, 2] = False
    torch.testing.assert_close(grad.double().cpu()[0][:, finite_pixels], ref_grad[0][:, finite_pixels],
                               equal_nan=True, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_weight_poisons_its_pixel_only(fused_backend, value):
    """A non-finite weight on a valid pixel: the loss is the reference's (inf, -inf or NaN), every gradient entry of
    that pixel is non-finite (never a finite value that training would take as real), the other pixels' gradients are
    the reference's; the same weight on an ignored pixel contributes exactly 0."""
    device = require_backend(OP, fused_backend)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64)
    label = torch.randint(0, 4, (1, 3, 5), generator=g)
    weight = torch.rand(1, 3, 5, generator=g, dtype=torch.float64) + 0.5
    weight[0, 1, 2] = value
    ref_loss, ref_grad = run("reference", z, label, weight, None)
    loss, grad = run(fused_backend, z.float().to(device), label.to(device), weight.float().to(device), None)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, equal_nan=True)
    assert not torch.isfinite(loss)
    assert (~torch.isfinite(grad[0, :, 1, 2])).all()
    others = torch.ones(3, 5, dtype=torch.bool)
    others[1, 2] = False
    torch.testing.assert_close(grad.double().cpu()[0][:, others], ref_grad[0][:, others], rtol=1e-5, atol=1e-7)

    valid = torch.ones(1, 3, 5, dtype=torch.bool)
    valid[0, 1, 2] = False
    clean = weight.clone()
    clean[0, 1, 2] = 0.0
    ref_loss, ref_grad = run("reference", z, label, clean, valid)
    for backend, dtype, dev in (("reference", torch.float64, "cpu"), (fused_backend, torch.float32, device)):
        loss, grad = run(backend, z.to(dtype).to(dev), label.to(dev), weight.to(dtype).to(dev), valid.to(dev))
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(grad[0, :, 1, 2].cpu(), torch.zeros(4, dtype=dtype))


@pytest.mark.parametrize("changed", ["label", "weight", "ignore", "valid"])
@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
def test_an_input_changed_in_place_before_backward(backend, changed):
    """As the docstring says: the fused backends refuse a backward pass after any side input changed in place; the
    reference refuses it after a changed weight and otherwise returns the forward's gradient (its own copies)."""
    device = require_backend(OP, backend)
    z, label, weight, ign = make_case(3, batch=2, classes=4, height=3, width=5, dtype=torch.float32,
                                      ignore="bool" if changed == "valid" else "int64", poison=False, device=device)
    expected = run(backend, z, label, weight, ign)[1]
    logits = z.detach().clone().requires_grad_()
    loss = csl_kernels.weighted_cross_entropy(logits, label, weight, **masks(ign), backend=backend)
    with torch.no_grad():
        if changed == "label":
            label.add_(1).remainder_(4)
        elif changed == "weight":
            weight.mul_(2)
        else:
            ign.fill_(False if changed == "valid" else 255)
    if backend != "reference" or changed == "weight":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    else:
        loss.backward()
        torch.testing.assert_close(logits.grad, expected, rtol=0, atol=0)


def test_wide_decides_from_the_span_within_an_image():
    """``wide`` (int64 offsets in every Triton kernel) on meta tensors: shapes and strides without storage."""
    if importlib.util.find_spec("triton") is None:
        skip_or_fail("triton", "triton is not installed")
    from csl_kernels.triton._common import INT32_LIMIT, wide

    def strided(shape, stride):
        return torch.empty_strided(shape, stride, device="meta")

    assert not wide(torch.empty((4, 21, 512, 512), device="meta"))  # 5.5 M elements per image
    assert wide(torch.empty((1, 150, 4096, 4096), device="meta"))  # contiguous, 2.5 G elements in one image
    assert not wide(torch.empty((2**16, 2, 64, 256), device="meta"))  # 2^31 in all, 32 K per image: B is not spanned
    assert not wide(strided((2, 3, 4, 5), (INT32_LIMIT * 4, 1, 15, 3)))  # huge batch stride only
    assert wide(strided((2, 3, 4, 5), (1, INT32_LIMIT, 15, 3)))  # class stride past int32: non-contiguous path
    assert wide(strided((2, 3, 4, 5), (0, 0, 0, 1)), extra=(INT32_LIMIT,))
    assert not wide(strided((2, 3, 4, 5), (0, 0, 0, 1)), extra=(INT32_LIMIT - 1,))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_auto_timing_runs_forward_and_backward_from_a_no_grad_call(monkeypatch, mode):
    """backend='auto' on CUDA times each fused backend on the call's inputs, forward + backward; a call made under
    ``torch.no_grad()`` / ``torch.inference_mode()`` (an evaluation) must still time it and return the loss."""
    from csl_kernels import _measured

    seen = []

    def timed_impl(z, y, w, m):  # stands for a fused backend: records whether the timing run had a gradient
        loss = weighted_cross_entropy_reference(z, y, w, m)
        seen.append(loss.requires_grad)
        return loss

    def resolve(op, backend, device, key_tensor, run, timer=None):  # the measured path, as on a GPU
        run(timed_impl)
        return "reference", weighted_cross_entropy_reference

    monkeypatch.setattr(_measured, "resolve", resolve)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    label = torch.randint(0, 5, (2, 6, 7), generator=g)
    weight = torch.rand(2, 6, 7, generator=g)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        args = [t.clone() for t in (logits, label, weight)]  # inference tensors under inference_mode
        loss = csl_kernels.weighted_cross_entropy(*args)
    assert seen == [True]
    assert torch.equal(loss, weighted_cross_entropy_reference(logits, label, weight, None))


@pytest.mark.parametrize("mask", ["ignore", "valid"])
def test_reference_gives_an_exact_zero_loss_and_gradient_when_no_pixel_is_valid(mask):
    """Spec Sec. 5 / docstring: 0 when no pixel is valid (the divisor is max(N_valid, 1)); the fused backends are
    held to it by test_all_ignored_or_zero_weight_gives_exact_zeros, the reference was not (0 / 0 would be NaN)."""
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    label = torch.randint(0, 4, (2, 3, 5))
    weight = torch.rand(2, 3, 5, dtype=torch.float64)
    kwargs = ({"ignore": torch.full((2, 3, 5), 255, dtype=torch.uint8)} if mask == "ignore"
              else {"valid": torch.zeros(2, 3, 5, dtype=torch.bool)})
    loss = csl_kernels.weighted_cross_entropy(z, label, weight, **kwargs, backend="reference")
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_reference_ignores_the_labels_and_logits_of_unused_pixels():
    """Spec Sec. 5: an invalid or zero-weight pixel contributes exactly 0 whatever its logits or label, on the
    reference as on the fused backends (an out-of-range label there is no error, a NaN logit no NaN loss)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (1, 4, 4), generator=g)
    weight = torch.rand(1, 4, 4, generator=g, dtype=torch.float64) + 0.1
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0, :2] = False  # ignored pixels
    weight[0, 1, :2] = 0  # zero-weight pixels
    unused = ~valid | (weight == 0)
    clean = csl_kernels.weighted_cross_entropy(z, label, weight, valid=valid, backend="reference")
    poisoned_z = torch.where(unused.unsqueeze(1), torch.tensor(float("nan"), dtype=torch.float64), z)
    poisoned_label = torch.where(unused, torch.tensor(255), label)
    loss = csl_kernels.weighted_cross_entropy(poisoned_z.requires_grad_(), poisoned_label, weight, valid=valid,
                                              backend="reference")
    loss.backward()
    assert torch.equal(loss.detach(), clean)
    assert torch.equal(poisoned_z.grad[unused.unsqueeze(1).expand_as(z)], torch.zeros(int(unused.sum()) * 3,
                                                                                       dtype=torch.float64))
