"""Split files shipped in csl/splits (UniMatch's and CamVid's), ``data.split``, and COCO's derived unlabeled part."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from csl.config import load_config, parse_override
from csl.data import SPLITS_DIR, build_datasets, named_split_dir, read_split


def test_shipped_unimatch_splits_and_their_licence():
    assert os.path.isfile(os.path.join(SPLITS_DIR, "LICENSE.unimatch"))
    for dataset, split, count in (("pascal", "1464", 1464), ("pascal", "92", 92), ("cityscapes", "1_30", 100),
                                  ("camvid", "1_8", 46)):
        labeled = read_split(os.path.join(named_split_dir(dataset, split), "labeled.txt"))
        assert len(labeled) == count, (dataset, split)
    assert named_split_dir("camvid", "1/8") == named_split_dir("camvid", "1_8")
    assert len(read_split(os.path.join(SPLITS_DIR, "pascal", "val.txt"))) == 1449
    with pytest.raises(FileNotFoundError, match=r"no split '7' for dataset 'pascal'.*shipped: .*1464"):
        named_split_dir("pascal", 7)


def test_split_key_keeps_its_text():
    assert parse_override("data.split=1_8") == ("data.split", "1_8")  # YAML would give the integer 18
    assert load_config("voc_321")["data"]["split"] == "1464"
    assert load_config("cityscapes_801", ["data.split=1_30"])["data"]["split"] == "1_30"


def _image(path, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_named_split_written_with_a_slash_finds_the_shipped_val_list(tmp_path):
    # data.split=1/8 names csl/splits/pascal/1_8 for training and its val.txt beside it for evaluation.
    folder = named_split_dir("pascal", "1_8")
    val_list = os.path.join(SPLITS_DIR, "pascal", "val.txt")
    for path in (os.path.join(folder, "labeled.txt"), os.path.join(folder, "unlabeled.txt"), val_list):
        _image(str(tmp_path / read_split(path)[0][0]))
    bundle = build_datasets({"dataset": "pascal", "root": str(tmp_path), "split": "1/8", "crop_size": 16})
    assert os.path.samefile(bundle.val.source.list_path, val_list)
    assert len(bundle.val.source.items) == 1449


def test_coco_unlabeled_part_is_the_rest_of_train2017(tmp_path):
    root = tmp_path / "coco"
    for name in ("a", "b", "c"):
        _image(str(root / "train2017" / f"{name}.jpg"))
    os.makedirs(root / "masks")
    for name in ("a", "b"):
        Image.fromarray(np.zeros((16, 20), dtype=np.uint8)).save(root / "masks" / f"{name}.png")
    split = tmp_path / "split"
    split.mkdir()
    (split / "labeled.txt").write_text("train2017/a.jpg masks/a.png\n")
    bundle = build_datasets({"dataset": "coco", "root": str(root), "split_dir": str(split), "crop_size": 16},
                            need_val=False)
    assert len(bundle.labeled) == 1
    assert bundle.unlabeled.source.items == [("train2017/b.jpg", "masks/b.png"), ("train2017/c.jpg", None)]
    assert bundle.unlabeled[1]["image_w"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="not both"):
        build_datasets({"dataset": "coco", "root": str(root), "split_dir": str(split), "split": "1_512"})
