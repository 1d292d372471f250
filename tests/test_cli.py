"""The command line: ``csl train`` on the demo config, ``eval`` and ``predict`` from its checkpoint, ``demo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, child_limit
from PIL import Image

from csl.cli import _own_warnings_as_lines, expand_images, main
from csl.data import read_split
from csl.logging_utils import read_metrics

TINY = ["data.crop_size=40", "data.num_workers=0", "data.synthetic.num_labeled=4", "data.synthetic.num_unlabeled=8",
        "data.synthetic.num_val=2", "data.synthetic.size=48", "train.batch_size=2", "train.progress=false",
        "tmp.block=16", "train.log_every=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--config", "demo", *TINY, "train.iters=3", "train.iters_per_epoch=3",
                 f"output_dir={out}"])
    assert code == 0
    return out


def test_train_writes_run_outputs(trained):
    for name in ("latest.pt", "best.pt", "metrics.jsonl", "config.yaml", "train.log"):
        assert (trained / name).is_file(), name
    records = read_metrics(str(trained / "metrics.jsonl"))
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    pl = [r for r in records if r["kind"] == "pseudo_labels"]
    assert len(pl) == 1 and 0 <= pl[0]["mask_ratio"] <= 1 and 0 <= pl[0]["accuracy"] <= 1
    assert len([r for r in records if r["kind"] == "eval"]) == 1
    log = (trained / "train.log").read_text()
    assert "global batch 2 labeled + 2 unlabeled + 2 mix" in log and "lr backbone 0.005, head 0.05" in log
    # The kernels' own log lines (backend choices; tuning on a GPU) go to the run's log too.
    assert "csl_kernels.pcos_weights on cpu: backend='auto' uses" in log
    ckpt = torch.load(trained / "latest.pt", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["config"]["model"]["backbone"] == "resnet18"


def test_resume_flag_continues(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code = main(["train", "--config", "demo", *TINY, "train.iters=4", "train.iters_per_epoch=3", f"output_dir={run}",
                 "--resume", str(run / "latest.pt")])
    assert code == 0
    iters = [r["iter"] for r in read_metrics(str(run / "metrics.jsonl"), "train")]
    assert iters == [1, 2, 3, 4]
    # Each run of the process names its backends in its log (the resume appends to the copied train.log).
    assert (run / "train.log").read_text().count("csl_kernels.pcos_weights on cpu: backend='auto' uses") == 2


def test_eval_matches_training_eval(trained, capsys):
    code = main(["eval", "--checkpoint", str(trained / "best.pt"), "device=cpu"])  # where it trained: the same bits
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    train_eval = read_metrics(str(trained / "metrics.jsonl"), "eval")[-1]
    assert result["miou"] == pytest.approx(train_eval["miou"], abs=1e-12)
    assert "mIoU" in out
    names = result["class_names"]
    assert names[:2] == ["background", "disk"] and len(names) == len(result["iou"])  # the synthetic scenes' classes
    width = max(map(len, names))
    assert "\n    0 " + "background".ljust(width) + "  IoU " in out  # each class's line names it


@pytest.mark.parametrize(("views", "said"), [("frames", "clean training frames, 2 per batch"),
                                             ("crops", "clean training crops of 40, 2 per batch")])
def test_eval_re_estimates_batchnorm_on_frames_or_crops(trained, capsys, caplog, views, said):
    caplog.set_level("INFO", logger="csl")
    args = ["eval", "--checkpoint", str(trained / "best.pt"), "device=cpu"]
    assert main(args) == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args[:3], "--bn-recalibrate", "4", "--bn-views", views, *args[3:]]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert f"BatchNorm statistics re-estimated on 4 {said}" in caplog.text
    assert again["miou"] != kept["miou"] or again["pixel_acc"] != kept["pixel_acc"]  # other statistics, other output
    assert main([*args[:3], "--bn-recalibrate", "-3", "--bn-views", views, *args[3:]]) == 2
    assert "--bn-recalibrate must be >= 0 (0 keeps the checkpoint's statistics), got -3" in capsys.readouterr().err


def test_a_gpu_runs_checkpoint_is_evaluated_here(trained, tmp_path, capsys):
    """The device and kernels' backend a run trained with are not part of its model: eval and analyze use this
    machine's (here a checkpoint whose config names cuda for both, read on a CPU-only machine)."""
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    ckpt["config"] = {**ckpt["config"], "device": "cuda", "kernels": {**ckpt["config"]["kernels"], "backend": "cuda"}}
    torch.save(ckpt, tmp_path / "gpu.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "gpu.pt")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    if not torch.cuda.is_available():  # evaluated on the CPU, where it trained: the same result to the last bit
        assert result["miou"] == pytest.approx(read_metrics(str(trained / "metrics.jsonl"), "eval")[-1]["miou"],
                                               abs=1e-12)
    assert 0 <= result["miou"] <= 1
    assert main(["analyze", "--checkpoint", str(tmp_path / "gpu.pt"), "--out", str(tmp_path / "analysis"),
                 "--max-images", "2"]) == 0


def test_predict_writes_palette_pngs(trained, tmp_path, capsys):
    from csl.data import generate_scenes

    images, _ = generate_scenes(2, size=40, seed=5, split="val", num_classes=4)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(img_dir / f"im{i}.png")
    Image.fromarray(images[0]).save(img_dir / "im2.webp")
    (img_dir / "labels.txt").write_text("not an image")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained / "latest.pt"), "--images", str(img_dir), "--out",
                 str(out)]) == 0
    files = sorted(os.listdir(out))
    assert files == ["im0.png", "im1.png", "im2.png"]
    assert (f"csl predict: 1 file(s) found are not images by their extension (.txt) and are left out, e.g. "
            f"{img_dir / 'labels.txt'}; images are .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp") in (
        capsys.readouterr().err)
    (img_dir / "im2.webp").unlink()
    (img_dir / "labels.txt").unlink()
    with Image.open(out / "im0.png") as p:
        assert p.mode == "P" and p.size == (40, 40)
        assert np.array(p).max() < 6
    assert expand_images([str(img_dir / "*.png")]) == ([str(img_dir / "im0.png"), str(img_dir / "im1.png")], [], [],
                                                       [])
    with pytest.raises(FileNotFoundError, match="no such image"):
        expand_images([str(tmp_path / "nothing*.jpg")])
    # An override written after --images is an override, not an image path.
    out2 = tmp_path / "pred2"
    assert main(["predict", "--checkpoint", str(trained / "latest.pt"), "--out", str(out2), "--images",
                 str(img_dir / "im0.png"), "eval.mode=center_crop", "eval.crop_size=32"]) == 0
    with Image.open(out2 / "im0.png") as p:
        assert p.size == (32, 32)  # the centre crop: the overrides were applied
    # A link to an image in the same folder: one prediction, under the image's own name, and it is said.
    os.symlink(img_dir / "im0.png", img_dir / "link.png")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(trained / "latest.pt"), "--images", str(img_dir), "--out",
                 str(tmp_path / "pred3")]) == 0
    assert sorted(os.listdir(tmp_path / "pred3")) == ["im0.png", "im1.png"]
    assert f"{img_dir / 'link.png'} as {img_dir / 'im0.png'}" in capsys.readouterr().err
    # What predict logs reaches the console: the kept predictions of --skip-existing, the progress lines.
    os.remove(tmp_path / "pred3" / "im1.png")
    assert main(["predict", "--checkpoint", str(trained / "latest.pt"), "--images", str(img_dir), "--out",
                 str(tmp_path / "pred3"), "--skip-existing"]) == 0
    assert "1 of the 2 predictions exist already" in capsys.readouterr().err


def test_long_work_without_a_terminal_says_how_far_it_got(monkeypatch, caplog):
    """Where stderr is no terminal (nohup, a scheduler, a pipe) no bar is drawn: evaluation, prediction, analysis,
    BatchNorm statistics and label checks log "<what>: k of n (t s)" every HEARTBEAT_S seconds and at the end;
    short work says nothing; disabled progress says nothing."""
    import logging
    import types

    from csl import logging_utils

    caplog.set_level(logging.INFO, logger="csl")
    monkeypatch.setattr(logging_utils, "_stderr_is_a_terminal", lambda: False)
    assert list(logging_utils.with_progress(range(3), desc="quick")) == [0, 1, 2]
    assert not [r for r in caplog.records if "quick" in r.getMessage()]
    monkeypatch.setattr(logging_utils, "HEARTBEAT_S", 0.0)
    assert list(logging_utils.with_progress(range(3), desc="eval (original)")) == [0, 1, 2]
    said = [r.getMessage().rsplit(" (", 1)[0] for r in caplog.records if r.getMessage().startswith("eval")]
    assert said == ["eval (original): 1 of 3", "eval (original): 2 of 3", "eval (original): 3 of 3"]
    caplog.clear()
    assert list(logging_utils.with_progress(range(3), desc="off", enabled=False)) == [0, 1, 2]
    assert not caplog.records
    # On a clock that moves 12 s a reading: the line after 20 s of work (2 of 3), then the end (3 of 3), once each.
    monkeypatch.setattr(logging_utils, "HEARTBEAT_S", 20.0)
    readings = iter(range(0, 1200, 12))
    monkeypatch.setattr(logging_utils, "time", types.SimpleNamespace(monotonic=lambda: next(readings)))
    assert list(logging_utils.with_progress(range(3), desc="analyze")) == [0, 1, 2]
    assert [r.getMessage() for r in caplog.records] == ["analyze: 2 of 3 (36 s)", "analyze: 3 of 3 (72 s)"]



def test_predict_on_a_full_disk_names_the_file_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(img_dir / "a.png")

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained / "latest.pt"), "--images", str(img_dir), "--out",
                 str(out)]) == 1
    assert f"could not write {out / 'a.png'}: No space left on device" in capsys.readouterr().err
    assert os.listdir(out) == []  # no empty or half PNG that a rerun would take for done, no temporary file


def test_expanded_images_skip_earlier_predictions_only(tmp_path):
    """Files inside the output folder are skipped (and returned as such) where a folder or pattern given holds it;
    an output folder above the images skips nothing; a pattern's folders are expanded, its other files left out."""
    photos = tmp_path / "data" / "photos"
    (photos / "seq").mkdir(parents=True)
    for name in ("a.jpg", "seq/b.png", "notes.txt"):
        (photos / name).write_bytes(b"x")
    (photos / "preds").mkdir()
    (photos / "preds" / "a.png").write_bytes(b"x")
    a, b, earlier, preds = str(photos / "a.jpg"), str(photos / "seq" / "b.png"), str(photos / "preds" / "a.png"), \
        str(photos / "preds")
    notes = str(photos / "notes.txt")
    assert expand_images([str(photos)], skip_under=preds) == ([a, b], [earlier], [], [notes])
    # --out above --images (csl predict --images data/photos --out data): every photo is predicted.
    assert expand_images([str(photos)], skip_under=str(tmp_path / "data")) == ([a, earlier, b], [], [], [notes])
    assert expand_images([str(photos / "*")], skip_under=preds) == ([a, b], [earlier], [], [notes])
    assert expand_images([earlier], skip_under=preds) == ([earlier], [], [], [])  # named as a file: kept
    with pytest.raises(FileNotFoundError, match=r"the pattern .*\*.txt matches no image"):
        expand_images([str(photos / "*.txt")])


def test_expanded_images_name_a_linked_file_once_and_say_so(tmp_path, capsys):
    """A file reached under two names (a link beside it) is predicted once, under the first name, and the other name
    is returned as a repeat; the same name found twice (a folder and a pattern over it) is no repeat."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "a.png")
    os.symlink(photos / "a.png", photos / "b.png")
    a, b = str(photos / "a.png"), str(photos / "b.png")
    assert expand_images([str(photos)]) == ([a], [], [(b, a)], [])
    assert expand_images([str(photos), str(photos / "a*")]) == ([a], [], [(b, a)], [])
    assert expand_images([a, a]) == ([a], [], [], [])


def test_relative_paths_are_stored_resolved(tmp_path, monkeypatch):
    from csl.data.synthetic import write_synthetic_folder

    write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=1,
                           size=40)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "demo", *TINY, "train.iters=1", "train.iters_per_epoch=1", "data.dataset=folder",
                 "data.root=data", "data.split_dir=data/splits", "data.num_classes=5", "output_dir=run"]) == 0
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the checkpoint's paths still lead to the data
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert ckpt["config"]["data"]["root"] == str(tmp_path / "data")
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "latest.pt")]) == 0


def test_cut_short_images_stop_the_run_at_its_start(tmp_path, capsys):
    """A labeled or unlabeled image file cut short (an interrupted copy) stops ``csl train`` before its first step,
    naming the file and its list; a JPEG with bytes after its end marker that decodes is not refused."""
    from csl.data.synthetic import write_synthetic_folder

    info = write_synthetic_folder(str(tmp_path / "data"), layout="coco", num_labeled=2, num_unlabeled=3,
                                  num_val=1, size=40)
    args = ["train", "--config", "demo", *TINY, "train.iters=1", "train.iters_per_epoch=1", "data.dataset=folder",
            f"data.root={info['root']}", f"data.split_dir={info['split_dir']}", "data.num_classes=5"]
    unlabeled = [os.path.join(info["root"], img) for img, _ in read_split(info["unlabeled_list"])]
    with open(unlabeled[0], "ab") as f:  # sound, with bytes after the end marker (as some cameras write)
        f.write(b"camera trailer")
    assert main([*args, f"output_dir={tmp_path / 'ok'}"]) == 0
    with open(unlabeled[1], "rb") as f:
        whole = f.read()
    with open(unlabeled[1], "wb") as f:
        f.write(whole[: len(whole) // 2])
    capsys.readouterr()
    assert main([*args, f"output_dir={tmp_path / 'cut_unlabeled'}"]) == 2
    err = capsys.readouterr().err
    assert "1 of the 3 unlabeled image files cannot be read to their end" in err
    assert unlabeled[1] in err and f"{info['unlabeled_list']}:2" in err and "truncated" in err
    with open(unlabeled[1], "wb") as f:
        f.write(whole)
    labeled_img = os.path.join(info["root"], read_split(info["labeled_list"])[0][0])
    with open(labeled_img, "rb") as f:
        whole = f.read()
    with open(labeled_img, "wb") as f:
        f.write(whole[: len(whole) // 2])
    assert main([*args, f"output_dir={tmp_path / 'cut_labeled'}"]) == 2
    err = capsys.readouterr().err
    assert f"{info['labeled_list']}:1: " in err and "truncated" in err
    assert not os.path.exists(tmp_path / "cut_labeled" / "latest.pt")


def test_supervised_training_needs_no_unlabeled_list(tmp_path, capsys):
    """A split folder with labeled.txt and val.txt only: supervised training runs; semi-supervised names the file."""
    from csl.data.synthetic import write_synthetic_folder

    info = write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=1,
                                  size=40)
    os.remove(info["unlabeled_list"])
    args = ["train", "--config", "demo", *TINY, "train.iters=1", "train.iters_per_epoch=1", "data.dataset=folder",
            f"data.root={info['root']}", f"data.split_dir={info['split_dir']}", "data.num_classes=5"]
    assert main([*args, "train.mode=supervised", f"output_dir={tmp_path / 'sup'}"]) == 0
    capsys.readouterr()
    assert main([*args, f"output_dir={tmp_path / 'semi'}"]) == 2
    assert f"unlabelled split file not found: {info['unlabeled_list']}" in capsys.readouterr().err


def test_a_moved_dataset_keeps_its_split_or_is_refused(tmp_path, capsys):
    """The dataset moved after training: ``data.root=NEW`` reads the stored split folder under NEW (and says so);
    a stored split folder that is gone is an error naming it, never the dataset's standard val list instead."""
    from csl.data.synthetic import write_synthetic_folder

    write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=1,
                           size=40)
    assert main(["train", "--config", "demo", *TINY, "train.iters=1", "train.iters_per_epoch=1", "data.dataset=folder",
                 f"data.root={tmp_path / 'data'}", f"data.split_dir={tmp_path / 'data' / 'splits'}",
                 "data.num_classes=5", f"output_dir={tmp_path / 'run'}"]) == 0
    checkpoint = str(tmp_path / "run" / "latest.pt")
    capsys.readouterr()
    moved = tmp_path / "moved #2"  # ' #' would start a YAML comment: the override quotes it, and so does csl
    (tmp_path / "data").rename(moved)
    assert main(["eval", "--checkpoint", checkpoint, f"data.root='{moved}'"]) == 0
    captured = capsys.readouterr()
    assert (f"the checkpoint's data.split_dir {tmp_path / 'data' / 'splits'} is not there; read under data.root: "
            f"{moved / 'splits'}") in captured.err and "(original, 1 images)" in captured.out
    (moved / "splits").rename(tmp_path / "splits_elsewhere")
    moved.rename(tmp_path / "data")  # the root back in place, its split folder gone
    assert main(["eval", "--checkpoint", checkpoint]) == 2
    err = capsys.readouterr().err
    assert (f"data.split_dir not found (or not a folder): {tmp_path / 'data' / 'splits'}: the path stored in "
            f"{checkpoint}'s config") in err and "pass data.split_dir=DIR" in err
    assert main(["eval", "--checkpoint", checkpoint, f"data.split_dir={tmp_path / 'splits_elsewhere'}"]) == 0
    # A val set without a labelled pixel: an undefined mIoU is an error, not "mIoU nan" and a JSON line with NaN.
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "data" / "masks" / "val_00000.png")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", checkpoint, f"data.split_dir={tmp_path / 'splits_elsewhere'}"]) == 2
    assert "the validation set (1 images) has no labelled pixel" in capsys.readouterr().err


def test_demo_refuses_zero_iterations_before_the_warm_up(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--iters", "0", *TINY]) == 2
    assert "iters (--iters) must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d" / "warmup").exists()


@pytest.mark.parametrize(("methods", "said"), [(",", "no demo method named"),
                                               ("csl,threshold,csl", "demo methods named more than once"),
                                               ("csl,fixmatch", "unknown demo method 'fixmatch'")])
def test_demo_refuses_a_method_list_it_cannot_train_before_the_warm_up(tmp_path, capsys, methods, said):
    assert main(["demo", "--out", str(tmp_path / "d"), "--methods", methods, *TINY]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "d" / "warmup").exists()


def test_demo_prints_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--warmup", "2", *TINY,
                 "train.iters_per_epoch=2"]) == 0
    out = capsys.readouterr().out
    for label in ("supervised only", "threshold 0.95 (UniMatch)", "CSL (PCOS + TMP)"):
        assert label in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["results"]) == {"supervised", "threshold", "csl"}
    assert summary["warmup"]["iters"] == 2 and (tmp_path / "warmup" / "latest.pt").is_file()
    assert "shared supervised warm-up of 2 iterations" in out
    for method, r in summary["results"].items():
        assert r["miou"] is not None and 0 <= r["miou"] <= 1, method
        assert r["iters"] == 2
    assert summary["results"]["supervised"]["pl_accuracy"] is None
    assert summary["results"]["csl"]["pl_recall"] is not None
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 4
    # Finished stages keep the model, not the optimizer state; a best.pt of the last iteration is the same file.
    for stage in ("warmup", "supervised", "threshold", "csl"):
        latest = tmp_path / stage / "latest.pt"
        ckpt = torch.load(latest, weights_only=True)
        assert "model" in ckpt and "optimizer" not in ckpt and "rng" not in ckpt, stage
        best = tmp_path / stage / "best.pt"
        if torch.load(best, weights_only=True)["iteration"] == ckpt["iteration"]:
            assert os.path.samefile(best, latest)
    assert main(["eval", "--checkpoint", str(tmp_path / "csl" / "best.pt")]) == 0  # still a usable checkpoint
    # A second call reuses every finished stage; its note still gives their training time.
    first = summary["training_seconds"]
    assert first == pytest.approx(summary["warmup"]["seconds"] + sum(r["seconds"] for r in summary["results"].values()))
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--warmup", "2", *TINY,
                 "train.iters_per_epoch=2"]) == 0
    assert capsys.readouterr().out.count("already done") == 4
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["training_seconds"] == pytest.approx(first) and f"Training {first:.0f} s in all" in again["note"]
    # Another protocol in the same folder: refused, naming what differs; nothing is replaced unasked.
    warmup = (tmp_path / "warmup" / "latest.pt").read_bytes()
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--warmup", "3", *TINY,
                 "train.iters_per_epoch=2"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'warmup'} holds a run of another configuration (train.iters: 2 -> 3; " in err
    assert "pass --fresh" in err and (tmp_path / "warmup" / "latest.pt").read_bytes() == warmup
    # A warm-up trained now (its folder removed) while the methods' runs are there: they started from the old one.
    os.rename(tmp_path / "warmup", tmp_path / "warmup_old")
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--warmup", "2", *TINY,
                 "train.iters_per_epoch=2"]) == 2
    assert "supervised holds a run that started from an earlier warm-up than the one trained now" in \
        capsys.readouterr().err
    # A stage whose config.yaml is gone cannot be compared: refused too.
    os.remove(tmp_path / "supervised" / "config.yaml")
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--warmup", "2", *TINY,
                 "train.iters_per_epoch=2"]) == 2
    assert "supervised holds a run whose config.yaml is missing or unreadable" in capsys.readouterr().err
    # With --fresh another warm-up is trained, and so is every method that had started from the old one.
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--warmup", "3", "--fresh", *TINY,
                 "train.iters_per_epoch=2"]) == 0
    assert "already done" not in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["warmup"]["iters"] == 3
    # --fresh trains every stage again in the same folders (the trainer replaces the finished runs).
    assert main(["demo", "--out", str(tmp_path), "--iters", "2", "--warmup", "2", "--fresh", *TINY,
                 "train.iters_per_epoch=2"]) == 0
    assert "already done" not in capsys.readouterr().out
    assert len(read_metrics(str(tmp_path / "csl" / "metrics.jsonl"), "train")) == 2  # one run's records, not two


def test_bad_override_exits_with_message(capsys):
    assert main(["train", "--config", "demo", "train.lrr=0.1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "/nonexistent/ckpt.pt"]) == 2


@pytest.mark.parametrize("option", ["--overwite", "--overwite=true"])
def test_an_unknown_option_is_said_by_its_subcommand(capsys, option):
    """``csl train: error: ...`` as for every other usage error of a subcommand, with that subcommand's usage;
    ``--name=value`` after the options is a mistyped option too, not a config key ``--name``."""
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--config", "demo", option])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("usage: csl train ")
    assert err.strip().splitlines()[-1] == f"csl train: error: unrecognized arguments: {option}"


def test_config_warnings_are_one_line_each_and_others_keep_their_form(tmp_path, capsys):
    """A config key renamed or given twice is said as ``csl <command>: warning: ...``, without the csl source line
    that warned; a warning from elsewhere is shown by Python as usual, and the form is the usual one after main."""
    import warnings

    old = tmp_path / "old.yaml"
    old.write_text("selection:\n  backend: cpu\n")
    assert main(["train", "--config", str(old), "train.lr=0.1", "train.lr=0.2", "--print-config"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["csl train: warning: config key 'selection.backend' is deprecated; it is read as 'kernels.backend'",
                   "csl train: warning: train.lr is given twice (0.1, then 0.2); the last one is used"]
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, *rest: shown.append((str(message), filename))
        with _own_warnings_as_lines("train"):
            warnings.warn("not csl's", UserWarning, stacklevel=1)
        warnings.warn("after", UserWarning, stacklevel=1)
    assert shown == [("not csl's", __file__), ("after", __file__)]
    assert capsys.readouterr().err == ""


def test_csl_debug_prints_the_traceback_and_keeps_the_exit_status(capsys, monkeypatch):
    monkeypatch.setenv("CSL_DEBUG", "1")
    assert main(["train", "--config", "demo", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("csl train: error: ") and "did you mean 'train.lr'" in err
    assert main(["eval", "--checkpoint", "/nonexistent/ckpt.pt"]) == 2


def test_demo_names_its_own_warmup_lr_flag(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--warmup-lr", "-1", *TINY]) == 2
    assert "warmup_lr (--warmup-lr) must be a positive finite number, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "d" / "warmup").exists()


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "csl", "train", "--config", "no_such_config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=child_limit(120))
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr and "demo" in proc.stderr


def test_train_help_lists_the_bundled_configs(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "bundled configs: camvid, cityscapes_801, coco, demo, voc_321, voc_513" in out and "DEFAULTS" in out


def test_sigterm_during_training_saves_the_epoch_and_releases_the_folder(tmp_path, monkeypatch, capsys):
    """``kill`` / a scheduler's stop while a run evaluates: exit 143 with a one-line message, the epoch saved with
    its evaluation pending, the run folder's lock released; ``--resume auto`` finishes the run."""
    import signal

    from csl.trainer import Trainer

    real = Trainer.evaluate

    def terminated(self):
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread at once
        raise AssertionError("SIGTERM was not turned into a stop")

    monkeypatch.setattr(Trainer, "evaluate", terminated)
    before = signal.getsignal(signal.SIGTERM)
    args = ["train", "--config", "demo", *TINY, "train.iters=4", "train.iters_per_epoch=2", f"output_dir={tmp_path}"]
    assert main(args) == 143
    assert "csl train: stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # restored for the caller
    assert not (tmp_path / ".csl.lock").exists()
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["pending_eval"]["epoch"] == 0
    monkeypatch.setattr(Trainer, "evaluate", real)
    assert main([*args, "--resume", "auto"]) == 0
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "eval")] == [2, 4]


@pytest.mark.parametrize(("signal_at", "saved_at", "pending"), [(1, 2, None), (2, 3, 0)])
def test_ctrl_c_during_a_step_finishes_it_and_saves(tmp_path, monkeypatch, capfd, request, signal_at, saved_at,
                                                     pending):
    """Ctrl-C while a step runs: the iteration ends, latest.pt holds it (at an epoch's end with the evaluation
    pending), exit 130, and --resume auto trains on from there; a second Ctrl-C stops at once."""
    import signal

    from csl import stop
    from csl.trainer import Trainer

    real_step = Trainer._step

    def interrupted_step(self, batches):
        if self.iteration == signal_at:
            os.kill(os.getpid(), signal.SIGINT)  # the handler records it; the step goes on
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "_step", interrupted_step)
    # Ctrl-C as in a terminal: a background job of a non-interactive shell (CI under nohup ... &) starts with SIGINT
    # ignored, which csl leaves ignored (tested below).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    before = signal.getsignal(signal.SIGINT)
    args = ["train", "--config", "demo", *TINY, "train.iters=6", "train.iters_per_epoch=3", f"output_dir={tmp_path}"]
    assert main(args) == 130
    err = capfd.readouterr().err
    assert "stopping after this iteration with latest.pt saved" in err and "csl train: interrupted" in err
    assert signal.getsignal(signal.SIGINT) is before and not stop.requested()
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ckpt["iteration"] == saved_at and (ckpt.get("pending_eval") or {}).get("epoch") == pending
    log = (tmp_path / "train.log").read_text()
    assert f"stopped at iteration {saved_at} of 6 as asked" in log
    assert ("the evaluation at iteration 3 was not run (stopped before it)" in log) == (pending is not None)
    assert "did not finish" not in log  # no evaluation had started
    monkeypatch.setattr(Trainer, "_step", real_step)
    assert main([*args, "--resume", "auto"]) == 0
    assert [r["iter"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "eval")] == [3, 6]
    assert f"done: 6 iterations (iterations {saved_at + 1}-6 in this start)" in (tmp_path / "train.log").read_text()

    with pytest.raises(KeyboardInterrupt), stop.deferred():  # the second signal raises where it lands
        stop.handle_signal(signal.SIGINT, None)
        assert stop.requested()
        stop.handle_signal(signal.SIGINT, None)
    assert not stop.requested()  # nothing left pending for a later run in this process
    with pytest.raises(stop.Terminated), stop.deferred():  # pending when the block ends: raised then
        stop.handle_signal(signal.SIGTERM, None)
    assert not stop.requested()
    with pytest.raises(KeyboardInterrupt), stop.deferred():  # pending when an evaluation starts: raised there
        stop.handle_signal(signal.SIGINT, None)
        with stop.immediate():
            raise AssertionError("the evaluation ran despite the pending stop")


def test_an_ignored_sigint_stays_ignored(tmp_path, request):
    """A background job of a script, started with SIGINT ignored: csl train does not take Ctrl-C meant for the
    script's foreground (and hands SIGTERM back as it found it)."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, inherited))
    seen = []

    def spy(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        return 0

    import csl.cli as cli

    real, cli.cmd_train = cli.cmd_train, spy
    request.addfinalizer(lambda: setattr(cli, "cmd_train", real))
    assert main(["train", "--config", "demo", f"output_dir={tmp_path}"]) == 0
    assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_out_of_memory_is_one_line_with_what_to_lower(monkeypatch, capsys):
    import csl.cli as cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(cli, "cmd_eval", oom)
    assert main(["eval", "--checkpoint", "x.pt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("csl eval: error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB (lower ")
    assert "train.batch_size" in err and "Traceback" not in err and "more details" not in err


def test_a_flag_and_its_key_together_are_refused(tmp_path, capsys):
    assert main(["train", "--config", "demo", "train.resume=null", "--resume", "auto", f"output_dir={tmp_path}"]) == 2
    assert "--resume and train.resume= are both given; pass one" in capsys.readouterr().err


def test_print_config_and_version(tmp_path, capsys):
    import yaml

    assert main(["train", "--config", "camvid", "seed=3", f"output_dir={tmp_path / 'never'}", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["seed"] == 3 and cfg["data"]["dataset"] == "camvid" and cfg["data"]["split"] == "1_8"
    assert not (tmp_path / "never").exists()  # nothing trained or written
    # --resume takes a path as it is (not YAML, where ' #' starts a comment and ': ' a mapping)
    path = str(tmp_path / "my runs #2" / "a: b" / "latest.pt")
    assert main(["train", "--config", "demo", "--resume", path, f"output_dir={tmp_path / 'never'}",
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["resume"] == path
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("csl ")


def test_a_printed_config_loads_as_the_config(tmp_path, capsys):
    """--print-config's text saved as a file is the same config: '1e3' (a number to csl's loader) stays a string."""
    from csl.config import load_config

    args = ["data.dataset=camvid", "data.split=1e2", "output_dir='1e3'"]
    assert main(["train", "--config", "demo", *args, "--print-config"]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert load_config(str(tmp_path / "printed.yaml")) == load_config("demo", args)


def test_a_data_loader_workers_error_is_one_line():
    """A missing file met in a DataLoader worker: the worker's traceback is cut to its last line."""
    from csl.logging_utils import one_line as _one_line

    error = FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most "
                              "recent call last):\n  File \"x.py\", line 1\n"
                              "FileNotFoundError: mask file not found: a.png")
    assert _one_line(error) == "FileNotFoundError: mask file not found: a.png"
    assert _one_line(ValueError("plain")) == "plain"
    assert _one_line(ValueError("first line\n\tsecond line\n")) == "first line second line"


def test_a_stopped_demo_stage_continues_where_it_stopped(tmp_path, capsys, monkeypatch):
    """``csl demo`` started again continues a stage that was stopped (from the newer of its latest.pt / best.pt),
    logging each iteration once."""
    from csl.config import build_config, load_config
    from csl.demo import method_config, run_stage
    from csl.trainer import train

    base = load_config("demo", [*TINY, "train.iters_per_epoch=2"])
    cfg = method_config(base, "supervised", str(tmp_path), iters=4)
    train(build_config(cfg, {"train.overwrite": True}), stop_at=2)  # a comparison stopped after iteration 2
    seconds, reused = run_stage(cfg, train)
    assert not reused and seconds > 0
    assert "continuing from iteration 2 in" in capsys.readouterr().out
    records = read_metrics(str(tmp_path / "supervised" / "metrics.jsonl"), "train")
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    assert run_stage(cfg, train)[1]  # finished now: reused as it is
    # A done mark cut short (a full disk) does not make a finished stage train again or fail: written anew.
    (tmp_path / "supervised" / "done.json").write_text("")
    capsys.readouterr()
    seconds_again, reused = run_stage(cfg, train)
    assert reused and "unreadable" in capsys.readouterr().out
    assert json.loads((tmp_path / "supervised" / "done.json").read_text())["seconds"] == seconds_again > 0
    # The same folder spelled relative to the working directory is the same run: reused, not replaced.
    monkeypatch.chdir(tmp_path)
    relative = method_config(base, "supervised", ".", iters=4)
    assert relative["output_dir"] != cfg["output_dir"] and run_stage(relative, train)[1]
    # A finished stage whose latest.pt (the next stages' start) is gone or damaged runs again, saying why.
    for damage in ("remove", "truncate"):
        latest = tmp_path / "supervised" / "latest.pt"
        if damage == "remove":
            latest.unlink()
        else:
            latest.write_bytes(b"PK cut short")
        capsys.readouterr()
        assert not run_stage(cfg, train)[1]
        out = capsys.readouterr().out
        assert "done.json marks the stage done, but" in out and "it runs again" in out
        assert ("latest.pt is missing" if damage == "remove" else "not a readable PyTorch checkpoint") in out
        assert run_stage(cfg, train)[1]



def test_a_moved_data_root_from_the_checkpoint_says_where_it_came_from(trained, tmp_path, capsys):
    """A checkpoint read on another machine names a data.root that is not there: the message says the root is the
    checkpoint's and how to point it elsewhere; a root the user gave is reported as given."""
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    moved = str(tmp_path / "gone" / "camvid")
    ckpt["config"] = {**ckpt["config"], "data": {**ckpt["config"]["data"], "dataset": "camvid", "root": moved,
                                                 "ignore_labels": None}}
    torch.save(ckpt, tmp_path / "moved.pt")
    for command in (["eval"], ["analyze", "--out", str(tmp_path / "analysis")]):
        assert main([*command, "--checkpoint", str(tmp_path / "moved.pt")]) == 2
        err = capsys.readouterr().err
        assert f"data.root not found (or not a folder): {moved}: the path stored in {tmp_path / 'moved.pt'}'s config" \
               in err and "pass data.root=DIR" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "moved.pt"), f"data.root={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert f"data.root not found (or not a folder): {tmp_path / 'nope'}\n" in err and "stored in" not in err


def test_a_relative_data_root_that_is_not_there_is_said_as_written(trained, tmp_path, monkeypatch, capsys):
    """A relative data.root (a bundled config's ../shared/data/camvid, run from another folder) is named as written
    and as read from the current folder; csl train says so before the run folder is made."""
    monkeypatch.chdir(tmp_path)
    said = (f"data.root not found (or not a folder): ../no-data (read from the current folder: "
            f"{tmp_path.parent / 'no-data'})")
    folder = ["data.dataset=folder", "data.root=../no-data", "data.num_classes=4"]
    assert main(["train", "--config", "demo", *TINY, *folder, "output_dir=run"]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["eval", "--checkpoint", str(trained / "best.pt"), "--config", "demo", *folder]) == 2
    assert said in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_summarised(trained, capsys):
    """ResNet-18 weights read into a ResNet-34: the count and first names of what differs, not the whole state dict."""
    import re

    assert main(["eval", "--checkpoint", str(trained / "best.pt"), "model.backbone=resnet34"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"does not fit the model of this config \(.*\): \d+ of the model's weights missing from the "
                     r"checkpoint \(e\.g\. backbone\.layer1\.2\.conv1\.weight; ", err), err
    assert "not in the model" not in err and "another shape" not in err  # ResNet-34 only adds blocks
    assert len(err.splitlines()) == 1 and len(err) < 500


def test_negative_split_fractions_are_refused_as_fractions(tmp_path, capsys):
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"img/{i}.png mask/{i}.png\n" for i in range(8)))
    for fractions in (["-1/8"], ["1/8", "-1/4"], ["-0.5"], ["-1_8"]):
        assert main(["split", "--list", str(listing), "--fractions", *fractions, "--out", str(tmp_path / "s")]) == 2
        assert "a split fraction must lie strictly between 0 and 1, got '-" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_fraction_the_list_cannot_hold_is_refused_not_rounded_to_another(tmp_path, capsys):
    """1/1000 of 6 items would be 0 labeled, 0.99 would leave none unlabeled: refused, not rounded to another
    fraction under this one's folder name."""
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"img/{i}.png mask/{i}.png\n" for i in range(6)))
    for fraction, said in (("1/1000", "rounds to 0 labeled: no labeled item"), ("0.99", "no unlabeled item")):
        assert main(["split", "--list", str(listing), "--fractions", fraction, "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert said in err and "rounds to 1 to 5 of its 6 items (e.g. 1/6 to 5/6)" in err, err
    assert not (tmp_path / "s").exists()
    assert main(["split", "--list", str(listing), "--fractions", "1/6", "5/6", "--out", str(tmp_path / "s")]) == 0
    listing.write_text("img/0.png mask/0.png\nimg/1.png mask/1.png\n")  # two items: one fraction only, 1/2
    assert main(["split", "--list", str(listing), "--fractions", "1/8", "--out", str(tmp_path / "s2")]) == 2
    assert "this list needs a fraction that rounds to 1 of its 2 items (e.g. 1/2)\n" in capsys.readouterr().err
    listing.write_text("img/0.png mask/0.png\nimg/1.png\nimg/2.png\n")
    assert main(["split", "--list", str(listing), "--fractions", "1/2", "--out", str(tmp_path / "s2")]) == 2
    assert "every line needs a mask path to make a labeled split; 2 of 3 name only an image, e.g. img/1.png" in (
        capsys.readouterr().err)


def test_a_checkpoints_backend_given_under_its_old_name_is_not_said_to_be_given_twice():
    """eval / predict / analyze choose this machine's kernels.backend (auto) for a stored config unless an override
    names it: under its old name selection.backend too. It was said as 'kernels.backend and selection.backend set one
    key ('auto', then 'reference')', of a kernels.backend the user never gave."""
    import warnings

    from csl.cli import config_for_checkpoint
    from csl.config import load_config

    stored = load_config("demo", ["kernels.backend=cpu"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = config_for_checkpoint("best.pt", {"config": stored}, None, ["selection.backend=reference"])
    assert cfg["kernels"]["backend"] == "reference"
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "config key 'selection.backend' is deprecated; it is read as 'kernels.backend'")]
    assert config_for_checkpoint("best.pt", {"config": stored})["kernels"]["backend"] == "auto"


def test_split_into_a_file_names_out(tmp_path, capsys):
    """As predict, analyze and report say it; it was the write's "[Errno 20] Not a directory: '<out>/1_2'"."""
    listing = tmp_path / "train.txt"
    listing.write_text("img/0.png mask/0.png\nimg/1.png mask/1.png\n")
    assert main(["split", "--list", str(listing), "--fractions", "1/2", "--out", str(listing)]) == 2
    assert capsys.readouterr().err == f"csl split: error: --out {listing} is a file; give a folder\n"
    assert listing.read_text() == "img/0.png mask/0.png\nimg/1.png mask/1.png\n"


def test_a_path_through_a_file_is_the_users_input(monkeypatch, capsys):
    """NotADirectoryError / IsADirectoryError come from a path the user gave: exit 2 like a missing file."""
    import csl.cli as cli

    for error in (NotADirectoryError("[Errno 20] Not a directory: 'a.txt/b'"), IsADirectoryError("[Errno 21] x")):
        def raise_it(args, error=error):
            raise error

        monkeypatch.setattr(cli, "cmd_split", raise_it)
        assert main(["split", "--list", "a.txt", "--fractions", "1/8", "--out", "a.txt/b"]) == 2
        assert capsys.readouterr().err == f"csl split: error: {error}\n"


def test_report_is_a_subcommand(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err.startswith("csl report: error: ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "report" in capsys.readouterr().out


def test_the_training_summary_is_printed_once_under_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("csl.trainer.train", lambda cfg: {"best_miou": 0.25})
    for rank, printed in (("1", ""), ("0", f"best mIoU 25.00  ({tmp_path})\n")):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--config", "demo", f"output_dir={tmp_path}"]) == 0
        assert capsys.readouterr().out == printed


def test_eval_settings_the_eval_mode_ignores_are_named():
    from csl.trainer import unused_eval_settings

    defaults = {"crop_size": None, "stride_ratio": 2 / 3}
    assert unused_eval_settings(defaults, "original") == []
    assert unused_eval_settings({"crop_size": 16, "stride_ratio": 0.5}, "original") == [
        "eval.crop_size=16", "eval.stride_ratio=0.5"]
    assert unused_eval_settings({"crop_size": 16, "stride_ratio": 0.5}, "center_crop") == ["eval.stride_ratio=0.5"]
    assert unused_eval_settings({"crop_size": 16, "stride_ratio": 0.5}, "sliding_window") == []


def test_training_settings_the_run_ignores_are_named():
    from csl.config import build_config
    from csl.trainer import unused_training_settings

    assert unused_training_settings(build_config({}, {})) == []
    cfg = build_config({}, {"tmp.enabled": False, "tmp.rate": 0.3, "tmp.block": 8, "train.ohem_thresh": 0.5})
    assert unused_training_settings(cfg) == [("tmp.block=8, tmp.rate=0.3", "not used with tmp.enabled=false"),
                                             ("train.ohem_thresh=0.5", "not used by train.criterion=ce")]
    cfg = build_config({}, {"train.mode": "supervised", "selection.mode": "threshold", "train.lambda_s": 1.0,
                            "tmp.rate": 0.1})
    assert unused_training_settings(cfg) == [("train.lambda_s=1.0, selection.mode=threshold, tmp.rate=0.1",
                                              "not used by train.mode=supervised (no unlabeled data)")]
    assert unused_training_settings(build_config({}, {"train.criterion": "ohem", "train.ohem_thresh": 0.5})) == []
    assert unused_training_settings(build_config({}, {"train.iters": 600, "train.epochs": 20})) == [
        ("train.epochs=20", "not used: train.iters=600 sets the length")]
    assert unused_training_settings(build_config({}, {"train.epochs": 20})) == []
    assert unused_training_settings(build_config({}, {"data.dataset": "camvid", "data.synthetic.size": 64})) == [
        ("data.synthetic.size=64", "not used by data.dataset=camvid")]
    # switching TMP off agrees with supervised training (not named); tuning it does not
    assert unused_training_settings(build_config({}, {"train.mode": "supervised", "tmp.enabled": False})) == []
    assert unused_training_settings(build_config({}, {"train.mode": "supervised", "tmp.enabled": False,
                                                      "tmp.rate": 0.1})) == [
        ("tmp.rate=0.1", "not used by train.mode=supervised (no unlabeled data)")]


def test_validation_images_in_a_training_list_are_warned_about(tmp_path):
    from csl.data.synthetic import write_synthetic_folder

    info = write_synthetic_folder(str(tmp_path / "data"), layout="folder", num_labeled=2, num_unlabeled=2, num_val=2,
                                  size=40)
    with open(info["val_list"]) as f:
        val_lines = f.read()
    with open(info["unlabeled_list"], "a") as f:
        f.write(val_lines)
    assert main(["train", "--config", "demo", *TINY, "train.iters=1", "train.iters_per_epoch=1", "data.dataset=folder",
                 f"data.root={info['root']}", f"data.split_dir={info['split_dir']}", "data.num_classes=5",
                 f"output_dir={tmp_path / 'run'}"]) == 0
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert (f"2 of the 2 validation images are also in the unlabeled training list {info['unlabeled_list']}"
            in log_text)
    assert "also in the labeled training list" not in log_text


def test_demo_table_columns_are_the_reliable_and_the_weighted_pixels():
    """The demo's table: mIoU, the reliable pixels' share / accuracy / recall, the soft weights' share / accuracy /
    recall (in percent; "-" for a value not recorded, e.g. supervised runs) and whole seconds."""
    from csl.demo import LABELS, format_table

    results = {"csl": {"miou": 0.456, "pl_sampling_rate": 0.41, "pl_accuracy": 0.82, "pl_recall": 0.63,
                       "pl_weighted_share": 0.54, "pl_weighted_accuracy": 0.75, "pl_weighted_recall": 0.36,
                       "seconds": 12.6},
               "supervised": {"miou": 0.5, "pl_sampling_rate": None, "pl_accuracy": 0.9, "pl_recall": None,
                              "seconds": 3.2}}
    lines = format_table(results).splitlines()
    assert lines[2] == f"| {LABELS['csl']} | 45.6 | 41.0 / 82.0 / 63.0 | 54.0 / 75.0 / 36.0 | 13 |"
    assert lines[3] == f"| {LABELS['supervised']} | 50.0 | - / 90.0 / - | - | 3 |"


def test_a_demo_stage_result_is_its_last_evaluation_and_epoch(tmp_path):
    """summary.json's entry of a stage: the final (last) evaluation's mIoU and per-class IoU, the best mIoU of all,
    the last epoch's pseudo-label quality, the configured iterations."""
    from csl.demo import _result

    records = [{"kind": "eval", "iter": 2, "miou": 0.6, "iou": [0.5, 0.7]},
               {"kind": "pseudo_labels", "iter": 2, "mask_ratio": 0.5, "sampling_rate": 0.4, "accuracy": 0.7,
                "recall": 0.6},
               {"kind": "eval", "iter": 4, "miou": 0.5, "iou": [0.4, 0.6]},
               {"kind": "pseudo_labels", "iter": 4, "mask_ratio": 0.8, "sampling_rate": 0.7, "accuracy": 0.9,
                "recall": 0.8, "weighted_share": 0.75}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = _result({"output_dir": str(tmp_path), "train": {"iters": 4, "iters_per_epoch": 2}}, 7.0)
    assert (r["miou"], r["best_miou"], r["iou"], r["iters"], r["seconds"]) == (0.5, 0.6, [0.4, 0.6], 4, 7.0)
    assert (r["pl_mask_ratio"], r["pl_sampling_rate"], r["pl_accuracy"], r["pl_recall"]) == (0.8, 0.7, 0.9, 0.8)
    assert r["pl_weighted_share"] == 0.75 and r["pl_weighted_accuracy"] is None


def test_a_demo_stages_logged_seconds_count_every_iteration_up_to_the_one_asked(tmp_path):
    """The seconds of a stopped stage's iterations <= ``until``: each train record's seconds per iteration times the
    iterations since the previous record."""
    from csl.demo import _logged_seconds

    records = [{"kind": "train", "iter": it, "sec_per_iter": s} for it, s in ((2, 1.0), (4, 2.0), (6, 3.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"output_dir": str(tmp_path)}
    assert _logged_seconds(cfg, 4) == pytest.approx(1.0 * 2 + 2.0 * 2)
    assert _logged_seconds(cfg, 6) == pytest.approx(12.0) and _logged_seconds(cfg, 1) == 0.0


def test_demo_stage_configs_set_the_method_its_folder_and_the_warmups_schedule(tmp_path):
    """Each method's stage: the method's settings, its own folder, the warm-up checkpoint to start from, and
    ``iters`` iterations in epochs no longer than the config's; the warm-up: supervised at its own lr from scratch."""
    from csl.config import load_config
    from csl.demo import method_config, warmup_config

    base = load_config("demo", [])
    cfg = method_config(base, "csl_no_tmp", str(tmp_path), iters=500, init_from="w/latest.pt")
    assert (cfg["train"]["mode"], cfg["selection"]["mode"], cfg["tmp"]["enabled"]) == ("semi", "csl", False)
    assert cfg["output_dir"] == str(tmp_path / "csl_no_tmp") and cfg["train"]["init_from"] == "w/latest.pt"
    assert cfg["train"]["iters"] == 500 and cfg["train"]["iters_per_epoch"] == base["train"]["iters_per_epoch"] < 500
    assert method_config(base, "threshold", str(tmp_path), iters=4)["train"]["iters_per_epoch"] == 4
    warm = warmup_config(base, str(tmp_path), 30, lr=0.02)
    assert (warm["train"]["mode"], warm["train"]["iters"], warm["train"]["iters_per_epoch"]) == ("supervised", 30, 30)
    assert warm["train"]["lr"] == 0.02 and warm["train"]["init_from"] is None
    assert warm["output_dir"] == str(tmp_path / "warmup")


def test_demo_refuses_a_negative_warmup_before_any_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--warmup", "-1", *TINY]) == 2
    assert "warmup must be >= 0 iterations, got -1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_into_a_file_names_out_before_any_stage(tmp_path, capsys):
    """It printed the warm-up's header, then 'output_dir <file>/warmup is inside <file>, which is a file'."""
    (tmp_path / "a_file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "a_file"), *TINY]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"csl demo: error: --out {tmp_path / 'a_file'} is a file; give a folder\n"
    assert "warm-up" not in captured.out


def test_eval_refuses_a_negative_bn_recalibrate_first(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "never-read.pt"), "--bn-recalibrate", "-1"]) == 2
    assert "--bn-recalibrate must be >= 0 (0 keeps the checkpoint's statistics), got -1" in capsys.readouterr().err


def test_expanded_images_take_upper_case_extensions_and_skip_only_inside_the_output_folder(tmp_path):
    """A.JPG is an image; ``preds2`` beside the output folder ``preds`` is not inside it (a path prefix is no
    folder); a pattern searches the folder before its first wildcard, so the output folder there is skipped even
    where later parts of the pattern name other folders."""
    photos = tmp_path / "photos"
    for name in ("A.JPG", "preds/x.png", "preds2/y.png", "seq/z/b.png", "preds/z/b.png"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"x")
    preds = str(photos / "preds")
    found = expand_images([str(photos)], skip_under=preds)
    assert found.paths == [str(photos / name) for name in ("A.JPG", "preds2/y.png", "seq/z/b.png")]
    assert found.skipped == [str(photos / "preds" / "x.png"), str(photos / "preds" / "z" / "b.png")]
    found = expand_images([str(photos / "*" / "z" / "*.png")], skip_under=preds)
    assert found.paths == [str(photos / "seq" / "z" / "b.png")] and found.skipped == [str(photos / "preds/z/b.png")]


def test_split_prints_the_labeled_and_unlabeled_counts(tmp_path, capsys):
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"img/{i}.png mask/{i}.png\n" for i in range(8)))
    assert main(["split", "--list", str(listing), "--fractions", "1/4", "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.startswith("1_4: 2 labeled, 6 unlabeled -> ")
    assert len(read_split(str(tmp_path / "s" / "1_4" / "labeled.txt"))) == 2


def test_predict_refuses_images_that_all_lie_inside_out(tmp_path, monkeypatch, capsys):
    """--images naming only the output folder (every file an earlier prediction): an error, not "wrote 0"."""
    import csl.checkpoint
    import csl.cli as cli
    from csl.config import load_config

    monkeypatch.setattr(csl.checkpoint, "load_checkpoint", lambda path: {})
    monkeypatch.setattr(cli, "config_for_checkpoint", lambda *args: load_config("demo", ["device=cpu"]))
    out = tmp_path / "preds"
    out.mkdir()
    (out / "a.png").write_bytes(b"x")
    assert main(["predict", "--checkpoint", "never-read.pt", "--images", str(out), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"csl predict: error: --images names no image outside --out {out}" in err
    assert "1 image(s) inside --out" in err
