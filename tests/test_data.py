"""csl.data: UniMatch-format lists, file layouts, label checks, weak / strong views, synthetic scenes."""

from __future__ import annotations

import glob
import logging
import os
import random

import numpy as np
import pytest
import torch
from conftest import written
from PIL import Image
from torch.utils.data import DataLoader

from csl.data import (
    DATASET_KINDS,
    SyntheticSource,
    UnlabeledDataset,
    build_datasets,
    class_names,
    generate_scenes,
    palette,
    read_split,
    seed_worker,
    write_synthetic_folder,
)
from csl.data.datasets import LabeledDataset, ListSource, ValDataset, read_split_lines
from csl.data.transforms import WeakAugment, image_to_tensor, image_to_uint8, labels_to_tensor, to_float

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _denorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


# ----------------------------------------------------------------------------------------------- split files


@pytest.mark.parametrize(("dataset", "first", "last"), [
    ("pascal", "background", "tv/monitor"), ("cityscapes", "road", "bicycle"), ("coco", "background", "toothbrush"),
    ("camvid", "sky", "bicyclist"), ("synthetic", "background", "cross")])
def test_class_names_of_each_dataset_at_its_class_count(dataset, first, last):
    """The names evaluation, analysis and reports print: one per class of the dataset's own count, in the order of
    its label ids; another count (or a folder dataset) falls back to numbers rather than misname a class."""
    count = DATASET_KINDS[dataset].num_classes_default if dataset != "synthetic" else 6
    names = class_names({"dataset": dataset}, count)
    assert (len(names), names[0], names[-1]) == (count, first, last) and len(set(names)) == count
    if dataset == "synthetic":
        assert class_names({"dataset": dataset}, 4) == ["background", "disk", "rectangle", "triangle"]
    else:
        assert class_names({"dataset": dataset}, count - 1) == [f"class {k}" for k in range(count - 1)]
    assert class_names({"dataset": "folder"}, 3) == ["class 0", "class 1", "class 2"]


def test_read_split_formats_and_errors(tmp_path):
    path = tmp_path / "labeled.txt"
    path.write_text("JPEGImages/a.jpg SegmentationClass/a.png\n\n# comment\nJPEGImages/b.jpg\n")
    assert read_split(str(path)) == [("JPEGImages/a.jpg", "SegmentationClass/a.png"), ("JPEGImages/b.jpg", None)]

    bom = tmp_path / "bom.txt"  # written by an editor that starts UTF-8 files with a byte-order mark
    bom.write_text("# list\nJPEGImages/a.jpg SegmentationClass/a.png\n", encoding="utf-8-sig")
    assert read_split(str(bom)) == [("JPEGImages/a.jpg", "SegmentationClass/a.png")]
    utf16 = tmp_path / "utf16.txt"  # Windows PowerShell's "> utf16.txt": UTF-16 with a byte-order mark, CRLF
    utf16.write_text("JPEGImages/a.jpg SegmentationClass/a.png\nJPEGImages/b.jpg\n", encoding="utf-16", newline="\r\n")
    assert read_split(str(utf16)) == [("JPEGImages/a.jpg", "SegmentationClass/a.png"), ("JPEGImages/b.jpg", None)]

    with pytest.raises(ValueError, match=r"bad\.txt:2: .*paths without whitespace"):
        read_split(written(tmp_path / "bad.txt", "a.jpg a.png\na.jpg a.png extra\n"))
    # an unlabeled line whose image path holds a space
    with pytest.raises(ValueError, match=r"spaced\.txt:2: .*whitespace.*a JPEG is no mask"):
        read_split(written(tmp_path / "spaced.txt", "images/a.jpg\nimages/my photo.jpg\n"))
    with pytest.raises(ValueError, match="no images"):
        read_split(written(tmp_path / "empty.txt", "\n"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_split(str(tmp_path / "missing.txt"))
    # an image given as the list: named, not Python's bare "'utf-8' codec can't decode byte 0xff"
    image = tmp_path / "frame.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    with pytest.raises(ValueError, match=r"split file .*frame\.jpg is not a text list \(not UTF-8"):
        read_split(str(image))


# ----------------------------------------------------------------------------------------------- file layouts


@pytest.mark.parametrize("layout", ["pascal", "cityscapes", "coco", "folder"])
def test_file_datasets_in_unimatch_format(tmp_path, layout):
    info = write_synthetic_folder(str(tmp_path / layout), layout=layout, num_labeled=2, num_unlabeled=3, num_val=2,
                                  size=40, seed=3)
    for line in open(info["labeled_list"]):
        img_rel, mask_rel = line.split()
        assert not os.path.isabs(img_rel) and os.path.isfile(os.path.join(info["root"], img_rel))
        assert os.path.isfile(os.path.join(info["root"], mask_rel))
    cfg = {"dataset": layout, "root": info["root"], "split_dir": info["split_dir"], "num_classes": 5,
           "crop_size": 32, "ignore_index": 255}
    bundle = build_datasets(cfg)
    assert (len(bundle.labeled), len(bundle.unlabeled), len(bundle.val)) == (2, 3, 2)

    item = bundle.labeled[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= set(range(5)) | {255}

    u = bundle.unlabeled[1]
    for key in ("image_w", "image_s", "image_s2", "image_m"):
        assert u[key].shape == (3, 32, 32) and u[key].dtype == torch.float32
    assert u["ignore"].shape == (32, 32) and set(u["ignore"].unique().tolist()) <= {0, 255}

    # Val: full image at the original size, the exact mask that was written.
    images, masks = generate_scenes(2, size=40, seed=3, split="val")
    v = bundle.val[1]
    assert v["image"].shape == (3, 40, 40) and v["mask"].shape == (40, 40)
    assert torch.equal(v["mask"], torch.from_numpy(masks[1].astype(np.int64)))
    tol = 0.08 if layout in ("pascal", "coco") else 1e-6  # JPEG images
    assert (_denorm(v["image"]) - image_to_tensor(images[1])).abs().mean() < tol
    assert isinstance(v["name"], str) and v["name"]


@pytest.mark.parametrize("layout", ["pascal", "cityscapes", "coco"])
def test_standard_val_list_from_layout(tmp_path, layout):
    info = write_synthetic_folder(str(tmp_path / layout), layout=layout, num_labeled=1, num_unlabeled=1, num_val=3,
                                  size=24)
    os.remove(info["val_list"])
    bundle = build_datasets({"dataset": layout, "root": info["root"], "split_dir": info["split_dir"],
                             "num_classes": 5, "crop_size": 16})
    _, masks = generate_scenes(3, size=24, split="val")
    got = sorted(bundle.val[i]["mask"].numpy().tobytes() for i in range(len(bundle.val)))
    assert got == sorted(m.astype(np.int64).tobytes() for m in masks)


def test_a_voc_val_list_saved_with_a_byte_order_mark_and_crlf_is_read(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "voc"), layout="pascal", num_labeled=1, num_unlabeled=1, num_val=2,
                                  size=24)
    os.remove(info["val_list"])
    voc_list = os.path.join(info["root"], "ImageSets", "Segmentation", "val.txt")
    ids = open(voc_list).read().split()
    with open(voc_list, "w", encoding="utf-8-sig", newline="\r\n") as f:  # as a Windows editor saves it
        f.write("".join(f"{i}\n" for i in ids))
    val = build_datasets({"dataset": "pascal", "root": info["root"], "split_dir": info["split_dir"],
                          "num_classes": 5, "crop_size": 16}).val
    assert [val.source.name(i) for i in range(len(val))] == [f"JPEGImages/{i}" for i in ids]
    val.validate(progress=False)


def test_folder_without_val_list_is_a_clear_error(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=1, num_unlabeled=1, num_val=1,
                                  size=24)
    os.remove(info["val_list"])
    cfg = {"dataset": "folder", "root": info["root"], "split_dir": info["split_dir"], "num_classes": 5}
    with pytest.raises(FileNotFoundError, match="val_list"):
        build_datasets(cfg)
    assert build_datasets(cfg, need_val=False).val is None


def test_unlabeled_list_without_masks(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=1, num_unlabeled=2, num_val=1,
                                  size=24, unlabeled_masks=False)
    assert read_split(info["unlabeled_list"])[0][1] is None
    bundle = build_datasets({"dataset": "folder", "root": info["root"], "split_dir": info["split_dir"],
                             "num_classes": 5, "crop_size": 16})
    assert (bundle.unlabeled[0]["mask"] == 255).all()


# ----------------------------------------------------------------------------------------------- errors


def test_label_value_error_names_the_file(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=3, num_unlabeled=1, num_val=1,
                                  size=24)
    img_rel, mask_rel = read_split(info["labeled_list"])[1]
    bad_path = os.path.join(info["root"], mask_rel)
    mask = np.array(Image.open(bad_path))
    mask[0, :3] = 255  # ignore is fine
    Image.fromarray(mask).save(bad_path)
    src = ListSource(info["root"], info["labeled_list"], num_classes=5, ignore_index=255)
    src.load(1)
    mask[5, 5] = 7
    Image.fromarray(mask).save(bad_path)
    with pytest.raises(ValueError, match=rf"{mask_rel}.*outside \[0, 5\).*: 7"):
        src.load(1)
    ds = LabeledDataset(src, crop_size=16, mean=MEAN, std=STD, ignore_index=255)
    with pytest.raises(ValueError, match=mask_rel):
        ds[1]
    with pytest.raises(ValueError, match=rf"(?s)1 bad item.*{mask_rel}"):
        ds.validate(progress=False)
    # A colour rendering instead of class indices is refused with the file name.
    Image.fromarray(palette(5)[np.minimum(mask, 4)]).save(bad_path)
    with pytest.raises(ValueError, match=rf"{mask_rel} has mode 'RGB'.*not a colour rendering"):
        src.load(1)
    # The class ids in three equal channels are said to be just that, with what to do.
    Image.fromarray(np.stack([mask] * 3, -1)).save(bad_path)
    with pytest.raises(ValueError, match=rf"{mask_rel} is stored as RGB with three equal channels .*save its first "
                                         r"channel alone"):
        src.load(1)


def test_a_split_file_written_with_windows_separators_is_named_so(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    windows = written(tmp_path / "windows.txt", open(info["labeled_list"]).read().replace("/", "\\"))
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*images\\labeled_00000.png \(first entry of "
                                                r".*windows.txt; the split file separates folders with '\\'"):
        ListSource(info["root"], windows, num_classes=5, ignore_index=255)


def test_a_labelled_or_val_line_without_a_mask_is_named(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=3, num_unlabeled=1, num_val=1,
                                  size=24)
    lines = open(info["labeled_list"]).read().splitlines()
    lines[1] = lines[1].split()[0]  # the image alone
    written(tmp_path / "f" / "splits" / "labeled.txt", "\n".join(lines) + "\n")
    src = ListSource(info["root"], info["labeled_list"], num_classes=5, ignore_index=255)
    with pytest.raises(ValueError, match=rf"the labelled list .* has 1 line\(s\) without a mask path, e.g. "
                                         rf".*labeled.txt:2: '{lines[1]}'; each needs 'img_path mask_path'"):
        LabeledDataset(src, crop_size=16, mean=MEAN, std=STD, ignore_index=255)
    with pytest.raises(ValueError, match=r"the val list .* has 1 line\(s\) without a mask path, e.g. .*labeled.txt:2"):
        ValDataset(src, mean=MEAN, std=STD, ignore_index=255)


def test_validate_counts_classes(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=3, num_unlabeled=1, num_val=1,
                                  size=24, seed=5)
    src = ListSource(info["root"], info["labeled_list"], num_classes=5, ignore_index=255)
    report = src.validate(progress=False)
    _, masks = generate_scenes(3, size=24, seed=5, split="labeled")
    assert report["num_items"] == 3 and report["errors"] == []
    assert report["class_pixels"] == np.bincount(masks.reshape(-1), minlength=5).tolist()


def test_missing_files_and_roots_are_named(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=3, num_unlabeled=1, num_val=1,
                                  size=24)
    missing_root = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_datasets({"dataset": "folder", "root": missing_root, "split_dir": info["split_dir"], "num_classes": 5})
    with pytest.raises(FileNotFoundError, match="nope"):
        ListSource(missing_root, info["labeled_list"], 5, 255)
    with pytest.raises(ValueError, match="data.root"):
        build_datasets({"dataset": "pascal", "split_dir": info["split_dir"]})
    with pytest.raises(ValueError, match="split_dir"):
        build_datasets({"dataset": "folder", "root": info["root"], "num_classes": 5})
    with pytest.raises(ValueError, match="data.dataset"):
        build_datasets({"dataset": "imagenet", "root": info["root"]})

    img_rel, mask_rel = read_split(info["labeled_list"])[2]
    os.remove(os.path.join(info["root"], mask_rel))
    # errors point at the list's line, counted as an editor counts it (a comment and a blank line before the items)
    with open(info["labeled_list"]) as f:
        listed = f.read()
    with open(info["labeled_list"], "w") as f:
        f.write("# labeled images\n\n" + listed)
    src = ListSource(info["root"], info["labeled_list"], 5, 255)
    assert read_split_lines(info["labeled_list"])[2][0] == 5
    with pytest.raises(FileNotFoundError, match=rf"{mask_rel} \({info['labeled_list']}:5\)"):
        src.load(2)
    with pytest.raises(ValueError, match=mask_rel):
        src.validate(progress=False)
    os.remove(os.path.join(info["root"], img_rel))
    with pytest.raises(FileNotFoundError, match=img_rel):
        src.load(2)

    absolute = tmp_path / "absolute.txt"  # SegNet's CamVid lists name /SegNet/CamVid/... files
    absolute.write_text("/SegNet/CamVid/train/a.png /SegNet/CamVid/trainannot/a.png\n")
    with pytest.raises(FileNotFoundError, match="lists absolute paths, which are used as they are"):
        ListSource(info["root"], str(absolute), 5, 255)

    first_img = read_split(info["labeled_list"])[0][0]
    os.remove(os.path.join(info["root"], first_img))
    with pytest.raises(FileNotFoundError, match=first_img):
        ListSource(info["root"], info["labeled_list"], 5, 255)

    os.remove(info["unlabeled_list"])
    with pytest.raises(FileNotFoundError, match="unlabeled.txt"):
        build_datasets({"dataset": "folder", "root": info["root"], "split_dir": info["split_dir"], "num_classes": 5})


# ----------------------------------------------------------------------------------------------- augmentation


def test_weak_aug_crop_size_and_pad_values():
    aug = WeakAugment(40, label_fill=255, scale_range=(1.0, 1.0), flip_p=0.0)
    image = torch.full((3, 20, 30), 0.6)
    labels = labels_to_tensor(np.full((20, 30), 3), np.zeros((20, 30)))
    img, lab = aug(image, labels)
    assert img.shape == (3, 40, 40) and lab.shape == (2, 40, 40)
    assert torch.all(img[:, :20, :30] == 0.6) and torch.all(lab[0, :20, :30] == 3) and torch.all(lab[1, :20, :30] == 0)
    assert torch.all(img[:, 20:] == 0) and torch.all(img[:, :, 30:] == 0)
    assert torch.all(lab[:, 20:] == 255) and torch.all(lab[:, :, 30:] == 255)

    random.seed(0)
    aug = WeakAugment(48, label_fill=255)
    for h, w in ((17, 90), (64, 64), (200, 31)):
        img, lab = aug(torch.rand(3, h, w), labels_to_tensor(np.zeros((h, w))))
        assert img.shape == (3, 48, 48) and lab.shape == (1, 48, 48)


def _block_pattern(h: int, w: int, block: int, num_classes: int):
    yy, xx = np.mgrid[0:h, 0:w]
    label = ((yy // block) * 3 + (xx // block) * 2) % num_classes
    colours = np.linspace(0.1, 0.9, num_classes)
    image = np.stack([colours[label], 1 - colours[label], colours[(label + 1) % num_classes]])
    return torch.from_numpy(image).float(), label, colours


def test_weak_aug_keeps_image_and_mask_aligned():
    """Scale, crop and flip move image and mask together: in the interior of every block the image still shows
    the colour of the block's label."""
    image, label, colours = _block_pattern(60, 84, 12, 5)
    expected = torch.tensor(np.stack([colours, 1 - colours, np.roll(colours, -1)]), dtype=torch.float32)
    aug = WeakAugment(48, label_fill=255, scale_range=(0.5, 2.0))
    random.seed(1)
    for _ in range(20):
        img, lab = aug(image, labels_to_tensor(label))
        lab = lab[0]
        valid = lab != 255
        # interior: the 5x5 neighbourhood has one label
        padded = torch.nn.functional.pad(lab[None, None].float(), (2, 2, 2, 2), value=-1)
        window = padded.unfold(2, 5, 1).unfold(3, 5, 1)[0, 0]
        interior = valid & (window.amax((-1, -2)) == window.amin((-1, -2)))
        assert interior.sum() > 50
        want = expected[:, lab[interior]]
        assert (img[:, interior] - want).abs().max() < 0.02
        assert torch.all(img[:, ~valid] == 0)  # padding (this source has no ignore pixels)
    # the flip happens: the same crop with and without it are mirror images
    aug_no = WeakAugment(48, 255, (1.0, 1.0), flip_p=0.0)
    aug_yes = WeakAugment(48, 255, (1.0, 1.0), flip_p=1.0)
    random.seed(7)
    a_img, a_lab = aug_no(image, labels_to_tensor(label))
    random.seed(7)
    b_img, b_lab = aug_yes(image, labels_to_tensor(label))
    assert torch.equal(a_img.flip(-1), b_img) and torch.equal(a_lab.flip(-1), b_lab)


def test_unlabeled_views_share_geometry():
    src = SyntheticSource(4, size=40, seed=2, split="unlabeled")
    ds = UnlabeledDataset(src, crop_size=48, mean=MEAN, std=STD, ignore_index=255)
    random.seed(0)
    torch.manual_seed(0)
    differs = streams_differ = 0
    for i in range(4):
        out = ds[i]
        differs += int(not torch.equal(out["image_w"], out["image_s"]))
        streams_differ += int(not torch.equal(out["image_s"], out["image_s2"]))
        assert torch.equal(out["ignore"] == 255, out["mask"] == 255)  # synthetic GT has no ignore pixels
    assert differs > 0  # the strong view is photometrically different
    assert streams_differ > 0  # the two strong streams draw their colour augmentations independently
    ds.strong = ds.mild = lambda x: x  # without the colour ops the four views are the same pixels
    for i in range(4):
        random.seed(i)
        out = ds[i]
        assert all(torch.equal(out["image_w"], out[key]) for key in ("image_s", "image_s2", "image_m"))
        raw = _denorm(out["image_w"])
        assert torch.all(raw[:, out["ignore"] == 255].abs() < 1e-6)  # padded pixels are black in every view
        # the GT mask follows the same geometry as the image
        random.seed(i)
        img, lab = ds.weak(image_to_uint8(src.load(i)[0]), labels_to_tensor(src.load(i)[1]))
        assert torch.equal(lab[0], out["mask"]) and torch.allclose(to_float(img), raw, atol=1e-5)


# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_scenes_are_deterministic_and_varied():
    a_img, a_mask = generate_scenes(3, size=48, seed=11)
    b_img, b_mask = generate_scenes(3, size=48, seed=11)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    p_img, p_mask = generate_scenes(2, size=48, seed=11)
    assert np.array_equal(p_img, a_img[:2]) and np.array_equal(p_mask, a_mask[:2])  # scene i depends on (seed, i)
    c_img, _ = generate_scenes(3, size=48, seed=12)
    assert not np.array_equal(a_img, c_img)
    v_img, _ = generate_scenes(3, size=48, seed=11, split="val")
    assert not np.array_equal(a_img, v_img)
    assert a_img.dtype == np.uint8 and a_mask.max() < 5

    _, masks = generate_scenes(20, size=64, seed=0, num_classes=5)
    assert set(np.unique(masks).tolist()) == set(range(5))
    _, masks3 = generate_scenes(5, size=32, seed=0, num_classes=3)
    assert masks3.max() <= 2
    with pytest.raises(ValueError, match="num_classes"):
        generate_scenes(1, num_classes=9)


def test_synthetic_colour_alone_does_not_give_the_class():
    """A nearest-mean colour classifier over the object classes stays near chance (1/4)."""
    images, masks = generate_scenes(40, size=64, seed=4)
    obj = masks > 0
    rgb, cls = images[obj].astype(np.float64), masks[obj]
    half = len(rgb) // 2
    means = np.stack([rgb[:half][cls[:half] == k].mean(0) for k in range(1, 5)])
    pred = 1 + np.argmin(((rgb[half:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == cls[half:]).mean() < 0.45


def _has_hole(region: np.ndarray) -> bool:
    """Whether some pixel outside ``region`` cannot reach the frame's border without crossing it (4-neighbours)."""
    outside = ~region
    reach = np.zeros_like(region)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1]
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= outside
        if np.array_equal(grown, reach):
            return bool((outside & ~reach).any())
        reach = grown


def _recorded_scenes(monkeypatch, num: int, num_classes: int, size: int = 40) -> list[tuple[np.ndarray, list]]:
    """Scenes with the objects each was painted from: ``[(mask, [(shape, region, texture kind), ...]), ...]``."""
    from csl.data import synthetic

    events = []
    shape_mask, texture = synthetic._shape_mask, synthetic._texture

    def recorded_shape(rng, shape, yy, xx, size):
        region = shape_mask(rng, shape, yy, xx, size)
        events.append([shape, region, None])
        return region

    def recorded_texture(rng, kind, yy, xx):
        if events and events[-1][2] is None:  # the object just drawn (a background texture comes before any)
            events[-1][2] = kind
        return texture(rng, kind, yy, xx)

    monkeypatch.setattr(synthetic, "_shape_mask", recorded_shape)
    monkeypatch.setattr(synthetic, "_texture", recorded_texture)
    scenes = []
    for i in range(num):
        events.clear()
        _, masks = generate_scenes(1, size=size, seed=i, split="unlabeled", num_classes=num_classes)
        scenes.append((masks[0], [tuple(e) for e in events]))
    return scenes


def test_synthetic_objects_follow_the_class_table(monkeypatch):
    """The module's table: class k is shape k (1 disk ... 5 cross) and wears texture k four times out of five
    (0.75 + 0.25 / 5); 2-5 objects a scene; only the shapes of the classes asked for; a ring has a hole, no other
    shape has; the last object painted is labelled its class wherever it lies."""
    from csl.data.synthetic import SHAPES, TEXTURES

    scenes = _recorded_scenes(monkeypatch, 60, num_classes=6)
    assert {len(objects) for _, objects in scenes} == {2, 3, 4, 5}
    objects = [obj for _, objs in scenes for obj in objs if obj[1].any()]
    assert {shape for shape, _, _ in objects} == set(SHAPES)
    preferred = np.mean([kind == TEXTURES[SHAPES.index(shape)] for shape, _, kind in objects])
    assert 0.7 < preferred < 0.9, preferred
    for mask, objs in scenes:
        shape, region, _ = objs[-1]
        assert (mask[region] == 1 + SHAPES.index(shape)).all(), shape
    rings = [_has_hole(region) for shape, region, _ in objects if shape == "ring"]
    assert np.mean(rings) > 0.8  # a ring cut by the frame can lose its hole
    assert not any(_has_hole(region) for shape, region, _ in objects if shape != "ring")
    few = _recorded_scenes(monkeypatch, 20, num_classes=3)
    assert {shape for _, objs in few for shape, _, _ in objs} == {"disk", "rectangle"}


def test_synthetic_splits_and_scenes_are_distinct_and_arguments_checked():
    """The three splits are three streams (no val scene among the unlabeled ones, no labeled scene twice), no two
    scenes of a split alike; an empty list is an empty array, a too small size or a single class an error."""
    scenes = {split: generate_scenes(4, size=24, seed=3, split=split)[0] for split in ("labeled", "unlabeled", "val")}
    flat = [img.tobytes() for imgs in scenes.values() for img in imgs]
    assert len(set(flat)) == len(flat) == 12
    assert SyntheticSource(1, size=16, split="val").name(0) == "synthetic_val_00000"  # the name tells the split
    images, masks = generate_scenes(0, size=24)
    assert images.shape == (0, 24, 24, 3) and masks.shape == (0, 24, 24)
    with pytest.raises(ValueError, match="size must be >= 16, got 15"):
        generate_scenes(1, size=15)
    with pytest.raises(ValueError, match="2 to 6 classes, got num_classes=1"):
        generate_scenes(1, num_classes=1)


def test_synthetic_objects_stand_out_from_the_muted_background():
    """The background is greyish (its channels within a few hundredths of each other before noise), an object's
    colour is drawn per channel over [0.05, 0.95]: the objects' pixels are far more colourful."""
    images, masks = generate_scenes(20, size=48, seed=5)
    spread = images.max(axis=-1).astype(np.float64) - images.min(axis=-1)
    assert spread[masks > 0].mean() > 2 * spread[masks == 0].mean()


class _RecordingRng:
    """A numpy Generator whose draws are recorded as ``(method, args, result)``; ``replace`` maps a draw's index to
    the value returned in its place (the draw is still made, so the stream stays the same)."""

    def __init__(self, seed, replace: dict | None = None):
        self._gen, self.replace, self.draws = np.random.default_rng(seed), replace or {}, []

    def __getattr__(self, name):
        def draw(*args, **kwargs):
            result = getattr(self._gen, name)(*args, **kwargs)
            result = self.replace.get(len(self.draws), result)
            self.draws.append((name, args, result))
            return result

        return draw


class _ClipRecorder:
    """numpy, with each ``clip`` call's input kept: the scene's last one is its float image before quantisation."""

    def __init__(self):
        self.inputs = []

    def __getattr__(self, name):
        return getattr(np, name)

    def clip(self, a, *args, **kwargs):
        self.inputs.append(np.array(a, copy=True))
        return np.clip(a, *args, **kwargs)


def test_synthetic_global_brightness_and_contrast(monkeypatch):
    """The scene's last three draws are its global photometric change: a contrast factor c in [0.8, 1.2] about
    mid-grey, a brightness shift b ~ N(0, 0.05), both one number for the whole image (every pixel and channel), drawn
    anew for each scene, then pixel noise ~ N(0, 0.03). Each scene drawn again with c = 1, b = 0 and no noise gives
    the image before the change: the image is (before - 0.5) * c + 0.5 + b + noise, clipped to [0, 1] and rounded to
    uint8 (some pixels leave [0, 1] and are clipped); the mask does not change."""
    from csl.data import synthetic

    clips = _ClipRecorder()
    monkeypatch.setattr(synthetic, "np", clips)
    contrast, brightness, noise, clipped = [], [], [], 0
    for i in range(40):
        rng = _RecordingRng([7, 1, i])
        image, mask = synthetic.generate_scene(rng, size=24, num_classes=6)
        after = clips.inputs[-1]
        (c_draw, _, c), (b_draw, _, b), (n_draw, _, n) = rng.draws[-3:]
        assert (c_draw, b_draw, n_draw) == ("uniform", "normal", "normal")
        assert np.ndim(c) == np.ndim(b) == 0 and np.shape(n) == (24, 24, 3)
        k = len(rng.draws)
        plain = _RecordingRng([7, 1, i], replace={k - 3: 1.0, k - 2: 0.0, k - 1: np.zeros((24, 24, 3))})
        _, plain_mask = synthetic.generate_scene(plain, size=24, num_classes=6)
        before = clips.inputs[-1]
        assert len(plain.draws) == k and np.array_equal(plain_mask, mask)
        np.testing.assert_allclose(after, (before - 0.5) * c + 0.5 + b + n, atol=1e-5)
        assert np.array_equal(image, (np.clip(after, 0, 1) * 255 + 0.5).astype(np.uint8))
        contrast.append(c)
        brightness.append(b)
        noise.append(n)
        clipped += int(((after < 0) | (after > 1)).sum())
    assert 0.8 <= min(contrast) < 0.85 and 1.15 < max(contrast) <= 1.2 and len(set(contrast)) == 40
    assert abs(np.mean(brightness)) < 0.03 and 0.03 < np.std(brightness) < 0.07 and len(set(brightness)) == 40
    assert abs(np.mean(noise)) < 0.002 and 0.028 < np.std(noise) < 0.032
    assert clipped > 0
    rng = np.random.default_rng([7, 1, 3])
    assert np.array_equal(generate_scenes(4, size=24, seed=7, split="unlabeled", num_classes=6)[0][3],
                          synthetic.generate_scene(rng, size=24, num_classes=6)[0])  # each scene its own draws


@pytest.mark.parametrize("layout", ["pascal", "cityscapes", "coco", "folder"])
def test_synthetic_folder_gives_every_scene_its_own_files(tmp_path, layout):
    """Scene i of each split has its own image and mask file in every layout (index 0 of the labeled, unlabeled
    and val lists must not share a name), and the validation counts a class absent from the scenes as 0 pixels."""
    info = write_synthetic_folder(str(tmp_path / layout), layout=layout, num_labeled=2, num_unlabeled=3, num_val=2,
                                  size=24, seed=1)
    paths = [p for name in ("labeled_list", "unlabeled_list", "val_list") for line in open(info[name])
             for p in line.split()]
    assert len(paths) == len(set(paths)) == 2 * 7
    for split, n in (("labeled", 2), ("unlabeled", 3), ("val", 2)):
        _, masks = generate_scenes(n, size=24, seed=1, split=split)
        for i, line in enumerate(open(info[f"{split}_list"])):
            stored = np.array(Image.open(os.path.join(info["root"], line.split()[1])))
            assert np.array_equal(stored, masks[i]), (split, i)
    src = SyntheticSource(1, size=16, num_classes=6)
    src.masks[:] = 0
    assert src.validate(progress=False)["class_pixels"] == [256, 0, 0, 0, 0, 0]


def test_build_synthetic_bundle_and_worker_seeding():
    cfg = {"dataset": "synthetic", "num_classes": 5, "crop_size": 32,
           "synthetic": {"num_labeled": 4, "num_unlabeled": 6, "num_val": 2, "size": 40, "seed": 1}}
    bundle = build_datasets(cfg)
    assert (len(bundle.labeled), len(bundle.unlabeled), len(bundle.val)) == (4, 6, 2)
    assert bundle.val[0]["image"].shape == (3, 40, 40)

    def first_batches(parent_seed: int) -> list[torch.Tensor]:
        random.seed(parent_seed)  # must not leak into the workers: seed_worker reseeds them
        np.random.seed(parent_seed)
        g = torch.Generator()
        g.manual_seed(123)
        loader = DataLoader(bundle.unlabeled, batch_size=3, shuffle=True, num_workers=2, generator=g,
                            worker_init_fn=seed_worker)
        return [torch.cat([b["image_w"], b["image_s"], b["image_s2"], b["image_m"]]) for b in loader]

    a, b = first_batches(0), first_batches(99)
    assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="num_classes"):
        build_datasets({**cfg, "num_classes": 12})


def test_palette():
    p = palette(21)
    assert p.shape == (21, 3) and p.dtype == np.uint8
    assert p[0].tolist() == [0, 0, 0] and p[1].tolist() == [128, 0, 0] and p[15].tolist() == [192, 128, 128]
    assert palette(19, "cityscapes")[0].tolist() == [128, 64, 128]
    assert len({tuple(c) for c in palette(256)}) == 256


def test_weak_aug_equals_resize_then_pad_then_crop():
    """The crop-restricted label gathering equals resizing the whole map (nearest-exact), padding and cropping."""
    from csl.data.transforms import random_scaled_size, resize_image

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 37, 53), dtype=np.uint8))
    labels = labels_to_tensor(rng.integers(0, 5, (37, 53), dtype=np.uint8), np.zeros((37, 53), dtype=np.uint8))
    aug = WeakAugment(48, 255, (0.5, 2.0), flip_p=0.0)
    for seed in range(12):
        random.seed(seed)
        img, lab = aug(image, labels)
        random.seed(seed)
        oh, ow = random_scaled_size(37, 53, (0.5, 2.0))
        ref_img = resize_image(image, (oh, ow))
        ref_lab = torch.nn.functional.interpolate(labels[None].float(), size=(oh, ow), mode="nearest-exact")[0]
        ph, pw = max(48 - oh, 0), max(48 - ow, 0)
        ref_img = torch.nn.functional.pad(ref_img, (0, pw, 0, ph), value=0)
        ref_lab = torch.nn.functional.pad(ref_lab, (0, pw, 0, ph), value=255).long()
        x, y = random.randint(0, ow + pw - 48), random.randint(0, oh + ph - 48)
        assert torch.equal(img, ref_img[:, y:y + 48, x:x + 48])
        assert torch.equal(lab, ref_lab[:, y:y + 48, x:x + 48])
        assert lab.dtype == torch.int64 and img.dtype == torch.uint8


def test_scan_folder_and_write_split_roundtrip(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    from csl.data import scan_folder, write_split

    items = scan_folder(info["root"])
    assert len(items) == 4 and all(m == f"masks/{os.path.basename(i)}" for i, m in items)
    write_split(str(tmp_path / "lists" / "all.txt"), items)
    assert read_split(str(tmp_path / "lists" / "all.txt")) == items
    src = ListSource(info["root"], str(tmp_path / "lists" / "all.txt"), 5, 255)
    assert src.validate(progress=False)["num_items"] == 4
    assert all(m is None for _, m in scan_folder(info["root"], masks=None))
    os.remove(os.path.join(info["root"], items[0][1]))
    with pytest.raises(FileNotFoundError, match=items[0][1]):
        scan_folder(info["root"])


def test_another_ignore_value_in_the_files_is_ignored_end_to_end(tmp_path):
    """data.ignore_index names the files' value; every mask, padding and loss inside csl sees 255 (the kernels')."""
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=2,
                                  size=40, seed=4)
    originals = {}
    for mask_path in glob.glob(os.path.join(info["root"], "masks", "*.png")):
        mask = np.array(Image.open(mask_path))
        originals[mask_path] = mask
        rewritten = mask.copy()
        rewritten[:6, :6] = 254  # an unlabelled corner, in the files' convention
        Image.fromarray(rewritten, mode=Image.open(mask_path).mode).save(mask_path)
    cfg = {"dataset": "folder", "root": info["root"], "split_dir": info["split_dir"], "num_classes": 5,
           "crop_size": 48, "ignore_index": 254}
    bundle = build_datasets(cfg)
    _, masks = generate_scenes(2, size=40, seed=4, split="val")
    for i in range(2):
        expected = torch.from_numpy(masks[i].astype(np.int64))
        expected[:6, :6] = 255
        assert torch.equal(bundle.val[i]["mask"], expected)  # the files' 254 is 255 inside csl
    item = bundle.labeled[0]  # crop 48 > 40: padded with 255, never with the files' 254
    assert set(item["mask"].unique().tolist()) <= set(range(5)) | {255} and (item["mask"] == 255).any()
    assert set(bundle.unlabeled[0]["ignore"].unique().tolist()) <= {0, 255}
    # A file value 255 is now neither a class nor ignored: an error naming the file and the value.
    path = sorted(originals)[0]
    bad = originals[path].copy()
    bad[0, 0] = 255
    Image.fromarray(bad).save(path)
    bundle = build_datasets(cfg)
    with pytest.raises(ValueError, match=r"masks/.*\.png has label values outside \[0, 5\) that are not ignored "
                                         r"\(data.ignore_index 254\): 255"):
        for ds in (bundle.labeled, bundle.unlabeled, bundle.val):
            for i in range(len(ds)):
                ds[i]


def test_nearly_black_12_bit_and_transparent_images_are_warned_once(tmp_path, monkeypatch, caplog):
    from csl.data import datasets
    from csl.data.datasets import load_image

    monkeypatch.setattr(datasets, "_SAID_ONCE", set())
    twelve = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 16).astype(np.uint16)  # 0 .. 4080
    for name in ("raw0.png", "raw1.png"):
        Image.fromarray(twelve).save(tmp_path / name)
    full = tmp_path / "full16.png"
    Image.fromarray(twelve * 16).save(full)  # 0 .. 65280: the 16-bit range used
    rgba = np.full((8, 8, 4), 200, np.uint8)
    rgba[..., 3] = 255
    opaque, transparent = tmp_path / "opaque.png", tmp_path / "transparent.png"
    Image.fromarray(rgba).save(opaque)
    rgba[:4, :, 3] = 0
    Image.fromarray(rgba).save(transparent)
    with caplog.at_level(logging.WARNING, logger="csl"):
        assert load_image(str(full)).max() > 250
        assert load_image(str(opaque)).shape == (8, 8, 3)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert load_image(str(tmp_path / "raw0.png")).max() <= 16  # nearly black, as the warning says
        load_image(str(tmp_path / "raw1.png"))
        np.testing.assert_array_equal(load_image(str(transparent)), 200)  # stored colour kept
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2, said
    assert "raw0.png is 16-bit but no pixel exceeds 4080 (12-bit data?)" in said[0]
    assert "transparent.png has transparent pixels" in said[1]


def test_16_bit_images_are_scaled_and_truncated_files_named(tmp_path):
    from csl.data.datasets import load_image, load_mask

    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(str(path))
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], np.rint(ramp / 65535 * 255).astype(np.uint8))  # not clipped at 255
    assert (image == 255).mean() < 0.01
    good = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.png"):
        load_image(str(cut))
    mask = tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 5, (64, 64), dtype=np.uint8)).save(mask)
    cut_mask = tmp_path / "cut_mask.png"
    cut_mask.write_bytes(mask.read_bytes()[: len(mask.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"cannot read mask .*cut_mask\.png"):
        load_mask(str(cut_mask))


def test_an_unusable_unlabeled_mask_is_no_ground_truth_not_an_error(tmp_path, caplog):
    """UniMatch never reads the unlabeled images' masks; here they only score the pseudo-labels. A missing or broken
    one makes its image one without ground truth (one warning per list), where a labeled mask stays an error."""
    import logging

    info = write_synthetic_folder(str(tmp_path / "d"), layout="folder", num_labeled=2, num_unlabeled=3, num_val=2,
                                  size=40, seed=3)
    bundle = build_datasets({"dataset": "folder", "root": info["root"], "split_dir": info["split_dir"],
                             "num_classes": 5, "crop_size": 32})
    unlabeled = [line.split()[1] for line in open(info["unlabeled_list"])]
    os.remove(os.path.join(info["root"], unlabeled[0]))
    with open(os.path.join(info["root"], unlabeled[1]), "wb") as f:
        f.write(b"not a png")
    caplog.set_level(logging.WARNING, logger="csl")
    for index in (0, 1, 0):
        assert bundle.unlabeled[index]["mask"].eq(255).all()
    assert bundle.unlabeled[2]["mask"].ne(255).any()  # its ground truth is still read
    warnings = [r.getMessage() for r in caplog.records if "without ground truth" in r.getMessage()]
    assert len(warnings) == 1 and "mask file not found" in warnings[0]
    os.remove(os.path.join(info["root"], open(info["labeled_list"]).readline().split()[1]))
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        bundle.labeled[0]


def test_mean_and_std_on_the_0_255_scale_are_refused(tmp_path):
    """Images are scaled to [0, 1] before normalising: mmseg's 0-255 constants would make every input ~constant."""
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    data = {"dataset": "folder", "root": info["root"], "split_dir": info["split_dir"], "num_classes": 5}
    with pytest.raises(ValueError, match=r"data.mean and data.std are for images scaled to \[0, 1\].*divide"):
        build_datasets({**data, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]})
    # Constants on the [0, 1] scale are taken and used: the same val image under the default normalisation and
    # under mean 0.5 / std 0.25.
    default, custom = build_datasets(data), build_datasets({**data, "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3})
    assert custom.labeled.mean == (0.5, 0.5, 0.5) and custom.labeled.std == (0.25, 0.25, 0.25)
    m0, s0 = (torch.tensor(v).view(3, 1, 1) for v in (default.val.mean, default.val.std))
    scaled = default.val[0]["image"] * s0 + m0  # the image on the [0, 1] scale
    assert 0.05 < float(scaled.std())
    torch.testing.assert_close(custom.val[0]["image"], (scaled - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_a_missing_cityscapes_or_voc_mask_says_how_to_make_it(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "c"), layout="cityscapes", num_labeled=2, num_unlabeled=1,
                                  num_val=1, size=24)
    os.remove(os.path.join(info["root"], read_split(info["labeled_list"])[1][1]))
    src = build_datasets({"dataset": "cityscapes", "root": info["root"], "split_dir": info["split_dir"]}
                         ).labeled.source
    with pytest.raises(FileNotFoundError, match=r"labelTrainIds.*labeled.txt:2\).*createTrainIdLabelImgs"):
        src.load(1)
    voc = write_synthetic_folder(str(tmp_path / "v"), layout="pascal", num_labeled=2, num_unlabeled=1, num_val=1,
                                 size=24)
    os.remove(os.path.join(voc["root"], read_split(voc["labeled_list"])[0][1]))
    src_voc = build_datasets({"dataset": "pascal", "root": voc["root"], "split_dir": voc["split_dir"]}).labeled.source
    with pytest.raises(FileNotFoundError, match=r"SegmentationClass.*labeled.txt:1\).*SBD-augmented masks "
                                                r"\(SegmentationClassAug\) under the name SegmentationClass"):
        src_voc.load(0)
    with pytest.raises(ValueError, match=r"createTrainIdLabelImgs"):
        src.validate(progress=False)


def test_an_image_zeroed_after_its_start_is_a_listed_error(tmp_path):
    """A PNG whose end was zeroed (a copy cut short onto a pre-allocated file): PIL raises SyntaxError ("broken PNG
    file"), which the start check lists as a bad item and the loader says as a ValueError naming the item."""
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=64)
    img_rel = read_split(info["labeled_list"])[1][0]
    path = os.path.join(info["root"], img_rel)
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)  # incompressible: several IDAT chunks
    data = bytearray(open(path, "rb").read())
    at = data.index(b"IDAT") - 4
    end_of_first = at + 12 + int.from_bytes(data[at:at + 4], "big")  # length, type, data, CRC
    data[end_of_first:] = bytes(len(data) - end_of_first)
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(SyntaxError, match="broken PNG file"):  # what PIL raises for it
        Image.open(path).load()
    src = ListSource(info["root"], info["labeled_list"], num_classes=5, ignore_index=255)
    with pytest.raises(ValueError, match=r"(?s)1 bad item\(s\).*labeled.txt:2: .*broken PNG file"):
        src.validate(progress=False)
    with pytest.raises(ValueError, match=rf"cannot read image .*{img_rel}.*\(.*labeled.txt:2\)"):
        src.load(1)
    assert src.damaged_images() and img_rel in src.damaged_images()[0]


@pytest.mark.parametrize("side", [1, 2, 6, 7])
def test_the_blur_takes_crops_smaller_than_its_kernel(side):
    """sigma 2 asks for a 13-tap kernel; reflect padding needs half of it below the side: cut to fit, still a blur."""
    import torchvision.transforms.functional as TF

    from csl.data.transforms import gaussian_blur

    image = torch.rand(3, side, side + 3)
    out = gaussian_blur(image, 2.0)
    assert out.shape == image.shape and torch.isfinite(out).all()
    if side > 1:
        assert not torch.equal(out, image)
    big = torch.rand(3, 40, 40)  # where the kernel fits, it is the full 2 ceil(3 sigma) + 1 taps
    torch.testing.assert_close(gaussian_blur(big, 2.0), TF.gaussian_blur(big, [13, 13], [2.0, 2.0]), rtol=0, atol=0)


def test_strong_and_mild_views_use_unimatchs_and_tmps_settings():
    """UniMatch's strong view: jitter 0.5/0.5/0.5/0.25 with p 0.8, grayscale 0.2, blur 0.5; TMP's masking view:
    jitter 0.25/0.25/0.25/0.05 with p 0.8, no grayscale, blur 0.5."""
    from csl.data.transforms import ColorAugment

    strong = (ColorAugment.strong(), ((0.5, 1.5), (0.5, 1.5), (0.5, 1.5), (-0.25, 0.25)), (0.8, 0.2, 0.5))
    mild = (ColorAugment.mild(), ((0.75, 1.25), (0.75, 1.25), (0.75, 1.25), (-0.05, 0.05)), (0.8, 0.0, 0.5))
    for view, jitter, p in (strong, mild):
        j = view.jitter
        assert (tuple(j.brightness), tuple(j.contrast), tuple(j.saturation), tuple(j.hue)) == jitter
        assert (view.p_jitter, view.p_gray, view.p_blur) == p


def test_each_unlabeled_view_gets_its_own_colour_augmentation():
    """image_s and image_s2 are the strong view (two draws), image_m the mild one, image_w none."""
    from csl.data.transforms import ColorAugment

    src = SyntheticSource(2, size=40, seed=2, split="unlabeled")
    ds = UnlabeledDataset(src, crop_size=32, mean=MEAN, std=STD, ignore_index=255)
    assert isinstance(ds.strong, ColorAugment) and ds.strong.p_gray == 0.2 and ds.mild.p_gray == 0.0
    ds.strong = lambda x: torch.full_like(x, 0.25)
    ds.mild = lambda x: torch.full_like(x, 0.75)
    out = ds[0]
    for key, value in (("image_s", 0.25), ("image_s2", 0.25), ("image_m", 0.75)):
        torch.testing.assert_close(_denorm(out[key]), torch.full_like(out[key], value))
    assert not torch.allclose(_denorm(out["image_w"]), torch.full_like(out["image_w"], 0.25))


def test_a_mask_of_another_size_than_its_image_is_refused_with_both_names(tmp_path):
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    img_rel, mask_rel = read_split(info["labeled_list"])[0]
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(os.path.join(info["root"], mask_rel))
    src = ListSource(info["root"], info["labeled_list"], num_classes=5, ignore_index=255)
    with pytest.raises(ValueError, match=rf"mask .*{mask_rel} is 24x20 but image .*{img_rel} is 24x24 \(W x H\)"):
        src.load(0)
    with pytest.raises(ValueError, match=rf"(?s)1 bad item.*labeled.txt:1: mask .*{mask_rel} is 24x20 but image"):
        src.validate(progress=False)


def test_a_mask_stored_as_jpeg_under_a_png_name_is_refused(tmp_path):
    """A JPEG's blurred edges hold values between the classes: with 150 classes they are all in range, so only the
    file's format tells such a mask from a class-index PNG."""
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    _, mask_rel = read_split(info["labeled_list"])[0]
    mask_path = os.path.join(info["root"], mask_rel)
    stripes = np.repeat(np.arange(0, 120, 20, dtype=np.uint8), 4)[None, :].repeat(24, axis=0)
    Image.fromarray(stripes).save(mask_path, format="JPEG", quality=90)  # a renamed .jpg
    src = ListSource(info["root"], info["labeled_list"], num_classes=150, ignore_index=255)
    with pytest.raises(ValueError, match=rf"mask .*{mask_rel} is a JPEG file.*store masks as PNG"):
        src.load(0)
    with pytest.raises(ValueError, match=rf"(?s)1 bad item.*labeled.txt:1: mask .*{mask_rel} is a JPEG file"):
        src.validate(progress=False)


def test_images_with_an_exif_orientation_are_named_where_masks_may_be_drawn_turned(tmp_path, caplog, monkeypatch):
    """Training reads images as stored; annotation tools show them turned as their EXIF orientation says. A mask of
    the turned size is refused saying so; one that fits the stored size (a half turn) is named in a warning, on
    every start (also where the cached label check is not run again)."""
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    (img0, mask0), (img1, _) = read_split(info["labeled_list"])
    src = ListSource(info["root"], info["labeled_list"], num_classes=5, ignore_index=255)
    half_turn = Image.Exif()
    half_turn[0x0112] = 3
    Image.open(os.path.join(info["root"], img1)).save(os.path.join(info["root"], img1), exif=half_turn)
    with caplog.at_level(logging.WARNING, logger="csl"):
        src.validate(progress=False)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and f"1 of the 2 images of {info['labeled_list']} have an EXIF orientation" in said[0]
    assert f"{img1} (orientation 3)" in said[0]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for expected_ran in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="csl"):
            ran, _ = src.check_cached(progress=False)
        assert ran is expected_ran
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == said

    quarter_turn = Image.Exif()
    quarter_turn[0x0112] = 6
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(os.path.join(info["root"], img0), exif=quarter_turn)
    Image.fromarray(np.zeros((24, 20), np.uint8)).save(os.path.join(info["root"], mask0))  # drawn on the turned view
    with pytest.raises(ValueError, match=rf"(?s)1 bad item.*{mask0} is 20x24 but image .*{img0} is 24x20 \(W x H\); "
                                         r"the image's EXIF orientation 6 turns it to the mask's size"):
        src.validate(progress=False)
    with pytest.raises(ValueError, match=r"is 20x24 but image .* is 24x20 \(W x H\); the image's EXIF orientation 6"):
        src.load(0)  # as csl eval and a run with data.check_labels=false read it


def test_the_short_side_is_rounded_as_in_unimatchs_resize():
    """UniMatch: ow = int(w * long_side / h + 0.5): the long side 4 scaled to 2 makes the short side 3 into 2, not 1."""
    from csl.data.transforms import random_scaled_size

    assert random_scaled_size(3, 4, (0.5, 0.5)) == (2, 2)
    assert random_scaled_size(4, 3, (0.5, 0.5)) == (2, 2)
    assert random_scaled_size(37, 53, (1.0, 1.0)) == (37, 53)


def test_a_float_image_stays_in_the_unit_range_when_resized():
    """The antialiasing filter's weights sum to one only up to rounding: a white image would come out above 1."""
    from csl.data.transforms import resize_image

    out = resize_image(torch.ones(3, 37, 53), (19, 26))
    assert out.min() >= 0 and out.max() <= 1


def test_a_scaled_item_has_its_sides_rounded_to_the_nearest_pixel():
    """data.image_scale 0.3 of a 12 x 16 frame: 3.6 x 4.8 rounds to 4 x 5 (image and mask alike)."""
    from csl.data.datasets import resize_pair

    image, mask = resize_pair(np.zeros((12, 16, 3), dtype=np.uint8), np.zeros((12, 16), dtype=np.uint8), 0.3)
    assert image.shape == (4, 5, 3) and mask.shape == (4, 5)


def test_a_mask_rewritten_in_place_is_checked_again(tmp_path, monkeypatch):
    """The remembered check vouches for files of the same path, size and modification time: a mask rewritten with
    a bad value (and, stored uncompressed, the same size) is checked again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    path = os.path.join(info["root"], read_split(info["labeled_list"])[0][1])
    mask = np.array(Image.open(path))
    Image.fromarray(mask).save(path, compress_level=0)
    src = ListSource(info["root"], info["labeled_list"], num_classes=5, ignore_index=255)
    assert src.check_cached(progress=False)[0] and not src.check_cached(progress=False)[0]  # checked, then remembered
    size, mtime = os.path.getsize(path), os.stat(path).st_mtime_ns
    mask[0, 0] = 9
    Image.fromarray(mask).save(path, compress_level=0)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert os.path.getsize(path) == size
    with pytest.raises(ValueError, match=r"label values outside \[0, 5\).*: 9"):
        src.check_cached(progress=False)


def test_a_jpeg_mask_that_an_older_check_passed_is_checked_again(tmp_path, monkeypatch):
    """A stamp of the checks before JPEG masks were refused (VALIDATION_VERSION 2, load_mask reading any
    single-channel file) does not vouch for the files now."""
    from csl.data import datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = write_synthetic_folder(str(tmp_path / "f"), layout="folder", num_labeled=2, num_unlabeled=1, num_val=1,
                                  size=24)
    mask_path = os.path.join(info["root"], read_split(info["labeled_list"])[0][1])
    Image.open(mask_path).save(mask_path, format="JPEG", quality=90)  # a renamed .jpg
    src = ListSource(info["root"], info["labeled_list"], num_classes=150, ignore_index=255)
    with monkeypatch.context() as before:
        before.setattr(datasets, "VALIDATION_VERSION", 2)
        before.setattr(datasets, "load_mask", lambda path: np.array(Image.open(path)))
        assert src.check_cached(progress=False)[0]  # passed and stamped
    with pytest.raises(ValueError, match="is a JPEG file"):
        src.check_cached(progress=False)
