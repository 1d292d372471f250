"""CamVid on real frames from ../shared (void label, dataset kind, config), the split writer, MobileNetV2 from the
shared ImageNet weights. Tests that need ../shared skip with the reason when it is absent."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED
from PIL import Image

from csl.config import load_config
from csl.data import CamVid, build_datasets, build_val_dataset, map_labels, palette, read_split
from csl.data.splits import parse_fraction, split_items, write_splits

CAMVID = os.path.join(SHARED, "data", "camvid")
WEIGHTS = os.path.join(SHARED, "weights", "mobilenet_v2-b0353104.pth")
VAL4 = os.path.join(ROOT, "tests", "data", "camvid_val4.txt")  # 4 val frames, paths relative to the CamVid root
needs_camvid = pytest.mark.skipif(not os.path.isfile(os.path.join(CAMVID, "train.txt")),
                                  reason=f"CamVid not found at {CAMVID} (set CSL_SHARED to the shared folder)")
needs_weights = pytest.mark.skipif(not os.path.isfile(WEIGHTS),
                                   reason=f"MobileNetV2 ImageNet weights not found at {WEIGHTS}")


# ----------------------------------------------------------------------------------------------- label conventions


def test_map_labels_void_and_reduce_zero_label():
    mask = np.array([[0, 1, 11], [10, 255, 3]], dtype=np.uint8)
    assert map_labels(mask, 255) is mask  # nothing to map: the array itself
    np.testing.assert_array_equal(map_labels(mask, 255, ignore_labels=(11,)), [[0, 1, 255], [10, 255, 3]])
    np.testing.assert_array_equal(map_labels(mask, 255, reduce_zero_label=True), [[255, 0, 10], [9, 255, 2]])
    # ignore_labels name values of the file, before the zero-label reduction
    np.testing.assert_array_equal(map_labels(mask, 255, ignore_labels=(11,), reduce_zero_label=True),
                                  [[255, 0, 255], [9, 255, 2]])


def _tiny_camvid(tmp_path, values=(0, 3, 11)):
    """A two-frame CamVid-layout folder (tests that need no real data)."""
    root = tmp_path / "camvid"
    for sub in ("train", "trainannot"):
        (root / sub).mkdir(parents=True)
    lines = []
    for i in range(2):
        Image.fromarray(np.full((12, 16, 3), 40 * i, dtype=np.uint8)).save(root / "train" / f"f{i}.png")
        mask = np.array(values, dtype=np.uint8)[np.arange(12 * 16).reshape(12, 16) % len(values)]
        Image.fromarray(mask).save(root / "trainannot" / f"f{i}.png")
        lines.append(f"train/f{i}.png trainannot/f{i}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid_void_is_ignored_and_other_values_are_errors(tmp_path):
    root = _tiny_camvid(tmp_path)
    src = CamVid(str(root), str(root / "train.txt"), 11, 255)
    _, mask = src.load(0)
    assert set(np.unique(mask).tolist()) == {0, 3, 255}  # void 11 -> ignored
    # data.ignore_labels=[] turns the default off: 11 is then outside the 11 classes, an error naming file and value
    with pytest.raises(ValueError, match=r"f0\.png.*: 11 .*; values that mean \"unlabelled\" go in data\.ignore_"):
        CamVid(str(root), str(root / "train.txt"), 11, 255, ignore_labels=()).load(0)
    bad = _tiny_camvid(tmp_path / "bad", values=(0, 12))
    with pytest.raises(ValueError, match=r"trainannot/f0\.png has label values .*: 12 \(values \[11\] ignored"):
        CamVid(str(bad), str(bad / "train.txt"), 11, 255).load(0)
    assert CamVid(str(bad), str(bad / "train.txt"), 11, 255, ignore_labels=(11, 12)).validate(progress=False)[
        "class_pixels"][0] == 2 * 96
    # val set from the dataset's own val.txt, scaled at load (image bilinear, mask nearest)
    val = build_val_dataset({"dataset": "camvid", "root": str(root), "image_scale": 0.5})
    item = val[1]
    assert item["image"].shape == (3, 6, 8) and item["mask"].shape == (6, 8)
    assert set(item["mask"].unique().tolist()) <= {0, 3, 255}


def test_camvid_config_and_palette():
    cfg = load_config("camvid")
    assert cfg["data"]["dataset"] == "camvid" and cfg["data"]["ignore_labels"] == [11]
    assert cfg["model"]["backbone"] == "mobilenet_v2"
    colours = palette(11, "camvid")
    assert colours.shape == (11, 3) and tuple(colours[3]) == (128, 64, 128)  # road
    with pytest.raises(ValueError, match="ignore_labels"):
        load_config("camvid", ["data.ignore_labels=[-1]"])
    with pytest.raises(ValueError, match="image_scale"):
        load_config("camvid", ["data.image_scale=0"])


@needs_camvid
def test_camvid_real_frames():
    data = {"dataset": "camvid", "root": CAMVID, "labeled_list": os.path.join(CAMVID, "train.txt"),
            "crop_size": 64, "image_scale": 0.25}
    bundle = build_datasets(data)
    assert len(bundle.labeled) == 367 and len(bundle.val) == 101
    for i in range(4):
        image, mask = bundle.labeled.source.load(i)
        assert image.shape == (90, 120, 3) and mask.shape == (90, 120)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(11)) | {255} and 11 not in values
    raw = np.array(Image.open(os.path.join(CAMVID, read_split(os.path.join(CAMVID, "train.txt"))[0][1])))
    assert raw.shape == (360, 480) and raw.max() <= 11
    item = bundle.labeled[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].dtype == torch.int64
    assert bundle.val[0]["mask"].shape == (90, 120)


# ----------------------------------------------------------------------------------------------- splits


def test_split_writer_is_deterministic_nested_and_checked(tmp_path):
    items = [(f"img/{i}.jpg", f"ann/{i}.png") for i in range(37)]
    lab8, unl8 = split_items(items, "1/8", seed=3)
    assert len(lab8) == 5 and len(unl8) == 32 and sorted(lab8 + unl8) == sorted(items)
    assert split_items(items, "1/8", seed=3) == (lab8, unl8)
    assert split_items(items, "1/8", seed=4)[0] != lab8
    lab4, _ = split_items(items, "0.25", seed=3)
    assert len(lab4) == 9 and set(lab8) <= set(lab4)  # one permutation: the smaller split inside the larger
    assert parse_fraction("1_8") == parse_fraction("0.125")
    for bad in ("0", "1", "2/1", "x"):
        with pytest.raises(ValueError):
            parse_fraction(bad)
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{a} {b}\n" for a, b in items))
    written = write_splits(str(listing), str(tmp_path / "splits"), ["1/8", "1/4"], seed=3)
    assert written["1_8"]["labeled"] == 5 and written["1_4"]["unlabeled"] == 28
    assert read_split(str(tmp_path / "splits" / "1_8" / "labeled.txt")) == lab8
    (tmp_path / "nomask.txt").write_text("a.jpg\nb.jpg\n")
    with pytest.raises(ValueError, match="mask path"):
        write_splits(str(tmp_path / "nomask.txt"), str(tmp_path / "x"), ["1/2"])


def test_split_writer_refuses_what_would_leak_or_replace_a_split(tmp_path):
    items = [(f"img/{i}.jpg", f"ann/{i}.png") for i in range(8)]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{a} {b}\n" for a, b in items + [items[2]]))
    with pytest.raises(ValueError, match=r"img/2.jpg is listed twice \(items 3 and 9\)"):
        write_splits(str(listing), str(tmp_path / "dup"), ["1/4"])
    assert not (tmp_path / "dup").exists()
    listing.write_text("".join(f"{a} {b}\n" for a, b in items))
    with pytest.raises(ValueError, match=r"the split seed \(--seed\) must be an int >= 0, got -1"):
        write_splits(str(listing), str(tmp_path / "seed"), ["1/4"], seed=-1)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):  # a bad later fraction: nothing written
        write_splits(str(listing), str(tmp_path / "partial"), ["1/4", "1"])
    assert not (tmp_path / "partial").exists()
    out = str(tmp_path / "splits")
    write_splits(str(listing), out, ["1/4"], seed=0)
    before = (tmp_path / "splits" / "1_4" / "labeled.txt").read_text()
    write_splits(str(listing), out, ["1/4"], seed=0)  # the same split again: nothing changes, no error
    with pytest.raises(ValueError, match="exists with another split"):
        write_splits(str(listing), out, ["1/4"], seed=1)
    assert (tmp_path / "splits" / "1_4" / "labeled.txt").read_text() == before
    write_splits(str(listing), out, ["1/4"], seed=1, overwrite=True)
    assert (tmp_path / "splits" / "1_4" / "labeled.txt").read_text() != before
    assert sorted(os.listdir(tmp_path / "splits" / "1_4")) == ["labeled.txt", "unlabeled.txt"]  # no temp files


@needs_camvid
def test_committed_camvid_splits_are_what_the_writer_writes(tmp_path):
    written = write_splits(os.path.join(CAMVID, "train.txt"), str(tmp_path), ["1/8", "1/4"], seed=0)
    for name in ("1_8", "1_4"):
        for part in ("labeled.txt", "unlabeled.txt"):
            shipped = os.path.join(ROOT, "csl", "splits", "camvid", name, part)
            with open(shipped) as a, open(tmp_path / name / part) as b:
                assert a.read() == b.read(), f"csl/splits/camvid/{name}/{part} differs from csl split's output"
    assert written["1_8"]["labeled"] == 46 and written["1_4"]["labeled"] == 92


# ----------------------------------------------------------------------------------------------- training


@needs_camvid
@needs_weights
def test_two_iterations_on_camvid_with_imagenet_mobilenet(tmp_path):
    from csl.cli import main
    from csl.logging_utils import read_metrics

    out = tmp_path / "run"
    code = main(["train", "--config", "camvid", f"data.root={CAMVID}", f"model.pretrained={WEIGHTS}",
                 "data.split=1_8", "data.image_scale=0.25",
                 "data.crop_size=64", "train.batch_size=2", "train.iters=2", "train.iters_per_epoch=2",
                 "train.progress=false", "tmp.block=16", f"data.val_list={VAL4}", f"output_dir={out}"])
    assert code == 0
    evals = read_metrics(str(out / "metrics.jsonl"), "eval")
    assert len(evals) == 1 and len(evals[0]["iou"]) == 11 and 0 <= evals[0]["miou"] <= 1
    pl = read_metrics(str(out / "metrics.jsonl"), "pseudo_labels")
    assert pl and 0 <= pl[-1]["accuracy"] <= 1  # the unlabeled masks (void ignored) give pseudo-label quality
    assert (out / "latest.pt").is_file()


@needs_weights
def test_shared_mobilenet_weights_load_whole_and_verified():
    from csl.model import build_model

    model = build_model({"backbone": "mobilenet_v2", "pretrained": WEIGHTS}, 11)
    report = model.pretrained_report
    assert report["sha256_prefix"] == "b0353104" and report["missing"] == [] and report["unexpected"] == []
    assert report["loaded"] == len(model.backbone.state_dict())


def test_demo_summary_names_the_bundled_split():
    """The camvid config names its split as data.split (no split folder): the summary line says which one (it said
    "camvid None" before)."""
    from csl.demo import describe_data

    d = load_config("camvid")["data"]
    assert d["split_dir"] is None and d["split"] == "1_8"
    assert describe_data(d) == "camvid split 1_8, image scale 0.5"
    assert describe_data({**d, "split_dir": "/data/splits/1_4"}).startswith("camvid /data/splits/1_4,")


def test_map_labels_maps_another_ignore_value_without_a_class_count():
    """The files' ignore value (here 254, or -1 in a 16-bit mask) is 255 inside csl, also where no class count is
    given to check the values against."""
    mask = np.array([[0, 254], [3, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(map_labels(mask, 254), [[0, 255], [3, 1]])
    np.testing.assert_array_equal(map_labels(np.array([[-1, 2]], dtype=np.int16), -1), [[255, 2]])


def test_classes_stored_from_1_with_0_ignored_point_to_reduce_zero_label():
    """0 ignored (data.ignore_index=0 or ignore_labels [0]) and the C classes stored as 1..C: the value C is named
    with the setting that reads the files' k as k - 1, not only as a value outside the classes."""
    mask = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    for settings in ({"ignore_index": 0}, {"ignore_index": 255, "ignore_labels": (0,)}):
        with pytest.raises(ValueError, match=r"outside \[0, 3\) .*: 3 \(classes stored as 1..3 with 0 unlabelled: "
                                             r"set data.reduce_zero_label=true"):
            map_labels(mask, num_classes=3, **settings)
    np.testing.assert_array_equal(map_labels(mask, 255, reduce_zero_label=True, num_classes=3), [[255, 0], [1, 2]])
    with pytest.raises(ValueError, match=r": 3$"):  # 0 is a class here: no such reading
        map_labels(mask, 255, num_classes=3)


def test_a_split_seed_that_is_a_bool_is_refused(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"img/{i}.jpg ann/{i}.png\n" for i in range(8)))
    with pytest.raises(ValueError, match=r"the split seed \(--seed\) must be an int >= 0, got True"):
        write_splits(str(listing), str(tmp_path / "s"), ["1/4"], seed=True)
    assert not (tmp_path / "s").exists()
