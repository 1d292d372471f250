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


def test_failures_are_written_as_they_happen(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import conftest

    path = tmp_path / "progress.txt"
    monkeypatch.setenv("CSL_TEST_PROGRESS", str(path))
    text = "def test_x():\n>       assert 1 == 2\nE       assert 1 == 2\n\ntests/test_x.py:3: AssertionError"
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, when="call", nodeid="tests/test_x.py::test_x",
                                                      longreprtext=text))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, passed=True, skipped=False, when="call",
                                                      nodeid="tests/test_x.py::ok", longreprtext="", duration=1.5))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, passed=True, skipped=False, when="setup",
                                                      nodeid="tests/test_x.py::ok", longreprtext="", duration=0.1))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, when="setup", nodeid="tests/test_x.py::fx",
                                                      longreprtext="E   RuntimeError: boom"))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, passed=False, skipped=True, when="setup",
                                                      nodeid="tests/test_x.py::gpu", longreprtext="",
                                                      longrepr=("x.py", 3, "Skipped: needs a CUDA device")))
    assert path.read_text().splitlines() == ["FAILED tests/test_x.py::test_x E       assert 1 == 2",
                                             "PASSED tests/test_x.py::ok 1.50s",
                                             "ERROR tests/test_x.py::fx E   RuntimeError: boom",
                                             "SKIPPED tests/test_x.py::gpu Skipped: needs a CUDA device"]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # a worker writes nothing: its controller does
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, when="call", nodeid="tests/test_x.py::w",
                                                      longreprtext="E x"))
    assert len(path.read_text().splitlines()) == 4
    details = (tmp_path / "progress.txt.details").read_text()
    assert "==== FAILED tests/test_x.py::test_x (call)" in details and "tests/test_x.py:3: AssertionError" in details


def test_a_process_held_after_the_run_dumps_its_stacks_and_exits(tmp_path):
    """The exit watchdog: a non-daemon thread that never ends would hold the interpreter forever; with
    CSL_TEST_PROGRESS set the process writes its stacks and exits after the grace time."""
    import subprocess
    import sys

    script = ("import sys, threading, time; sys.path.insert(0, 'tests'); import conftest; "
              "conftest.pytest_unconfigure(None); time.sleep(2); "  # armed only when the main thread ends
              "threading.Thread(target=lambda: time.sleep(600), name='stuck').start()")
    path = tmp_path / "progress.txt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "CSL_TEST_PROGRESS": str(path), "CSL_TEST_EXIT_GRACE": "1",
           "PYTEST_XDIST_WORKER": "gw7"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          timeout=60, capture_output=True, text=True)
    assert proc.returncode != 0
    dump = (tmp_path / "progress.txt.hang-gw7").read_text()
    assert dump.startswith("Timeout (0:00:01)!") and "in _shutdown" in dump and "in <lambda>" in dump, dump
