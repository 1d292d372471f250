"""BatchNorm re-estimation (``csl eval --bn-recalibrate N --bn-views frames|crops``): the statistics it leaves are the
plain average over its batches, it restores the layers' settings, and the crops are training's, reproducibly."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from csl.bn import CleanImages, TrainingCrops, recalibrate_batchnorm
from csl.config import load_config

TINY = ["data.crop_size=24", "data.synthetic.num_labeled=4", "data.synthetic.num_unlabeled=6",
        "data.synthetic.size=40", "data.num_workers=0"]


class _Items:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


def test_statistics_are_the_plain_average_over_whole_batches():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 5, 7, generator=g) * (1 + i) + i for i in range(7)]
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.3))
    model[0].running_mean.fill_(5.0)
    recalibrate_batchnorm(model, _Items(images), "cpu", num_images=7, progress=False, batch_size=3)
    batches = [torch.stack(images[i:i + 3]) for i in (0, 3)]  # the 7th image makes no whole batch: left out
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    assert model[0].momentum == 0.3 and not model.training


def test_frames_of_different_sizes_are_cropped_to_their_common_size():
    images = [torch.full((3, 4, 6), 1.0), torch.full((3, 5, 4), 3.0)]
    model = nn.Sequential(nn.BatchNorm2d(3))
    assert recalibrate_batchnorm(model, _Items(images), "cpu", num_images=10, progress=False) == 2
    torch.testing.assert_close(model[0].running_mean, torch.full((3,), 2.0))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_images": 4, "batch_size": 1}, "at least two images"),
    ({"num_images": 3, "batch_size": 4}, "need at least 4 images"),
])
def test_bad_requests_are_refused(kwargs, match):
    images = _Items([torch.zeros(3, 4, 4)] * 3)
    with pytest.raises(ValueError, match=match):
        recalibrate_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), images, "cpu", progress=False, **kwargs)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        recalibrate_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1)), images, "cpu", 2, progress=False)


def test_training_crops_are_training_sized_reproducible_and_leave_random_alone():
    cfg = load_config("demo", TINY)
    crops, frames = TrainingCrops(cfg, seed=1), CleanImages(cfg)
    assert len(crops) == len(frames) == 6
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first = crops[2]["image"]
    assert random.random() == expected_next  # the global state is as it was
    assert first.shape == (3, 24, 24) and frames[2]["image"].shape == (3, 40, 40)
    torch.testing.assert_close(crops[2]["image"], first, rtol=0, atol=0)
    assert not torch.equal(TrainingCrops(cfg, seed=2)[2]["image"], first)  # another seed, another crop
    # The crop's pixels come from the normalised frame (or the zero padding, normalised as training pads).
    mean = torch.tensor(crops.mean).view(3, 1, 1)
    std = torch.tensor(crops.std).view(3, 1, 1)
    pixels = first * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_each_training_crop_has_its_own_draw():
    """Item i's scale, crop and flip come from its own seeded draw: items differ from one another, an item is the
    same on every read."""
    cfg = load_config("demo", TINY)
    crops = TrainingCrops(cfg, seed=1)
    drawn = []

    def weak(pixels, labels):
        drawn.append(random.random())
        return pixels, labels

    crops.weak = weak
    for i in range(4):
        crops[i]
    assert len(set(drawn)) == 4
    crops[2]
    assert drawn[-1] == drawn[2]


def test_statistics_of_a_trained_model_are_replaced_not_blended():
    """A trained layer has seen batches (num_batches_tracked > 0): its old statistics must not weigh in."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 5, 7, generator=g) + i for i in range(4)]
    model = nn.Sequential(nn.BatchNorm2d(3))
    model[0].running_mean.fill_(5.0)
    model[0].running_var.fill_(9.0)
    model[0].num_batches_tracked.fill_(1000)
    recalibrate_batchnorm(model, _Items(images), "cpu", num_images=4, progress=False, batch_size=2)
    batches = [torch.stack(images[i:i + 2]) for i in (0, 2)]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(model[0].running_mean, mean)
