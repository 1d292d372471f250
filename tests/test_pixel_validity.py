"""The two forms of pixel validity every backend of ``residual_features``, ``pcos_weights`` and
``weighted_cross_entropy`` takes (``csl_kernels._checks.pixel_validity``): a bool mask (True = valid) or the integer
ignore map itself (255 = ignored), which the Triton and extension kernels compare in place. Both must give bitwise the
same results on every backend, for every integer dtype a map may have and for maps that are not contiguous."""

from __future__ import annotations

import pytest
import torch

import csl_kernels
from csl_kernels import _backends
from csl_kernels._checks import IGNORE_INDEX, as_valid, pixel_validity

BACKENDS = ("reference", "triton", "cpu", "cuda")
MAP_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def _device(backend: str) -> torch.device:
    if backend == "reference":
        return torch.device("cpu")
    from conftest import require_backend

    return require_backend("pcos_weights", backend)


def _inputs(device: torch.device, map_dtype: torch.dtype, strided: bool):
    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(2, 5, 9, 11, generator=g)).to(device)
    ignore = torch.randint(0, 5, (2, 9, 11), generator=g)
    ignore[torch.rand(2, 9, 11, generator=g) < 0.3] = IGNORE_INDEX
    ignore[1, 4] = IGNORE_INDEX  # a whole row
    if map_dtype != torch.uint8:  # only 255 is ignored: values a narrowing to 8 bits would turn into 255 or 0 are not
        ignore[0, 0, :3] = torch.tensor([511, -1, 256])
    ignore = ignore.to(map_dtype).to(device)
    if strided:  # every other column of a wider map: not contiguous
        wide = torch.zeros(2, 9, 22, dtype=map_dtype, device=device)
        wide[..., ::2] = ignore
        ignore = wide[..., ::2]
        assert not ignore.is_contiguous()
    return logits, ignore


def _impl(op: str, backend: str, device: torch.device):
    return _backends.resolve(op, backend, device)[1]


def _assert_same_results(backend: str, device: torch.device, logits, validity, mask) -> tuple:
    """The features, PCOS (image and class groups) and the CE forward + backward of ``validity`` equal, bit for bit,
    those of its bool ``mask``; returns the selection of the mask and the CE gradient."""
    features = _impl("residual_features", backend, device)
    for a, b in zip(features(logits, validity, False), features(logits, mask, False), strict=True):
        assert torch.equal(a, b)
    pcos = _impl("pcos_weights", backend, device)
    for class_groups in (False, True):
        for a, b in zip(pcos(logits, validity, 8.0, False, class_groups), pcos(logits, mask, 8.0, False, class_groups),
                        strict=True):
            assert torch.equal(a, b)
    sel = pcos(logits, mask, 8.0, False, False)
    ce = _impl("weighted_cross_entropy", backend, device)
    losses, grads = [], []
    for v in (validity, mask):
        leaf = logits.clone().requires_grad_(True)
        loss = ce(leaf, sel.label, sel.weight, v)
        loss.backward()
        losses.append(loss.detach())
        grads.append(leaf.grad)
    assert torch.isfinite(losses[0]) and losses[0] > 0
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    return sel, grads[0]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("map_dtype", MAP_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ignore_map_and_its_mask_give_the_same_results(backend, map_dtype, strided):
    device = _device(backend)
    logits, ignore = _inputs(device, map_dtype, strided)
    mask = ignore != IGNORE_INDEX
    if map_dtype != torch.uint8:
        assert mask[0, 0, :3].all()
    assert pixel_validity(logits, ignore=ignore) is ignore  # passed on as it is, not compared
    assert torch.equal(as_valid(ignore), mask) and as_valid(mask) is mask and as_valid(None) is None

    sel, grad = _assert_same_results(backend, device, logits, ignore, mask)
    assert 0 < int(sel.reliable.sum()) < int(mask.sum())  # a separation with pixels on both sides
    assert torch.all(grad.permute(0, 2, 3, 1)[~mask] == 0)  # ignored pixels: exactly no gradient


@pytest.mark.parametrize("map_dtype", [torch.uint16, torch.uint32, torch.uint64],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_the_cpu_kernels_read_an_unsigned_wide_ignore_map_as_its_mask(map_dtype):
    """uint16 / uint32 / uint64 maps (which the extension compares in place, pixel_validity.h) give bitwise the
    results of their mask, the cross-entropy's valid-pixel count (its mean's denominator) included."""
    device = _device("cpu")
    logits, ignore = _inputs(device, torch.int64, False)
    mask = ignore != IGNORE_INDEX
    _assert_same_results("cpu", device, logits, ignore.to(map_dtype), mask)


def test_the_cpu_kernels_read_any_nonzero_byte_of_a_bool_mask_as_valid():
    """A bool mask viewed from a 0 / 255 uint8 map holds the byte 255 for True: valid, as in PyTorch's own ops."""
    device = _device("cpu")
    logits, ignore = _inputs(device, torch.int64, False)
    mask = ignore != IGNORE_INDEX
    _assert_same_results("cpu", device, logits, (mask.to(torch.uint8) * 255).view(torch.bool), mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_ops_give_the_same_results_for_ignore_and_valid(backend):
    """What a user sees: ``ignore=`` and ``valid=`` of the same pixels agree through the public entry points."""
    device = _device(backend)
    logits, ignore = _inputs(device, torch.uint8, False)
    mask = ignore != IGNORE_INDEX
    by_map = csl_kernels.pcos_weights(logits, ignore, backend=backend)
    by_mask = csl_kernels.pcos_weights(logits, valid=mask, backend=backend)
    for a, b in zip(by_map[:3], by_mask[:3], strict=True):
        assert torch.equal(a, b)
    assert torch.all(by_map.weight[~mask] == 0)
    leaf_map, leaf_mask = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss_map = csl_kernels.weighted_cross_entropy(leaf_map, by_map.label, by_map.weight, ignore, backend=backend)
    loss_mask = csl_kernels.weighted_cross_entropy(leaf_mask, by_map.label, by_map.weight, valid=mask,
                                                   backend=backend)
    loss_map.backward()
    loss_mask.backward()
    assert torch.equal(loss_map, loss_mask) and torch.equal(leaf_map.grad, leaf_mask.grad)


@pytest.mark.parametrize("op", ["residual_features", "pcos_weights", "threshold_weights", "weighted_cross_entropy"])
def test_public_ops_pass_the_ignore_map_itself(op, monkeypatch):
    """The public entry points hand the backend the user's ignore map (no ``ignore != 255`` pass of their own)."""
    logits, ignore = _inputs(torch.device("cpu"), torch.uint8, False)
    impl_op = "residual_features" if op == "threshold_weights" else op
    reference = _backends._IMPLS[impl_op]["reference"]
    received = []

    def spy(*args):
        received.append(args[3] if op == "weighted_cross_entropy" else args[1])  # the impl's valid argument
        return reference(*args)

    monkeypatch.setitem(_backends._IMPLS[impl_op], "reference", spy)
    monkeypatch.setattr(_backends, "_NAMED", {})  # named backends found earlier: looked up again
    if op == "weighted_cross_entropy":
        label = torch.zeros(ignore.shape, dtype=torch.long)
        csl_kernels.weighted_cross_entropy(logits, label, torch.ones(ignore.shape), ignore, backend="reference")
    else:
        getattr(csl_kernels, op)(logits, ignore, backend="reference")
    assert len(received) == 1 and received[0] is ignore


@pytest.mark.parametrize("name", ["ignore", "valid"])
def test_a_pixel_map_on_another_device_than_the_logits_is_refused_by_name(name):
    """check_pixel_map's device check: a map on another device (meta here, a CPU map beside CUDA logits in
    practice, which a fused kernel would read as a device pointer) is a ValueError naming the map, before any
    backend runs."""
    z = torch.randn(2, 3, 4, 5)
    dtype = torch.long if name == "ignore" else torch.bool
    pixel_map = torch.zeros(2, 4, 5, dtype=dtype, device="meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but logits are on cpu"):
        csl_kernels.residual_features(z, **{name: pixel_map}, backend="reference")
    with pytest.raises(ValueError, match="label is on meta but logits are on cpu"):
        csl_kernels.weighted_cross_entropy(z, torch.zeros(2, 4, 5, dtype=torch.long, device="meta"),
                                           torch.ones(2, 4, 5), backend="reference")
