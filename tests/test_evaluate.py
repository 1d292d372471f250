"""csl.evaluate: mIoU through csl_kernels.confusion_matrix, eval modes, distributed sampler / all-reduce, PNGs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, spawn_and_join
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from csl.evaluate import (
    DistributedEvalSampler,
    evaluate,
    make_eval_loader,
    predict_images,
    predict_logits,
    sliding_window_scores,
)


class EncodedLabels(Dataset):
    """Images whose channel 0 holds the class id (and channel 1 a second map); masks given explicitly."""

    def __init__(self, images: list[torch.Tensor], masks: list[torch.Tensor]):
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "name": f"item{i}"}


class ReadChannel(nn.Module):
    """Predicts the class id stored in channel ``channel`` of the input (one-hot logits)."""

    def __init__(self, num_classes: int, channel: int = 0):
        super().__init__()
        self.num_classes, self.channel = num_classes, channel
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, self.channel].round().long().clamp(0, self.num_classes - 1)
        return F.one_hot(ids, self.num_classes).permute(0, 3, 1, 2).float() * 10 + self.dummy


def _perfect_data(num_classes: int, sizes, seed: int = 0) -> EncodedLabels:
    g = torch.Generator().manual_seed(seed)
    images, masks = [], []
    for h, w in sizes:
        mask = torch.randint(0, num_classes, (h, w), generator=g)
        image = torch.zeros(3, h, w)
        image[0] = mask.float()
        mask[torch.rand(h, w, generator=g) < 0.1] = 255  # ignored pixels: whatever is predicted there is skipped
        images.append(image)
        masks.append(mask)
    return EncodedLabels(images, masks)


@pytest.mark.parametrize("mode", ["original", "center_crop", "sliding_window"])
def test_perfect_predictor_scores_one(mode):
    data = _perfect_data(6, [(40, 52), (40, 52), (33, 47)])
    result = evaluate(ReadChannel(6), DataLoader(data, batch_size=1), 6, mode=mode, crop_size=24, progress=False)
    assert result["miou"] == 1.0 and result["pixel_acc"] == 1.0
    assert result["iou"] == [1.0] * 6
    conf = result["confusion"]
    assert conf.dtype == torch.int64 and conf.shape == (6, 6)
    assert torch.equal(conf, torch.diag(conf.diag()))
    valid = sum(int((m != 255).sum()) for m in data.masks) if mode != "center_crop" else None
    if valid is not None:
        assert int(conf.sum()) == valid


def test_known_confusion_for_a_hand_made_predictor():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    image = torch.zeros(3, 2, 3)
    image[0] = pred.float()
    result = evaluate(ReadChannel(3), DataLoader(EncodedLabels([image], [target])), 3, progress=False)
    assert result["confusion"].tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert result["iou"] == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert result["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert result["pixel_acc"] == pytest.approx(3 / 5)

    # A class absent from targets and predictions has an undefined IoU and does not count in the mean.
    result4 = evaluate(ReadChannel(4), DataLoader(EncodedLabels([image], [target])), 4, progress=False)
    assert np.isnan(result4["iou"][3]) and result4["miou"] == pytest.approx(result["miou"])


def test_evaluate_counts_with_the_kernels_backend():
    """``backend=`` (the config's ``kernels.backend``) reaches csl_kernels.confusion_matrix."""
    data = _perfect_data(4, [(20, 24)])
    result = evaluate(ReadChannel(4), DataLoader(data), 4, backend="reference", progress=False)
    assert torch.equal(result["confusion"], evaluate(ReadChannel(4), DataLoader(data), 4, progress=False)["confusion"])
    with pytest.raises((ValueError, RuntimeError), match="bogus"):
        evaluate(ReadChannel(4), DataLoader(data), 4, backend="bogus", progress=False)


@pytest.mark.parametrize("num_classes,size,crop,ratio", [(4, (50, 70), 32, 2 / 3), (3, (20, 24), 32, 2 / 3),
                                                          (7, (45, 33), 16, 0.5), (2, (32, 64), 32, 1.0)])
def test_sliding_window_equals_original_for_a_per_pixel_model(num_classes, size, crop, ratio):
    torch.manual_seed(0)
    model = nn.Conv2d(3, num_classes, 1)
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        full = model(image).argmax(1)
        scores = sliding_window_scores(model, image, crop, ratio)
    assert scores.shape == (2, num_classes, *size)
    assert torch.equal(scores.argmax(1), full)
    # As logits (csl analyze selects from them): their softmax is the model's own, however many windows overlap.
    with torch.no_grad():
        logits = predict_logits(model, image, mode="sliding_window", crop_size=crop, stride_ratio=ratio)
        torch.testing.assert_close(logits.softmax(1), model(image).softmax(1), atol=1e-6, rtol=1e-5)
    mask = full.clone()
    mask[:, 0, :] = 255
    data = EncodedLabels(list(image), list(mask))
    a = evaluate(model, DataLoader(data, batch_size=2), num_classes, progress=False)
    b = evaluate(model, DataLoader(data, batch_size=2), num_classes, mode="sliding_window", crop_size=crop,
                 stride_ratio=ratio, progress=False)
    assert torch.equal(a["confusion"], b["confusion"]) and a["miou"] == 1.0


def test_sliding_window_covers_every_pixel():
    """Every pixel is covered by at least one window (the probability sums are >= 1 everywhere)."""
    model = nn.Conv2d(3, 3, 1)
    for size in ((97, 131), (10, 100), (64, 64)):
        with torch.no_grad():
            scores = sliding_window_scores(model, torch.randn(1, 3, *size), 32)
        assert (scores.sum(1) > 0.999).all()


def test_evaluate_amp_modes_and_errors():
    data = _perfect_data(5, [(24, 24)] * 2)
    model = ReadChannel(5)
    model.train()
    result = evaluate(model, DataLoader(data), 5, amp_dtype=torch.bfloat16, progress=False)
    assert result["miou"] == 1.0
    assert model.training  # restored
    with pytest.raises(ValueError, match="mode"):
        evaluate(model, DataLoader(data), 5, mode="tiles")
    with pytest.raises(ValueError, match="crop_size"):
        evaluate(model, DataLoader(data), 5, mode="sliding_window")
    with pytest.raises(ValueError, match="outputs 5 classes"):
        evaluate(model, DataLoader(data), 4, progress=False)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_distributed_eval_sampler_covers_each_sample_once(world_size):
    for n in range(0, 14):
        shares = [list(DistributedEvalSampler(n, num_replicas=world_size, rank=r)) for r in range(world_size)]
        flat = [i for s in shares for i in s]
        assert sorted(flat) == list(range(n))  # every sample exactly once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert [len(DistributedEvalSampler(n, world_size, r)) for r in range(world_size)] == list(map(len, shares))
    with pytest.raises(ValueError, match="rank"):
        DistributedEvalSampler(5, num_replicas=2, rank=2)


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = nn.Conv2d(3, 4, 1)
        data = _dist_data()
        loader = make_eval_loader(data)
        assert isinstance(loader.sampler, DistributedEvalSampler)
        result = evaluate(model, loader, 4, progress=False)
        out = {"confusion": result["confusion"], "seen": list(loader.sampler)}
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
        with pytest.raises(ValueError, match="DistributedEvalSampler"):
            evaluate(model, DataLoader(data), 4, progress=False)
    finally:
        dist.destroy_process_group()


def _dist_data() -> EncodedLabels:
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(3, 9, 11, generator=g) for _ in range(5)]  # 5 samples over 2 ranks: uneven
    masks = [torch.randint(0, 4, (9, 11), generator=g) for _ in range(5)]
    return EncodedLabels(images, masks)


def test_distributed_evaluate_all_reduces_without_duplicates(tmp_path):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    single = evaluate(model, DataLoader(_dist_data()), 4, progress=False)
    spawn_and_join(_dist_worker, (2, free_port(), str(tmp_path)), nprocs=2)
    outs = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert sorted(outs[0]["seen"] + outs[1]["seen"]) == list(range(5))
    for out in outs:
        assert torch.equal(out["confusion"], single["confusion"])


def test_predict_images_writes_palette_pngs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(20, 30), (17, 9)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    torch.manual_seed(0)
    model = nn.Conv2d(3, 21, 1)
    out = predict_images(model, paths, str(tmp_path / "pred"), num_classes=21, crop_size=16, mode="sliding_window",
                         progress=False)
    assert [os.path.basename(p) for p in out] == ["img0.png", "img1.png"]
    from csl.data import palette
    from csl.data.datasets import load_image
    from csl.data.transforms import image_to_tensor, normalize

    for src, dst in zip(paths, out, strict=True):
        img = Image.open(dst)
        assert img.mode == "P"
        expected = model(normalize(image_to_tensor(load_image(src)), (0.485, 0.456, 0.406),
                                   (0.229, 0.224, 0.225))[None]).argmax(1)[0].numpy()
        assert np.array_equal(np.array(img), expected)
        rgb = np.array(img.convert("RGB"))
        assert np.array_equal(rgb, palette(21)[expected])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict_images(model, [str(tmp_path / "missing.png")], str(tmp_path / "pred"), num_classes=21)


def test_a_photo_with_an_exif_orientation_is_predicted_upright(tmp_path):
    """A phone photo stored 30 x 48 with orientation 6 (shown turned, 48 wide): its PNG is 48 wide, the prediction
    of the upright photo; the datasets read the stored pixels, which their masks are drawn on."""
    from csl.data.datasets import load_image
    from csl.data.transforms import image_to_tensor, normalize

    pixels = np.random.default_rng(1).integers(0, 256, (48, 30, 3), dtype=np.uint8)  # H 48, W 30 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    upright = load_image(str(tmp_path / "photo.png"), upright=True)
    assert upright.shape == (30, 48, 3) and np.array_equal(upright, np.rot90(pixels, k=-1))
    assert np.array_equal(load_image(str(tmp_path / "photo.png")), pixels)
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1)
    out = predict_images(model, [str(tmp_path / "photo.png")], str(tmp_path / "pred"), num_classes=5, progress=False)
    with Image.open(out[0]) as png:
        assert png.size == (48, 30)
        expected = model(normalize(image_to_tensor(upright), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None])
        assert np.array_equal(np.array(png), expected.argmax(1)[0].numpy())


def test_predictions_keep_the_folder_layout_and_never_replace_what_exists(tmp_path):
    """seq1/0001.jpg and seq2/0001.jpg get seq1/0001.png and seq2/0001.png; existing predictions are refused before
    any work unless overwrite, input images always; an unreadable image is skipped and reported."""
    from csl.evaluate import prediction_names

    rng = np.random.default_rng(1)
    paths = []
    for rel in ("seq1/0001.jpg", "seq2/0001.jpg", "seq2/0001.png", "seq2/broken.png"):
        p = tmp_path / "imgs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("seq2/broken"):
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    assert prediction_names(paths) == ["seq1/0001.png", "seq2/0001_jpg.png", "seq2/0001_png.png", "seq2/broken.png"]
    assert prediction_names([str(tmp_path / "a.jpg")]) == ["a.png"]
    assert prediction_names(["d/x.JPG", "d/x.jpg"]) == ["x_JPG.png", "x_jpg_2.png"]  # one name where case is ignored
    # A numbered name never takes another image's name (a_2.png was given to a.png, then a_2.png's own was lost).
    assert prediction_names(["d/A.png", "d/a.png", "d/a_2.png"]) == ["A.png", "a_3.png", "a_2.png"]
    model = nn.Conv2d(3, 5, 1)
    out_dir = tmp_path / "pred"
    skipped: list = []
    written = predict_images(model, paths, str(out_dir), num_classes=5, progress=False, skipped=skipped)
    assert [os.path.relpath(p, out_dir) for p in written] == ["seq1/0001.png", "seq2/0001_jpg.png",
                                                              "seq2/0001_png.png"]
    assert len(skipped) == 1 and skipped[0][0] == paths[3]
    before = (out_dir / "seq1" / "0001.png").read_bytes()
    with pytest.raises(FileExistsError, match=r"3 of the 4 predictions exist already .*--overwrite"):
        predict_images(model, paths, str(out_dir), num_classes=5, progress=False)
    assert (out_dir / "seq1" / "0001.png").read_bytes() == before
    assert len(predict_images(model, paths[:3], str(out_dir), num_classes=5, progress=False, overwrite=True)) == 3
    # An interrupted run continued: the PNGs there are kept, the others predicted (the broken image skipped again).
    os.remove(out_dir / "seq2" / "0001_png.png")
    with pytest.raises(ValueError, match="contradict"):
        predict_images(model, paths, str(out_dir), num_classes=5, overwrite=True, skip_existing=True)
    mtime = os.stat(out_dir / "seq1" / "0001.png").st_mtime_ns
    written = predict_images(model, paths, str(out_dir), num_classes=5, progress=False, skip_existing=True)
    assert [os.path.relpath(p, out_dir) for p in written] == ["seq2/0001_png.png"]
    assert os.stat(out_dir / "seq1" / "0001.png").st_mtime_ns == mtime
    with pytest.raises(ValueError, match="over 1 input image"):  # --out = the input folder, overwrite or not
        predict_images(model, [paths[2]], str(tmp_path / "imgs" / "seq2"), num_classes=5, overwrite=True)


def test_eval_batches_of_differently_sized_images_match_one_by_one():
    """eval.batch_size > 1 on a validation set whose image sizes differ: same-size sub-batches, same result."""
    from torch.utils.data import Dataset

    from csl.evaluate import evaluate, make_eval_loader

    class Mixed(Dataset):
        sizes = [(20, 24), (20, 24), (17, 31), (20, 24), (17, 31)]

        def __len__(self):
            return len(self.sizes)

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            h, w = self.sizes[i]
            return {"image": torch.randn(3, h, w, generator=g), "mask": torch.randint(0, 3, (h, w), generator=g),
                    "name": f"img{i}"}

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3))
    one = evaluate(model, make_eval_loader(Mixed(), batch_size=1), 3, progress=False, backend="reference")
    four = evaluate(model, make_eval_loader(Mixed(), batch_size=4), 3, progress=False, backend="reference")
    assert torch.equal(one["confusion"], four["confusion"]) and one["confusion"].sum() == 3 * 480 + 2 * 527


def test_predict_sees_images_at_the_runs_image_scale_and_writes_them_full_size(tmp_path):
    """data.image_scale 0.5 trains and evaluates on half-size frames: predict feeds the model half-size images and
    resizes the scores back, so the PNG has the image's size and the class boundaries stay where they are."""
    class LeftRight(nn.Module):  # class 1 in the right half of the picture, class 0 in the left half
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(tuple(x.shape[-2:]))
            right = (torch.arange(x.shape[-1]) >= x.shape[-1] // 2).float().expand(x.shape[0], 1, *x.shape[-2:])
            return torch.cat([1 - right, right], dim=1) * 10

    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(image)
    model = LeftRight()
    written = predict_images(model, [str(image)], str(tmp_path / "out"), num_classes=2, image_scale=0.5,
                             progress=False)
    assert model.seen == [(15, 20)]
    with Image.open(written[0]) as p:
        pred = np.array(p)
    assert pred.shape == (30, 40)
    assert (pred[:, :19] == 0).all() and (pred[:, 21:] == 1).all()
    # A centre crop of the scaled image comes back at its own size times 1 / image_scale.
    written = predict_images(model, [str(image)], str(tmp_path / "crop"), num_classes=2, image_scale=0.5,
                             mode="center_crop", crop_size=10, progress=False)
    assert model.seen[-1] == (10, 10)
    with Image.open(written[0]) as p:
        assert p.size == (20, 20)


class TupleSamples(Dataset):
    """UniMatch's val dataset: ``(image, mask, id)`` samples, which the default collate gives as a list."""

    def __init__(self, data: EncodedLabels):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple:
        item = self.data[i]
        return item["image"], item["mask"], item["name"]


def test_a_plain_loader_of_tuple_samples_is_one_batch_not_a_list_of_them():
    data = _perfect_data(4, [(12, 20)] * 4)
    loader = DataLoader(TupleSamples(data), batch_size=2)
    assert isinstance(next(iter(loader)), list)
    result = evaluate(ReadChannel(4), loader, 4, progress=False)
    assert result["miou"] == 1.0
    assert result["confusion"].sum() == sum(int((m != 255).sum()) for m in data.masks)


class WindowContext(nn.Module):
    """Logits that depend on the window's content and position, as a network's do: overlapping windows disagree."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
        ramp = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, -1)
        return self.conv(x) + 3 * x.mean(dim=(1, 2, 3), keepdim=True) * sign + 2 * ramp * sign


def test_predict_resizes_the_windows_average_not_their_sum(tmp_path):
    """Resized back from image_scale 0.5, the windows' average is interpolated: a sum would mix 1 window's
    probabilities with 2 windows' beside a window start, and the class there would follow the count of windows."""
    from csl.data.datasets import load_image, resize_pair
    from csl.data.transforms import image_to_tensor, normalize

    rng = np.random.default_rng(0)
    pixels = (rng.random((96, 160, 3)) * 255).astype(np.uint8)
    pixels[:, 80:] //= 3
    Image.fromarray(pixels).save(tmp_path / "a.png")
    model = WindowContext().eval()
    out = predict_images(model, [str(tmp_path / "a.png")], str(tmp_path / "out"), num_classes=2,
                         mode="sliding_window", crop_size=32, image_scale=0.5, progress=False)
    got = np.array(Image.open(out[0]))
    scaled, _ = resize_pair(load_image(str(tmp_path / "a.png"), upright=True), None, 0.5)
    image = normalize(image_to_tensor(scaled), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None]
    with torch.no_grad():
        total = sliding_window_scores(model, image, 32)
    average = F.interpolate(total / total.sum(1, keepdim=True), size=pixels.shape[:2], mode="bilinear",
                            align_corners=False).argmax(1)[0].numpy()
    summed = F.interpolate(total, size=pixels.shape[:2], mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    assert (summed != average).any()  # the case the test is about occurs
    assert np.array_equal(got, average)


def test_center_crop_starts_at_half_the_margin_rounded_down():
    """UniMatch's center_crop evaluation: start = (H - crop) // 2."""
    from csl.evaluate import center_crop

    t = torch.arange(5 * 6).view(5, 6)
    assert torch.equal(center_crop(t, 2), t[1:3, 2:4])
    assert torch.equal(center_crop(t, 3), t[1:4, 1:4])


def test_sliding_window_stride_is_truncated():
    """Windows start at 0, int(crop * stride_ratio), ... and one flush with the border (UniMatch: int(crop * 2/3)):
    crop 25 gives stride 16, not 17."""
    from csl.evaluate import sliding_window_scores

    model = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        cover = sliding_window_scores(model, torch.randn(1, 3, 25, 50), 25, 2 / 3).sum(1)[0, 0]
    starts = [0, 16, 25]
    expected = torch.tensor([sum(s <= x < s + 25 for s in starts) for x in range(50)], dtype=cover.dtype)
    torch.testing.assert_close(cover, expected)


def test_eval_sub_batches_group_images_of_one_whole_size():
    """Images of one height but different widths are separate sub-batches (in order of their first image)."""
    from csl.evaluate import collate_by_size

    samples = [{"image": torch.zeros(3, 20, w), "mask": torch.zeros(20, w, dtype=torch.long), "name": f"img{i}"}
               for i, w in enumerate((24, 31, 24))]
    batches = collate_by_size(samples)
    assert [tuple(b["image"].shape) for b in batches] == [(2, 3, 20, 24), (1, 3, 20, 31)]
    assert [b["name"] for b in batches] == [["img0", "img2"], ["img1"]]


def test_a_centre_crop_at_an_image_scale_comes_back_at_its_rounded_size(tmp_path):
    """image_scale 0.3 and crop 20: the crop covers 20 / 0.3 = 66.7 pixels of the image, written as 67."""
    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(image)
    written = predict_images(ReadChannel(2), [str(image)], str(tmp_path / "crop"), num_classes=2, image_scale=0.3,
                             mode="center_crop", crop_size=20, progress=False)
    with Image.open(written[0]) as p:
        assert p.size == (67, 67)


def test_predict_leaves_the_model_in_its_mode(tmp_path):
    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8)).save(image)
    model = ReadChannel(2)
    for training in (True, False):
        model.train(training)
        predict_images(model, [str(image)], str(tmp_path / f"out{training}"), num_classes=2, progress=False)
        assert model.training == training


# ---------------------------------------------------------------------------------------------------------------
# Mutation audit: what the model sees and how the windows are counted; evaluate's mode, amp and ignore_index.


class Recorder(nn.Module):
    """A per-pixel 1x1 conv that keeps the inputs it is given, its output dtype and whether autocast was on."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.inputs: list[torch.Tensor] = []
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        return out


def test_a_small_image_is_padded_with_zeros_at_the_bottom_right():
    """Zero is the dataset mean after normalisation: the window holds the image at its top-left and zeros around."""
    model = Recorder()
    image = torch.randn(1, 3, 20, 24) + 5
    with torch.no_grad():
        scores = sliding_window_scores(model, image, 32)
    (window,) = model.inputs
    assert window.shape == (1, 3, 32, 32)
    assert torch.equal(window[..., :20, :24], image)
    assert window[..., 20:, :].abs().sum() == 0 and window[..., :, 24:].abs().sum() == 0
    assert scores.shape == (1, 3, 20, 24)


def test_sliding_window_sums_are_float32_under_bfloat16_autocast():
    """Probabilities are summed in float32 (as documented): bfloat16 sums of overlapping windows would be off by
    about 1 %."""
    model = nn.Conv2d(3, 4, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = sliding_window_scores(model, torch.randn(1, 3, 40, 56), 16, 0.5)
    assert scores.dtype == torch.float32
    starts_h, starts_w = (0, 8, 16, 24), (0, 8, 16, 24, 32, 40)
    count = torch.tensor([[sum(s <= y < s + 16 for s in starts_h) * sum(s <= x < s + 16 for s in starts_w)
                           for x in range(56)] for y in range(40)], dtype=torch.float32)
    torch.testing.assert_close(scores.sum(1)[0], count, atol=1e-4, rtol=1e-5)


def test_evaluate_runs_the_model_in_eval_mode_under_the_asked_amp_dtype():
    """BatchNorm's running statistics are used and left alone; the mode is restored either way; ``amp_dtype``
    reaches autocast (float16 as asked, no autocast without it)."""
    data = _perfect_data(3, [(8, 10)] * 2)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    model.train()
    evaluate(model, DataLoader(data), 3, progress=False)
    assert model.training and model[1].num_batches_tracked == 0
    assert torch.equal(model[1].running_mean, torch.full((3,), 0.5))
    model.eval()
    evaluate(model, DataLoader(data), 3, progress=False)
    assert not model.training
    for amp_dtype, expected in ((None, torch.float32), (torch.float16, torch.float16),
                                (torch.bfloat16, torch.bfloat16)):
        rec = Recorder(3)
        evaluate(rec, DataLoader(data), 3, amp_dtype=amp_dtype, progress=False)
        assert rec.dtypes == [expected] * 2, amp_dtype


def test_evaluate_skips_the_given_ignore_index():
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    image = torch.zeros(3, 2, 3)
    image[0] = pred.float()
    result = evaluate(ReadChannel(3), DataLoader(EncodedLabels([image], [target])), 3, ignore_index=2,
                      progress=False)
    assert result["confusion"].tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]


def test_evaluate_passes_its_stride_ratio_to_the_windows():
    """A model whose logits depend on the window: stride_ratio 0.25 and 1.0 give different predictions, and
    evaluate scores the ones of the ratio it is given."""
    from csl_kernels import confusion_matrix

    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 40, 72, generator=g)
    mask = torch.randint(0, 2, (1, 40, 72), generator=g)
    model = WindowContext().eval()
    with torch.no_grad():
        preds = {r: sliding_window_scores(model, image, 24, r).argmax(1) for r in (0.25, 1.0)}
    assert not torch.equal(preds[0.25], preds[1.0])
    for r, pred in preds.items():
        result = evaluate(model, DataLoader(EncodedLabels(list(image), list(mask))), 2, mode="sliding_window",
                          crop_size=24, stride_ratio=r, progress=False)
        assert torch.equal(result["confusion"], confusion_matrix(pred, mask, 2)), r


# ---------------------------------------------------------------------------------------------------------------
# Mutation audit (second pass): a crop larger than the image, the smallest stride, finite window logits, argument
# checks, every pixel ignored, more than 256 classes in a PNG.


def test_center_crop_keeps_a_dimension_smaller_than_the_crop_whole():
    """A crop larger than the image along a dimension keeps that dimension whole (Pascal VOC frames narrower than the
    crop), and evaluate scores the mask's pixels inside the crop: all rows, the central columns."""
    from csl.evaluate import center_crop

    t = torch.arange(5 * 8).view(5, 8)
    assert torch.equal(center_crop(t, 6), t[:, 1:7])
    assert torch.equal(center_crop(t, 9), t)
    data = _perfect_data(4, [(16, 30)])
    result = evaluate(ReadChannel(4), DataLoader(data), 4, mode="center_crop", crop_size=24, progress=False)
    assert result["miou"] == 1.0
    assert int(result["confusion"].sum()) == int((data.masks[0][:, 3:27] != 255).sum())


def test_the_window_stride_is_at_least_one_pixel():
    """crop 3 at stride_ratio 0.2 is int(0.6) = 0 pixels: the windows step by one pixel."""
    model = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        cover = sliding_window_scores(model, torch.randn(1, 3, 3, 6), 3, 0.2).sum(1)[0]
    torch.testing.assert_close(cover, torch.tensor([[1.0, 2, 3, 3, 2, 1]] * 3))


def test_window_logits_stay_finite_for_a_confident_model():
    """Probabilities that underflow to 0 in every window give the smallest float's log, not -inf: csl analyze takes
    confidence, entropy and margin from these logits, and -inf makes them NaN."""
    from csl_kernels import selection_scores

    class Sure(nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :1] * 0 + 200, x[:, :2] * 0], dim=1)  # class 0 by 200 over the two others

    with torch.no_grad():
        logits = predict_logits(Sure(), torch.randn(1, 3, 10, 12), mode="sliding_window", crop_size=8)
    assert torch.isfinite(logits).all() and (logits.argmax(1) == 0).all()
    for score in ("confidence", "entropy", "margin"):
        assert not torch.isnan(selection_scores(logits, None, score=score)).any(), score


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "center_crop", "crop_size": 0}, "crop_size, a positive int; got 0"),
    ({"mode": "sliding_window", "crop_size": 8.0}, "crop_size, a positive int; got 8.0"),
    ({"stride_ratio": 0.0}, r"stride_ratio must be in \(0, 1\], got 0.0"),
    ({"stride_ratio": 1.5}, r"stride_ratio must be in \(0, 1\], got 1.5"),
    ({"num_classes": 0}, "num_classes must be a positive int, got 0"),
    ({"num_classes": 3.0}, "num_classes must be a positive int, got 3.0"),
])
def test_evaluate_refuses_bad_arguments(kwargs, match):
    """Checked before any image: a zero crop or stride would score nothing or step by a pixel for hours."""
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluate(ReadChannel(3), DataLoader(_perfect_data(3, [(8, 8)])), progress=False, **kwargs)


def test_every_pixel_ignored_gives_undefined_scores():
    data = _perfect_data(3, [(6, 7)])
    data.masks[0].fill_(255)
    result = evaluate(ReadChannel(3), DataLoader(data), 3, progress=False)
    assert int(result["confusion"].sum()) == 0
    assert np.isnan(result["miou"]) and np.isnan(result["pixel_acc"]) and all(np.isnan(result["iou"]))


def test_predictions_of_more_than_256_classes_are_rgb_pngs(tmp_path):
    """Up to 256 classes a PNG's pixel values are the class ids (palette mode); beyond, they do not fit a byte and the
    PNG holds each class's colour."""
    from csl.data import palette

    class Columns(nn.Module):  # class 254 + (column % 3): 254, 255 and 256
        def __init__(self, num_classes):
            super().__init__()
            self.num_classes = num_classes

        def forward(self, x):
            ids = (254 + torch.arange(x.shape[-1]) % 3).clamp(max=self.num_classes - 1).expand(x.shape[0], *x.shape[2:])
            return F.one_hot(ids, self.num_classes).permute(0, 3, 1, 2).float()

    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for n in (256, 300):
        (out,) = predict_images(Columns(n), [str(tmp_path / "a.png")], str(tmp_path / str(n)), num_classes=n,
                                progress=False)
        ids = (254 + np.arange(6) % 3).clip(max=n - 1)[None].repeat(4, 0)
        with Image.open(out) as png:
            if n == 256:
                assert png.mode == "P" and np.array_equal(np.array(png), ids)
            else:
                assert png.mode == "RGB" and np.array_equal(np.array(png), palette(n)[ids])
                assert len({tuple(c) for c in palette(n)[[254, 255, 256]]}) == 3
