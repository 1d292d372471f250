"""confusion_matrix: every fused backend against the reference (exact int64 counts) and hand-computed matrices."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FUSED_BACKENDS, require_backend

import csl_kernels
from csl_kernels.confusion_matrix import confusion_matrix_reference, iou_from_confusion

OP = "confusion_matrix"


def make_case(seed: int, shape, num_classes: int, dtype: torch.dtype, ignore_index: int, device):
    """Targets with ignored pixels and some outside [0, C); predictions mostly right, some wrong, and outside [0, C)
    where the target is not scored (where it is, the call is refused: test_a_stray_prediction_is_refused)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, num_classes, shape, generator=g))
    target = torch.where(torch.rand(shape, generator=g) < 0.15, torch.full_like(target, ignore_index), target)
    lo = 0 if dtype == torch.uint8 else -2
    hi = min(num_classes + 2, torch.iinfo(dtype).max)
    stray = torch.rand(shape, generator=g) < 0.05
    target = torch.where(torch.rand(shape, generator=g) < 0.03, torch.randint(lo, hi + 1, shape, generator=g), target)
    unscored = (target == ignore_index) | (target < 0) | (target >= num_classes)
    pred = torch.where(stray & unscored, torch.randint(lo, hi + 1, shape, generator=g), pred)
    return pred.to(dtype).to(device), target.to(dtype).to(device)


@pytest.mark.parametrize("seed", range(60))
def test_random_cases_match_reference(fused_backend, seed):
    device = require_backend(OP, fused_backend)
    rng = random.Random(seed)
    num_classes = rng.choice((1, 2, 19, 21, 32, 33, 150, 1000))
    dtype = rng.choice((torch.int64, torch.int32, torch.int16) + ((torch.uint8,) if num_classes < 250 else ()))
    ignore_index = 255 if dtype == torch.uint8 else rng.choice((255, -1))
    shape = rng.choice(((rng.randint(1, 3), rng.randint(1, 40), rng.randint(1, 40)), (rng.randint(1, 5000),)))
    kind = rng.choice(("contiguous", "contiguous", "transposed", "strided"))
    pred, target = make_case(seed, shape, num_classes, dtype, ignore_index, device)
    if kind == "transposed":
        pred, target = pred.transpose(0, -1), target.transpose(0, -1)
    elif kind == "strided":  # every other element, at different offsets: a 1-D view stays strided when flattened
        pred_buffer, target_buffer = (torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)
                                      for _ in range(2))
        pred_buffer[..., ::2], target_buffer[..., 1::2] = pred, target
        pred, target = pred_buffer[..., ::2], target_buffer[..., 1::2]
    got = csl_kernels.confusion_matrix(pred, target, num_classes, ignore_index=ignore_index, backend=fused_backend)
    expected = confusion_matrix_reference(pred.cpu(), target.cpu(), num_classes, ignore_index)
    assert got.dtype == torch.int64 and got.shape == (num_classes, num_classes)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
def test_hand_computed(backend):
    device = require_backend(OP, backend)
    target = torch.tensor([[[0, 0, 1], [2, 255, 1]], [[2, 2, 0], [1, 3, 255]]], device=device)
    pred = torch.tensor([[[0, 1, 1], [2, 0, 1]], [[0, 2, 0], [1, 1, -1]]], device=device)
    # Kept (target, pred): (0,0) (0,1) (1,1) (2,2) (1,1) | (2,0) (2,2) (0,0) (1,1); target 3 is out of range.
    expected = torch.tensor([[2, 1, 0], [0, 3, 0], [1, 0, 2]])
    got = csl_kernels.confusion_matrix(pred, target, 3, backend=backend)
    assert torch.equal(got.cpu(), expected)
    iou = iou_from_confusion(got.cpu())
    torch.testing.assert_close(iou, torch.tensor([2 / 4, 3 / 4, 2 / 3], dtype=torch.float64))


@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
def test_a_stray_prediction_is_refused(backend):
    """A prediction outside [0, C) where the target is a class would be a miss the matrix cannot hold: skipping it
    gave class 0 an IoU of 1.0 with one pixel of 16 right. Where the target is ignored or not a class, it is skipped."""
    device = require_backend(OP, backend)
    target = torch.zeros(1, 4, 4, dtype=torch.int64, device=device)
    pred = torch.full_like(target, 5)
    pred[0, 0, 0] = 0
    with pytest.raises(ValueError, match=r"pred holds 15 class id\(s\) outside \[0, 3\) where the target is a class "
                                         r"\(e\.g\. 5\).*mark those pixels ignore_index \(255\)"):
        csl_kernels.confusion_matrix(pred, target, 3, backend=backend)
    with pytest.raises(ValueError, match=r"pred holds 1 class id"):
        csl_kernels.confusion_matrix(torch.tensor([0, -1, 2], device=device), torch.tensor([0, 1, 255], device=device),
                                     3, backend=backend)
    target[pred == 5] = 255
    target[0, 1, 0] = 7  # not a class: skipped with its prediction
    got = csl_kernels.confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 3, backend=backend).cpu()
    assert got[0, 0] == 1 and got.sum() == 1


@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
def test_large_c_last_bins_and_heavy_diagonal(backend):
    device = require_backend(OP, backend)
    n = 9000
    target = torch.full((n,), 999)
    pred = torch.full((n,), 999)
    pred[:10] = 998
    target[-3:] = 0
    got = csl_kernels.confusion_matrix(pred.to(device), target.to(device), 1000, backend=backend).cpu()
    assert got[999, 999] == n - 13 and got[999, 998] == 10 and got[0, 999] == 3 and got.sum() == n
    # Small C (per-program histograms): every pixel on one bin.
    ones = torch.ones(3, 70, 70, dtype=torch.int64, device=device)
    got = csl_kernels.confusion_matrix(ones, ones, 21, backend=backend).cpu()
    assert got[1, 1] == ones.numel() and got.sum() == ones.numel()


@pytest.mark.parametrize(("num_classes", "ignore_index"), [(1000, 255), (21, 5)])
def test_ignore_index_inside_the_class_range(fused_backend, num_classes, ignore_index):
    device = require_backend(OP, fused_backend)
    pred, target = make_case(num_classes, (2, 30, 30), num_classes, torch.int64, ignore_index, device)
    assert (target == ignore_index).float().mean() > 0.1
    got = csl_kernels.confusion_matrix(pred, target, num_classes, ignore_index=ignore_index, backend=fused_backend)
    assert got[ignore_index].sum() == 0  # the ignored class never appears as a target
    assert torch.equal(got.cpu(), confusion_matrix_reference(pred.cpu(), target.cpu(), num_classes, ignore_index))


@pytest.mark.parametrize("backend", ("reference", *FUSED_BACKENDS))
def test_empty_and_all_ignored(backend):
    device = require_backend(OP, backend)
    empty = torch.zeros(2, 0, 5, dtype=torch.long, device=device)
    assert torch.equal(csl_kernels.confusion_matrix(empty, empty, 4, backend=backend).cpu(),
                       torch.zeros(4, 4, dtype=torch.long))
    target = torch.full((2, 3, 3), 255, device=device)
    assert not csl_kernels.confusion_matrix(target.clone(), target, 4, backend=backend).any()


def test_counts_add_over_batches_and_repeat_exactly(fused_backend):
    device = require_backend(OP, fused_backend)
    pred, target = make_case(3, (4, 17, 23), 21, torch.int64, 255, device)
    whole = csl_kernels.confusion_matrix(pred, target, 21, backend=fused_backend)
    parts = sum(csl_kernels.confusion_matrix(pred[i:i + 1], target[i:i + 1], 21, backend=fused_backend)
                for i in range(4))
    assert torch.equal(whole, parts)
    assert torch.equal(whole, csl_kernels.confusion_matrix(pred, target, 21, backend=fused_backend))


def test_large_inputs_summed_over_per_thread_histograms(fused_backend):
    """From 65536 pixels on (and 4 per cell), the CPU kernel counts into one histogram per thread and adds them up;
    with two threads and more than 2 x 65536 pixels each thread has pixels of its own: every one is counted once."""
    device = require_backend(OP, fused_backend)
    pred, target = make_case(17, (3, 256, 256), 21, torch.int64, 255, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = csl_kernels.confusion_matrix(pred, target, 21, backend=fused_backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got.cpu(), confusion_matrix_reference(pred.cpu(), target.cpu(), 21, 255))


def test_triton_custom_op():
    device = require_backend(OP, "triton")
    from csl_kernels.triton.confusion_matrix import confusion_matrix_triton

    pred, target = make_case(1, (2, 5, 6), 5, torch.int64, 255, device)
    torch.library.opcheck(torch.ops.csl_triton.confusion_matrix, (pred, target, 5, 255))
    compiled = torch.compile(lambda p: confusion_matrix_triton(p, target, 5, 255), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(pred), confusion_matrix_triton(pred, target, 5, 255))


@pytest.mark.parametrize(("pred", "target", "num_classes", "error", "match"), [
    (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 3, TypeError, "pred"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool), 3, TypeError, "target"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3, ValueError, "same shape"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 0, ValueError, "num_classes"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 2.0, ValueError, "num_classes"),
])
def test_bad_input_errors(pred, target, num_classes, error, match):
    with pytest.raises(error, match=match):
        csl_kernels.confusion_matrix(pred, target, num_classes, backend="reference")


@pytest.mark.parametrize("ignore_index", [1.5, None, True])
def test_ignore_index_must_be_an_int(fused_backend, ignore_index):
    """A float ignore_index was compared exactly by the reference and truncated by the fused backends (1.5 dropped
    class 1 there); None failed with int()'s error in the fused ones."""
    pred = torch.tensor([0, 1, 2, 2])
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        csl_kernels.confusion_matrix(pred, pred.clone(), 3, ignore_index=ignore_index, backend=fused_backend)


@pytest.mark.parametrize("layout", ["step", "column", "offset"])
def test_strided_one_dimensional_views(fused_backend, layout):
    """Views whose flattening is still a strided view (no copy): each backend reads the view's elements."""
    device = require_backend(OP, fused_backend)
    pred, target = make_case(7, (2 * 999,), 5, torch.int64, 255, device)
    pick = {"step": lambda t: t[::2], "column": lambda t: t.view(-1, 2)[:, 1], "offset": lambda t: t[3:-1]}[layout]
    pred, target = pick(pred), pick(target)
    assert not pred.reshape(-1).is_contiguous() or layout == "offset"
    got = csl_kernels.confusion_matrix(pred, target, 5, backend=fused_backend)
    assert torch.equal(got.cpu(), confusion_matrix_reference(pred.cpu(), target.cpu(), 5, 255))


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**64])
def test_ignore_index_must_fit_in_int64(fused_backend, ignore_index):
    pred = torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        csl_kernels.confusion_matrix(pred, pred.clone(), 3, ignore_index=ignore_index, backend=fused_backend)


@pytest.mark.parametrize(("confusion", "error"), [(torch.zeros(3, 4), ValueError), (torch.zeros(3), ValueError),
                                                  ([[1, 0], [0, 1]], TypeError)])
def test_iou_from_confusion_needs_a_square_matrix(confusion, error):
    with pytest.raises(error, match="confusion must be"):
        csl_kernels.iou_from_confusion(confusion)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda", "auto"])
def test_a_sparse_input_is_refused_by_name_on_every_backend(backend):
    device = torch.device("cpu") if backend in ("reference", "auto") else require_backend("confusion_matrix", backend)
    dense = torch.randint(0, 3, (2, 4)).to(device)
    for pred, target, name in ((dense.to_sparse(), dense, "pred"), (dense, dense.to_sparse(), "target")):
        with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
            csl_kernels.confusion_matrix(pred, target, 3, backend=backend)


def test_the_reference_runs_on_meta_tensors():
    """Shape propagation without data (as the other ops' references do): a C x C int64 matrix."""
    pred = torch.zeros(2, 4, dtype=torch.long, device="meta")
    out = csl_kernels.confusion_matrix(pred, pred, 3, backend="reference")
    assert out.shape == (3, 3) and out.dtype == torch.int64 and out.device.type == "meta"


def test_pred_and_target_on_different_devices_are_refused_by_name():
    """check_same_shape's device check (confusion_matrix, pseudo_label_counts): tensors on two devices are a
    ValueError that says so, not whatever the backend does with a foreign pointer."""
    pred = torch.zeros(6, dtype=torch.long)
    target = torch.zeros(6, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="must be on the same device"):
        csl_kernels.confusion_matrix(pred, target, 3, backend="reference")
    with pytest.raises(ValueError, match="must be on the same device"):
        csl_kernels.pseudo_label_counts(pred, torch.zeros(6, dtype=torch.bool), target, 3)
