"""Pseudo-label quality metrics (spec Sec. 6) on hand-made inputs with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from csl_kernels import confusion_matrix, metrics_from_counts, pseudo_label_counts, pseudo_label_metrics
from csl_kernels.metrics import COUNT_KEYS

# One image, 2 x 4 pixels, C = 4 (class 3 is never predicted).
LABEL = torch.tensor([[[0, 1, 1, 2], [2, 0, 1, 4]]])  # 4 is out of range for C = 4: skipped
RELIABLE = torch.tensor([[[True, True, False, True], [False, True, True, True]]])
TARGET = torch.tensor([[[0, 2, 1, 2], [255, 0, 1, 0]]])  # 255: skipped
# Kept pixels (label, selected, correct): (0,T,T) (1,T,F) (1,F,T) (2,T,T) (0,T,T) (1,T,T)
EXPECTED_COUNTS = torch.tensor([
    [2, 3, 1, 0],  # predicted
    [2, 2, 1, 0],  # selected
    [2, 2, 1, 0],  # correct
    [2, 1, 1, 0],  # selected and correct
])


def test_counts_by_hand():
    counts = pseudo_label_counts(LABEL, RELIABLE, TARGET, 4)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, EXPECTED_COUNTS)


def test_rates_by_hand():
    m = pseudo_label_metrics(LABEL, RELIABLE, TARGET, 4)
    nan = math.nan
    expected = {
        "sampling_rate": [1.0, 2 / 3, 1.0, nan],
        "accuracy": [1.0, 1 / 2, 1.0, nan],
        "recall": [1.0, 1 / 2, 1.0, nan],
    }
    for key, values in expected.items():
        torch.testing.assert_close(m[key], torch.tensor(values, dtype=torch.float64), equal_nan=True)
    assert m["overall_sampling_rate"].item() == pytest.approx(5 / 6)
    assert m["overall_accuracy"].item() == pytest.approx(4 / 5)
    assert m["overall_recall"].item() == pytest.approx(4 / 5)
    for key, row in zip(COUNT_KEYS, EXPECTED_COUNTS, strict=True):
        assert torch.equal(m[key], row)


def test_counts_add_over_batches():
    label2 = torch.tensor([[[3, 3], [0, 1]]])
    reliable2 = torch.tensor([[[True, False], [False, True]]])
    target2 = torch.tensor([[[3, 0], [0, 255]]])
    # Second batch, kept pixels: (3,T,T) (3,F,F) (0,F,T)
    c2 = pseudo_label_counts(label2, reliable2, target2, 4)
    assert torch.equal(c2, torch.tensor([[1, 0, 0, 2], [0, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]]))
    total = pseudo_label_counts(LABEL, RELIABLE, TARGET, 4) + c2
    m = metrics_from_counts(total)
    torch.testing.assert_close(m["sampling_rate"], torch.tensor([2 / 3, 2 / 3, 1.0, 1 / 2], dtype=torch.float64))
    torch.testing.assert_close(m["recall"], torch.tensor([2 / 3, 1 / 2, 1.0, 1.0], dtype=torch.float64))
    assert m["overall_accuracy"].item() == pytest.approx(5 / 6)


def test_nothing_selected_or_nothing_valid():
    label = torch.zeros(1, 2, 2, dtype=torch.long)
    m = pseudo_label_metrics(label, torch.zeros(1, 2, 2, dtype=torch.bool), label.clone(), 2)
    assert m["sampling_rate"][0].item() == 0.0 and m["recall"][0].item() == 0.0
    assert math.isnan(m["accuracy"][0].item()) and math.isnan(m["overall_accuracy"].item())
    m = pseudo_label_metrics(label, torch.ones(1, 2, 2, dtype=torch.bool), torch.full_like(label, 255), 2)
    assert all(math.isnan(m[k].item()) for k in ("overall_sampling_rate", "overall_accuracy", "overall_recall"))


@pytest.mark.parametrize(("label", "reliable", "target", "num_classes", "error", "match"), [
    (LABEL[:, :1], RELIABLE, TARGET, 4, ValueError, r"must have the same shape, got \(1, 1, 4\)"),
    (LABEL, RELIABLE, TARGET[..., :2], 4, ValueError, r"must have the same shape, got .*\(1, 2, 2\)"),
    (LABEL, RELIABLE.long(), TARGET, 4, TypeError, "reliable must be a bool tensor"),
    (LABEL, RELIABLE, TARGET, 0, ValueError, "num_classes must be a positive int, got 0"),
    # was binned as its integer part, never "correct"
    (LABEL.float() + 0.7, RELIABLE, TARGET, 4, TypeError, "label must be an integer tensor, got torch.float32"),
    (LABEL, RELIABLE, TARGET.float(), 4, TypeError, "target must be an integer tensor"),
    (None, RELIABLE, TARGET, 4, TypeError, "label must be an integer tensor, got NoneType"),
])
def test_bad_input(label, reliable, target, num_classes, error, match):
    with pytest.raises(error, match=match):
        pseudo_label_counts(label, reliable, target, num_classes)


def test_ignore_index_must_be_an_int():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        pseudo_label_counts(LABEL, RELIABLE, TARGET, 4, ignore_index=254.5)


def test_counts_match_boolean_indexing_and_honour_ignore_index():
    g = torch.Generator().manual_seed(3)
    label = torch.randint(0, 6, (2, 9, 11), generator=g)
    target = torch.randint(0, 6, (2, 9, 11), generator=g)
    target[0, :3] = 254
    reliable = torch.rand(2, 9, 11, generator=g) < 0.5
    counts = pseudo_label_counts(label, reliable, target, 5, ignore_index=254)
    valid = (target != 254) & (target < 5) & (label < 5)  # a target of 5 is no class id: not scored
    lab, sel, cor = label[valid], reliable[valid], (label == target)[valid]
    expected = torch.stack([torch.bincount(x, minlength=5) for x in (lab, lab[sel], lab[cor], lab[sel & cor])])
    assert torch.equal(counts, expected)
    assert counts[0].sum() == valid.sum() < label.numel()


@pytest.mark.parametrize(("counts", "error"), [
    (torch.ones(3, 5, dtype=torch.long), ValueError),  # a row missing
    (torch.ones(4, dtype=torch.long), ValueError),  # one class's column alone
    (torch.ones(4, 5, 2, dtype=torch.long), ValueError),
    ([[1, 0], [1, 0], [1, 0], [1, 0]], TypeError),
])
def test_metrics_from_counts_needs_the_four_count_rows(counts, error):
    with pytest.raises(error, match="counts must be"):
        metrics_from_counts(counts)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32,
                                   torch.uint64])
def test_counts_are_the_same_in_every_integer_dtype(dtype):
    """Label and target are compared in int64: in their own dtype the ignore value 255 or num_classes would wrap
    (an int8 255 is -1, a uint8 256 is 0), and torch does not compare the wide unsigned dtypes at all."""
    label = torch.tensor([[[0, 1, 2, 1], [0, 2, 1, 0]]])
    target = torch.tensor([[[0, 1, 1, 100], [2, 2, 1, 0]]])
    reliable = torch.tensor([[[True, False, True, True], [True, True, False, True]]])
    for num_classes, ignore_index in ((3, 255), (3, 100), (256, 255), (3, 2**40)):
        expected = pseudo_label_counts(label, reliable, target, num_classes, ignore_index=ignore_index)
        for lab, tgt in ((label.to(dtype), target), (label, target.to(dtype)), (label.to(dtype), target.to(dtype))):
            if tgt.dtype == torch.int8 and not -128 <= ignore_index <= 127:  # an int8 map cannot hold it
                with pytest.raises(TypeError, match=f"target is int8, which cannot hold ignore_index={ignore_index}"):
                    pseudo_label_counts(lab, reliable, tgt, num_classes, ignore_index=ignore_index)
                continue
            assert torch.equal(pseudo_label_counts(lab, reliable, tgt, num_classes, ignore_index=ignore_index),
                               expected), (num_classes, ignore_index, lab.dtype, tgt.dtype)


def test_a_target_that_is_not_a_class_id_is_not_scored():
    """-1 or C + k is neither the ignore value nor a class: not scored, as confusion_matrix does not count it;
    pseudo_label_metrics passes its ignore_index on (a -1 convention is scored right)."""
    label = torch.tensor([[[0, 1, 1, 0]]])
    reliable = torch.ones(1, 1, 4, dtype=torch.bool)
    target = torch.tensor([[[0, 1, -1, 7]]])
    counts = pseudo_label_counts(label, reliable, target, 2)
    assert counts[0].tolist() == [1, 1] and counts[3].tolist() == [1, 1]
    assert counts.sum() == 4 * confusion_matrix(label, target, 2).sum()
    metrics = pseudo_label_metrics(label, reliable, torch.tensor([[[0, 0, -1, 0]]]), 2, ignore_index=-1)
    assert metrics["predicted"].tolist() == [2, 1] and metrics["overall_accuracy"] == 2 / 3


@pytest.mark.parametrize("counts", [torch.ones(4, 3), torch.ones(4, 3, dtype=torch.bool)])
def test_metrics_from_counts_refuses_counts_that_are_not_integers(counts):
    with pytest.raises(TypeError, match="counts must be an integer tensor"):
        metrics_from_counts(counts)


def test_a_bad_ignore_index_is_named_before_the_int8_check():
    target = torch.zeros(1, 2, 2, dtype=torch.int8)
    with pytest.raises((TypeError, ValueError), match="ignore_index must be an int"):
        pseudo_label_counts(torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.bool), target, 2,
                            ignore_index=None)


def test_a_pixel_whose_target_is_the_ignore_index_is_never_counted_correct():
    """An ignore_index inside [0, C) takes that class out (docstring): a pixel whose pseudo-label equals such an
    ignored target is neither predicted nor correct, so recall's denominator (all correct) does not count it."""
    label = torch.tensor([2, 2, 1, 0])
    target = torch.tensor([2, 2, 1, 1])  # the first two are ignored (ignore_index=2), though label == target there
    reliable = torch.tensor([True, True, True, False])
    counts = pseudo_label_counts(label, reliable, target, 4, ignore_index=2)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]


def test_a_pseudo_label_outside_the_class_range_is_skipped_not_an_error():
    """scored_pixels: the prediction must be a class id too; a negative or too large pseudo-label is not scored
    (and never indexes a neighbouring class's bin)."""
    label = torch.tensor([-1, 3, 5, 1])
    target = torch.tensor([0, 0, 1, 1])
    reliable = torch.ones(4, dtype=torch.bool)
    counts = pseudo_label_counts(label, reliable, target, 4)
    assert counts.tolist() == [[0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 0], [0, 1, 0, 0]]  # label 3 is a class
