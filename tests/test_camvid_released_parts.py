"""scripts/camvid_released_parts.py: the released rule's three differences set apart, one at a time."""

from __future__ import annotations

import contextlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_script

import csl_kernels


def test_the_pure_combinations_are_the_two_rules_and_the_mixed_ones_differ():
    parts = load_script("camvid_released_parts")
    z = torch.randn(2, 5, 9, 11, generator=torch.Generator().manual_seed(0)) * 3
    paper = csl_kernels.pcos_weights(z, None, alpha=8.0, rule="paper", backend="reference").weight
    released = csl_kernels.pcos_weights(z, None, alpha=8.0, rule="released", backend="reference").weight
    assert torch.equal(parts.weights(z, 8.0, "prob", "paper", "above"), paper)
    assert torch.equal(parts.weights(z, 8.0, "log", "released", "below"), released)
    # each part alone changes the weights: the side, the variance, the confidence feature
    for combo in (("prob", "paper", "below"), ("prob", "released", "above"), ("log", "paper", "above")):
        assert not torch.equal(parts.weights(z, 8.0, *combo), paper), combo
    # the reference's own features are back after each call (the released rule sets both parts again)
    assert parts.pcos_module.features_with_validity is parts._FEATURES
    assert torch.equal(csl_kernels.pcos_weights(z, None, alpha=8.0, rule="released", backend="reference").weight,
                       released)


def _fake_run(parts, monkeypatch, mode: str = "original", crop: int | None = None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """main()'s checkpoint, config, data and model replaced: three 6 x 7 images of 4 classes, the second without a
    mask, void (255) pixels in the others (the first's top row, the third's two left columns); the "model" returns
    fixed logits per image, of the image's size, or in ``center_crop`` mode of the crop's (``crop`` is the data's
    crop size, the eval's left unset)."""
    gen = torch.Generator().manual_seed(1)
    size = (crop, crop) if mode == "center_crop" else (6, 7)
    logits = [torch.randn(1, 4, *size, generator=gen) * 3 for _ in range(3)]
    masks = [torch.randint(0, 4, (6, 7), generator=gen) for _ in range(3)]
    masks[0][0, :] = 255
    masks[2][:, :2] = 255
    masks[1] = None
    items = [{"image": torch.full((3, 6, 7), float(i)), "mask": masks[i]} for i in range(3)]
    cfg = {"eval": {"mode": mode, "crop_size": None, "stride_ratio": 0.5},
           "data": {"dataset": "camvid", "crop_size": crop or 8}, "selection": {"alpha": 8.0}}

    def predict_logits(model, image, **kw):
        assert image.shape == (1, 3, 6, 7)  # the whole image: predict_logits crops it itself
        assert kw["mode"] == mode and kw["crop_size"] == (crop or 8)
        return logits[int(image[0, 0, 0, 0])]

    monkeypatch.setattr(parts, "load_checkpoint", lambda path: {})
    monkeypatch.setattr(parts, "config_for_checkpoint", lambda *args: cfg)
    monkeypatch.setattr(parts, "model_from_checkpoint", lambda *args: (None, None))
    monkeypatch.setattr(parts, "stored_data_paths", lambda *args: contextlib.nullcontext())
    monkeypatch.setattr(parts, "analysis_dataset", lambda cfg, part: items)
    monkeypatch.setattr(parts, "predict_logits", predict_logits)
    return logits, masks


def _check_figures(parts, got: dict, logits: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """The record's figures against those of ``logits`` and ``targets`` (the scored images' masks as scored): the
    valid pixels, every pixel's accuracy, and each combination's share, accuracy and recall, at weight 1 and
    weighted; recall is of the correct pixels."""
    valid = [t != 255 for t in targets]
    correct = [(z.argmax(1)[0] == t)[v].double() for z, t, v in zip(logits, targets, valid, strict=True)]
    assert got["valid_pixels"] == sum(int(v.sum()) for v in valid)
    n_correct = sum(float(c.sum()) for c in correct)
    assert abs(got["all_pixels_accuracy"] - n_correct / got["valid_pixels"]) < 1e-12
    assert len(got["rows"]) == 8
    for row in got["rows"]:
        combo = (row["confidence"], row["variance"], row["side"])
        ws = [parts.weights(z, 8.0, *combo)[0][v].double() for z, v in zip(logits, valid, strict=True)]
        for kind, sel in (("hard", [(w >= 1).double() for w in ws]), ("weighted", ws)):
            chosen = sum(float(s.sum()) for s in sel)
            chosen_correct = sum(float((s * c).sum()) for s, c in zip(sel, correct, strict=True))
            expected = {"share": chosen / got["valid_pixels"], "accuracy": chosen_correct / chosen,
                        "recall": chosen_correct / n_correct}
            for figure, value in expected.items():
                assert abs(row[kind][figure] - value) < 1e-9, (combo, kind, figure)
    assert 0 < got["rows"][0]["hard"]["share"] < 1  # weight 1 on some pixels, not all


def test_the_parts_figures_are_taken_over_the_valid_pixels(tmp_path, monkeypatch, capsys):
    """main() on made-up predictions: the figures are over the valid pixels of the images with a mask (void and the
    maskless image left out), and the record's image count is of the images scored, the maskless one counted apart.
    A pure combination that differs from pcos_weights stops the script."""
    parts = load_script("camvid_released_parts")
    logits, masks = _fake_run(parts, monkeypatch)
    out = tmp_path / "parts.json"
    assert parts.main(["--checkpoint", "ckpt.pt", "--out", str(out)]) == 0
    with open(out) as f:
        got = json.load(f)
    assert got["valid_pixels"] == 6 * 7 - 7 + 6 * 7 - 12
    _check_figures(parts, got, logits[::2], masks[::2])
    assert got["images"] == 2 and got["images_without_mask"] == 1
    assert "valid pixels of 2 images (1 more without a mask, not scored);" in capsys.readouterr().out
    assert parts.main(["--checkpoint", "ckpt.pt", "--out", str(out), "--max-images", "1"]) == 0
    with open(out) as f:
        got = json.load(f)
    assert got["images"] == 1 and got["images_without_mask"] == 0 and got["valid_pixels"] == 6 * 7 - 7
    real = csl_kernels.pcos_weights
    monkeypatch.setattr(csl_kernels, "pcos_weights",
                        lambda *args, **kwargs: SimpleNamespace(weight=0.99 * real(*args, **kwargs).weight))
    with pytest.raises(SystemExit, match=r"differs from pcos_weights\(rule='paper'\)"):
        parts.main(["--checkpoint", "ckpt.pt"])


def test_center_crop_scores_the_masks_central_window(tmp_path, monkeypatch):
    """In ``center_crop`` mode (crop size from the data's config when the eval's is unset) the model's crop-size
    logits are scored against the mask's central 4 x 4 window of 6 x 7: rows 1-4 (the first mask's void top row
    left out), columns 1-4 (one of the third mask's two void columns in)."""
    parts = load_script("camvid_released_parts")
    logits, masks = _fake_run(parts, monkeypatch, mode="center_crop", crop=4)
    out = tmp_path / "parts.json"
    assert parts.main(["--checkpoint", "ckpt.pt", "--out", str(out)]) == 0
    with open(out) as f:
        got = json.load(f)
    assert got["valid_pixels"] == 4 * 4 + 4 * 3
    _check_figures(parts, got, logits[::2], [m[1:5, 1:5] for m in masks[::2]])
    assert got["images"] == 2


def test_all_void_masks(tmp_path, monkeypatch):
    """A first image whose mask is all void still has its weights checked against pcos_weights (over every pixel)
    and counts as scored, with no pixel; when every mask is void (or missing) there is nothing to score: a message,
    not a division by zero."""
    parts = load_script("camvid_released_parts")
    _, masks = _fake_run(parts, monkeypatch)
    masks[0].fill_(255)
    out = tmp_path / "parts.json"
    assert parts.main(["--checkpoint", "ckpt.pt", "--out", str(out)]) == 0
    with open(out) as f:
        got = json.load(f)
    assert got["valid_pixels"] == 6 * 7 - 12 and got["images"] == 2 and got["max_dev_from_pcos_weights"] < 1e-12
    masks[2].fill_(255)
    with pytest.raises(SystemExit, match=r"no valid \(non-void\) pixel in the 2 image\(s\) with a mask of the 3 read"):
        parts.main(["--checkpoint", "ckpt.pt"])


def test_the_documented_parts_table_is_the_records():
    """The table of "The three differences one at a time" in docs/results/camvid.md: each combination's row holds the
    committed ``released_parts_<model>.json`` figures (warm-up then supervised; weight 1 then weighted), and the
    last row every pixel's accuracy."""
    records = {}
    for model in ("warmup", "supervised"):
        with open(os.path.join(ROOT, "docs", "results", "camvid", "seed0_rules", f"released_parts_{model}.json")) as f:
            records[model] = json.load(f)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        doc = f.read().splitlines()
    cells = lambda q: " / ".join(f"{100 * q[k]:.1f}" for k in ("share", "accuracy", "recall"))  # noqa: E731
    for warmup, supervised in zip(records["warmup"]["rows"], records["supervised"]["rows"], strict=True):
        combo = (warmup["confidence"], warmup["variance"], warmup["side"])
        assert combo == (supervised["confidence"], supervised["variance"], supervised["side"])
        start = "| {} | {} | {} the mean".format(*combo)
        (line,) = [line for line in doc if line.startswith(start)]
        assert line.endswith(" | ".join(cells(r[k]) for r in (warmup, supervised) for k in ("hard", "weighted")) + " |")
    every = [f"100 / {100 * records[m]['all_pixels_accuracy']:.1f} / 100" for m in ("warmup", "supervised")]
    assert f"| (every pixel) | | | {every[0]} | | {every[1]} | |" in doc
