"""csl analyze: selection quality numbers by hand, and the command on a tiny synthetic run (JSON + pictures)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import synthetic_analysis

from csl.analyze import selection_quality, summarize
from csl.cli import main

TINY = ["data.crop_size=40", "data.num_workers=0", "data.synthetic.num_labeled=4", "data.synthetic.num_unlabeled=6",
        "data.synthetic.num_val=2", "data.synthetic.size=48", "train.batch_size=2", "train.progress=false",
        "tmp.block=16"]


def test_selection_quality_by_hand():
    pred = np.array([0, 0, 1, 1, 2])
    target = np.array([0, 1, 1, 1, 0])
    correct = pred == target  # T F T T F
    q = selection_quality(np.array([1, 1, 0, 1, 0.0]), correct, pred, target, 3)
    assert q["share"] == pytest.approx(3 / 5)
    assert q["accuracy"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["per_class"]["share"] == pytest.approx([1.0, 0.5, 0.0])
    assert q["per_class"]["accuracy"][:2] == pytest.approx([0.5, 1.0]) and q["per_class"]["accuracy"][2] is None
    assert q["per_class"]["recall"][:2] == pytest.approx([1.0, 0.5]) and q["per_class"]["recall"][2] is None
    # pred 0 0 1 1 2, weight 1 1 0 1 0, correct T F T T F, target 0 1 1 1 0
    assert q["per_class"]["pixels_predicted"] == [2.0, 2.0, 1.0]
    assert q["per_class"]["selected_weight"] == [2.0, 1.0, 0.0]
    assert q["per_class"]["correct_of_class"] == [1.0, 2.0, 0.0]
    soft = selection_quality(np.array([0.5, 1, 0, 0, 0.0]), correct, pred, target, 3)
    assert soft["share"] == pytest.approx(1.5 / 5) and soft["accuracy"] == pytest.approx(0.5 / 1.5)
    assert soft["recall"] == pytest.approx(0.5 / 3)


def test_summarize_sweeps_and_matched_share():
    rng = np.random.default_rng(0)
    n = 2000
    conf = rng.uniform(0.3, 1, n).astype(np.float32)
    target = rng.integers(0, 3, n)
    pred = np.where(rng.uniform(size=n) < conf, target, (target + 1) % 3)  # confident pixels are more often right
    arrays = {"conf": conf, "dispersion": -rng.uniform(size=n), "entropy": 1 - conf, "margin": conf - 0.3,
              "w_csl": np.where(conf > 0.6, 1.0, conf), "w_class": (conf > 0.7).astype(np.float32),
              "w_released": np.where(conf > 0.5, 1.0, 0.0), "pred": pred, "target": target}
    r = summarize(arrays, 3, taus=(0.5, 0.9), shares=(0.5,))
    assert [t["tau"] for t in r["threshold"]] == [0.5, 0.9]
    assert r["threshold"][1]["share"] < r["threshold"][0]["share"]
    assert r["threshold"][1]["accuracy"] > r["threshold"][0]["accuracy"] > r["all_pixels"]["accuracy"]
    assert r["sweeps"]["entropy"][0]["share"] == pytest.approx(0.5, abs=0.01)
    # entropy = 1 - conf and margin = conf - 0.3 rank the pixels as confidence does: same selection at a share
    for name in ("entropy", "margin"):
        assert r["at_csl_share"][name]["accuracy"] == pytest.approx(r["at_csl_share"]["confidence"]["accuracy"])
    assert r["at_csl_share"]["confidence"]["share"] == pytest.approx(r["csl"]["weighted"]["share"], abs=0.01)
    assert r["csl"]["hard"]["share"] == pytest.approx((conf > 0.6).mean())
    assert r["csl_released"]["hard"]["share"] == pytest.approx((conf > 0.5).mean())
    assert r["confidence_at_released_share"]["share"] == pytest.approx((conf > 0.5).mean(), abs=0.01)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze_run")
    assert main(["train", "--config", "demo", *TINY, "train.iters=2", "train.iters_per_epoch=2",
                 f"output_dir={out}"]) == 0
    return out / "latest.pt"


def test_analyze_command_writes_json_and_pictures(checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--max-images", "3",
                 "--panels", "2"]) == 0
    printed = capsys.readouterr().out
    assert "threshold 0.95" in printed and "CSL paper rule, w = 1" in printed
    with open(out / "analysis.json") as f:
        r = json.load(f)
    assert r["images"] == 3 and r["split"] == "unlabeled" and r["valid_pixels"] == 3 * 48 * 48
    assert len(r["threshold"]) == 9 and {t["tau"] for t in r["threshold"]} >= {0.5, 0.95, 0.99}
    for rule in ("csl", "csl_class"):
        for kind in ("hard", "weighted"):
            q = r[rule][kind]
            assert 0 <= q["share"] <= 1 and len(q["per_class"]["recall"]) == r["num_classes"] == 4
    assert set(r["sweeps"]) == {"entropy", "margin"} and set(r["at_csl_share"]) == {"confidence", "entropy",
                                                                                       "margin"}
    assert r["all_pixels"]["share"] == 1 and r["all_pixels"]["accuracy"] == pytest.approx(r["model_accuracy"])
    names = {os.path.basename(p) for p in r["pictures"]}
    assert names == {"accuracy_recall.png", "per_class.png", "feature_plane.png", "panels.png"}
    for name in names:
        assert (out / name).stat().st_size > 5000
    # the validation images instead
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "val"), "--split", "val",
                 "--panels", "0"]) == 0
    with open(tmp_path / "val" / "analysis.json") as f:
        r = json.load(f)
    assert r["images"] == 2
    # --panels 0: no panels.png; the feature plane (one image) is still drawn
    assert {os.path.basename(p) for p in r["pictures"]} == {"accuracy_recall.png", "per_class.png",
                                                            "feature_plane.png"}
    assert not (tmp_path / "val" / "panels.png").exists()


def test_eval_refuses_a_class_count_mismatch(checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "data.num_classes=5"]) == 2
    assert "predicts 4 classes but data.num_classes is 5" in capsys.readouterr().err


def test_cut_at_share_selects_exactly_the_share_when_scores_tie():
    from csl.analyze import _cut_at_share

    score = np.concatenate([np.ones(600, dtype=np.float32), np.linspace(0.1, 0.9, 400, dtype=np.float32)])
    chosen = _cut_at_share(score, 0.5, True)  # 60 % of the pixels are tied at 1.0 (a saturated confidence)
    assert chosen.sum() == 500 and chosen[600:].sum() == 0
    assert _cut_at_share(score, 0.7, True).sum() == 700 and _cut_at_share(score, 0.7, True)[:600].all()
    assert _cut_at_share(-score, 0.25, False).sum() == 250  # lower is better: the same pixels
    assert _cut_at_share(score, 0.0, True).sum() == 0 and _cut_at_share(score, 1.0, True).all()


def _random_pixels(n, seed):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1, n).astype(np.float32)
    target = rng.integers(0, 3, n)
    pred = np.where(rng.uniform(size=n) < conf, target, (target + 1) % 3)
    return {"conf": conf, "entropy": 1 - conf, "margin": conf - 0.3, "w_csl": np.where(conf > 0.6, 1.0, conf),
            "w_class": (conf > 0.7).astype(np.float32), "w_released": np.where(conf > 0.5, 1.0, 0.0),
            "pred": pred, "target": target}


def _flat(value) -> list:
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _flat(value[k])]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]


def test_tally_counts_images_exactly_and_samples_the_ranked_pixels_within_the_limit():
    from csl.analyze import _Tally

    images = [_random_pixels(n, 10 + seed) for seed, n in enumerate((3000, 5000, 4000))]  # not the tally's seed
    whole = {k: np.concatenate([im[k] for im in images]) for k in images[0]}
    exact = summarize(whole, 3, taus=(0.5, 0.9), shares=(0.5,))
    tally = _Tally(3, (0.5, 0.9), max_ranked=2500)
    for im in images:
        tally.add(**im)
    r = tally.result((0.5,))
    assert r["ranked_pixels"]["of"] == 12000 and r["ranked_pixels"]["kept"] <= 2500
    assert r["ranked_pixels"]["rate"] == 0.125  # halved until 12000 * rate fits
    for rule in ("csl", "csl_class", "csl_released", "threshold", "all_pixels"):  # pixel by pixel: exact
        assert _flat(r[rule]) == pytest.approx(_flat(exact[rule]), rel=1e-12)
    assert r["at_csl_share"]["confidence"]["share_target"] == pytest.approx(exact["csl"]["weighted"]["share"])
    # the sample's cut: the same share, accuracy within sampling error of all pixels'
    assert r["at_csl_share"]["confidence"]["share"] == pytest.approx(r["at_csl_share"]["confidence"]["share_target"],
                                                                     abs=1e-3)
    assert r["at_csl_share"]["confidence"]["accuracy"] == pytest.approx(exact["at_csl_share"]["confidence"]["accuracy"],
                                                                        abs=0.03)
    assert exact["ranked_pixels"] == {"kept": 12000, "of": 12000, "rate": 1.0}


def test_nothing_selected_is_none_in_strict_json():
    arrays = _random_pixels(500, 0)
    r = summarize(arrays, 3, taus=(0.5, 2.0), shares=(0.5,))  # tau 2: nothing selected
    assert r["threshold"][1]["share"] == 0 and r["threshold"][1]["accuracy"] is None
    json.dumps(r, allow_nan=False)


def _folder_dataset(root, masks):
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i, mask in enumerate(masks):
        os.makedirs(root / "images", exist_ok=True)
        os.makedirs(root / "masks", exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        if mask is not None:
            Image.fromarray(np.full((48, 48), mask, dtype=np.uint8)).save(root / "masks" / f"{i}.png")
        lines.append(f"images/{i}.png masks/{i}.png\n")
    for name in ("labeled", "unlabeled", "val"):
        (root / f"{name}.txt").write_text("".join(lines))
    return ["data.dataset=folder", f"data.root={root}", f"data.split_dir={root}", f"data.val_list={root}/val.txt"]


def test_max_ranked_pixels_below_one_is_an_error_not_the_default(tmp_path, capsys):
    from csl.analyze import run_analysis

    with pytest.raises(ValueError, match=r"max_ranked_pixels \(--max-ranked-pixels\) must be >= 1, got 0"):
        run_analysis(str(tmp_path / "never-read.pt"), str(tmp_path / "out"), max_ranked_pixels=0)
    assert main(["analyze", "--checkpoint", str(tmp_path / "never-read.pt"), "--max-ranked-pixels", "0"]) == 2
    assert "must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, -1])
def test_max_images_below_one_is_an_error_before_the_checkpoint_is_read(tmp_path, capsys, value):
    from csl.analyze import run_analysis

    with pytest.raises(ValueError, match=rf"max_images \(--max-images\) must be >= 1, got {value}"):
        run_analysis(str(tmp_path / "never-read.pt"), str(tmp_path / "out"), max_images=value)
    assert main(["analyze", "--checkpoint", str(tmp_path / "never-read.pt"), "--max-images", str(value)]) == 2
    assert f"max_images (--max-images) must be >= 1, got {value}" in capsys.readouterr().err


def test_analyze_refuses_to_overwrite_and_writes_beside_a_demo_run(checkpoint, tmp_path, capsys):
    import shutil

    demo = tmp_path / "demo"
    (demo / "csl").mkdir(parents=True)
    (demo / "summary.json").write_text("{}")
    shutil.copy(checkpoint, demo / "csl" / "latest.pt")
    args = ["analyze", "--checkpoint", str(demo / "csl" / "latest.pt"), "--max-images", "1", "--panels", "1"]
    assert main(args) == 0
    out = demo / "analysis" / "csl"  # where csl.report reads a demo folder's analyses
    assert (out / "analysis.json").is_file() and (out / "panels.png").is_file()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds an analysis" in capsys.readouterr().err
    assert main([*args[:-2], "--panels", "0", "--overwrite"]) == 0
    assert not (out / "panels.png").exists()  # the old analysis's pictures went with it
    printed = capsys.readouterr().out
    assert "CSL paper rule, w = 1" in printed and "CSL released rule, weighted" in printed


def test_analyze_skips_missing_masks_and_refuses_when_nothing_is_valid(checkpoint, tmp_path, capsys):
    data = _folder_dataset(tmp_path / "d1", [1, 2, None, 3])  # image 2 has no mask file
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a1"), "--panels", "0",
                 *data]) == 0
    with open(tmp_path / "a1" / "analysis.json") as f:
        r = json.load(f)
    assert r["images"] == 3 and r["skipped_images"] == ["images/2"] and r["valid_pixels"] == 3 * 48 * 48
    assert "1 skipped (no usable mask)" in capsys.readouterr().out
    data = _folder_dataset(tmp_path / "d2", [255, 255])
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a2"), "--panels", "0",
                 *data]) == 2
    assert "no valid (non-ignored) pixel in the 2 analysed image(s)" in capsys.readouterr().err
    assert not (tmp_path / "a2").exists()


def test_confidence_at_csl_amount_image_by_image_differs_from_the_pooled_cut():
    """Pooled, the confidence cut may take an easy image's pixels for a hard image's quota; image by image it takes
    round(sum of the image's CSL weights) pixels of each image, as the trained control does."""
    from csl.analyze import _Tally

    def image(conf, w, correct):
        conf, target = np.array(conf, dtype=np.float32), np.zeros(len(conf), dtype=np.int64)
        pred = np.where(np.array(correct), 0, 1)
        return {"conf": conf, "dispersion": np.zeros_like(conf), "entropy": 1 - conf, "margin": conf,
                "w_csl": np.array(w, dtype=np.float32), "w_class": np.array(w, dtype=np.float32),
                "w_released": np.array(w, dtype=np.float32), "pred": pred, "target": target}

    easy = image([0.99] * 4, [1, 1, 0, 0], [True] * 4)  # CSL's amount: 2 pixels
    hard = image([0.95, 0.94, 0.93, 0.2], [1, 1, 1, 0], [True, False, False, False])  # 3 pixels
    tally = _Tally(2, (0.95,))
    tally.add(**easy)
    tally.add(**hard)
    r = tally.result((0.5,))
    per_image, pooled = r["confidence_per_image_at_csl_share"], r["at_csl_share"]["confidence"]
    assert per_image["share"] == pytest.approx(5 / 8) and pooled["share"] == pytest.approx(5 / 8)
    assert per_image["accuracy"] == pytest.approx(3 / 5)  # easy: 2 right; hard: 0.95 right, 0.94 and 0.93 wrong
    assert pooled["accuracy"] == pytest.approx(1.0)  # the four easy pixels and the hard image's best one


def test_bad_out_and_panels_are_said_before_any_work(tmp_path, capsys):
    """--out naming a file (or a path inside one) and a negative --panels stop at the start, naming the option; the
    checkpoint (not there) is never read."""
    from csl.analyze import run_analysis

    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    never = str(tmp_path / "never-read.pt")
    with pytest.raises(ValueError, match=r"--out .*afile.txt is a file; give a folder"):
        run_analysis(never, str(afile))
    with pytest.raises(ValueError, match=r"is inside .*afile.txt, which is a file"):
        run_analysis(never, str(afile / "sub" / "deeper"))
    with pytest.raises(ValueError, match=r"panels \(--panels\) must be >= 0, got -1"):
        run_analysis(never, str(tmp_path / "out"), panels=-1)
    assert main(["analyze", "--checkpoint", never, "--out", str(afile)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    if os.path.isdir("/proc/self"):  # Linux: a folder in which nothing can be made, even by root
        assert main(["analyze", "--checkpoint", never, "--out", "/proc/csl-out/sub"]) == 2
        assert ("--out /proc/csl-out/sub: cannot write there (in /proc, the nearest folder of it that exists): No such "
                "file or directory; give a folder you can write in") in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_a_backend_that_cannot_run_here_is_a_config_error(checkpoint, tmp_path, capsys, command):
    """kernels.backend=cuda with the model on the CPU: one line naming the key, exit 2, no traceback."""
    extra = ["--out", str(tmp_path / "a")] if command == "analyze" else []
    assert main([command, "--checkpoint", str(checkpoint), *extra, "device=cpu", "kernels.backend=cuda"]) == 2
    err = capsys.readouterr().err
    assert "kernels.backend=cuda cannot run on cpu" in err and "Traceback" not in err


def test_a_ranked_sample_halved_to_nothing_keeps_the_exact_counts_and_reports_the_rest_as_absent():
    """--max-ranked-pixels 1 may halve the sample to no pixel (it does for these 1000; the tally's generator is
    seeded): the per-image confidence cut is counted on every pixel and stays; the cuts of the sample are absent, and
    the report of it is still written."""
    from csl.report import selection_table

    arrays = _random_pixels(1000, 3)
    exact = summarize(arrays, 3, taus=(0.5,), shares=(0.5,))
    r = summarize(arrays, 3, taus=(0.5,), shares=(0.5,), max_ranked=1)
    assert r["ranked_pixels"]["kept"] == 0
    assert r["confidence_per_image_at_csl_share"] == exact["confidence_per_image_at_csl_share"]
    assert r["confidence_at_released_share"] is None and r["at_csl_share"] == {} and r["sweeps"] == {}
    json.dumps(r, allow_nan=False)
    assert "each image at its CSL amount" in selection_table(r)


def test_a_model_that_gets_every_pixel_wrong_is_plotted(tmp_path):
    """Accuracy 0 with recall undefined (no correct pixel at all) at every tau: a gap, not a crash when saving."""
    from csl.plots import plot_accuracy_recall

    arrays = _random_pixels(2000, 4)
    arrays["pred"] = (arrays["target"] + 1) % 3
    r = summarize(arrays, 3, taus=(0.5, 0.95), shares=(0.5,))
    assert r["threshold"][0]["accuracy"] == 0 and r["threshold"][0]["recall"] is None
    path = plot_accuracy_recall(r, str(tmp_path))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_pictures_of_an_analysis_stopped_before_its_json_are_removed(tmp_path):
    from csl.analyze import PICTURES, prepare_out_dir

    for name in PICTURES:
        (tmp_path / name).write_bytes(b"old")
    prepare_out_dir(str(tmp_path), overwrite=False)
    assert not any((tmp_path / name).exists() for name in PICTURES)
    (tmp_path / "analysis.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds an analysis"):
        prepare_out_dir(str(tmp_path), overwrite=False)


def test_a_picture_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from csl.plots import _pyplot, _save_figure

    path = tmp_path / "accuracy_recall.png"
    path.write_bytes(b"the earlier picture")
    fig = _pyplot().figure()

    def killed_midway(self, f, **kwargs):
        f.write(b"\x89PNG\r\n\x1a\n part")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _save_figure(fig, str(path))
    assert path.read_bytes() == b"the earlier picture" and os.listdir(tmp_path) == ["accuracy_recall.png"]


def test_confidence_per_image_takes_csls_soft_amount():
    """The per-image confidence cut selects round(sum of the CSL weights) pixels, the soft weights counted, not
    only the pixels at weight 1."""
    rng = np.random.default_rng(1)
    n = 1000
    conf = rng.uniform(0.3, 1, n).astype(np.float32)
    target = rng.integers(0, 3, n)
    pred = np.where(rng.uniform(size=n) < conf, target, (target + 1) % 3)
    w_csl = np.where(conf > 0.8, 1.0, 0.5)  # ~29 % at weight 1, a weighted share of ~64 %
    arrays = {"conf": conf, "dispersion": -rng.uniform(size=n), "entropy": 1 - conf, "margin": conf,
              "w_csl": w_csl, "w_class": w_csl, "w_released": w_csl, "pred": pred, "target": target}
    r = summarize(arrays, 3, taus=(0.5,), shares=(0.5,))
    assert r["confidence_per_image_at_csl_share"]["share"] == pytest.approx(w_csl.sum() / n, abs=1 / n)


def test_a_threshold_keeps_a_confidence_equal_to_tau():
    """docs/selection.md Sec. 3: w = [pmax >= tau]; a two-class tie (confidence exactly 0.5) is kept at tau 0.5."""
    conf = np.array([0.5, 0.5, 0.75, 0.25], dtype=np.float32)
    pred, target = np.array([0, 1, 1, 0]), np.array([0, 1, 1, 1])
    arrays = {"conf": conf, "dispersion": np.zeros(4), "entropy": 1 - conf, "margin": conf, "w_csl": np.ones(4),
              "w_class": np.ones(4), "w_released": np.ones(4), "pred": pred, "target": target}
    r = summarize(arrays, 2, taus=(0.5,), shares=(0.5,))
    assert r["threshold"][0]["share"] == pytest.approx(3 / 4)


def _printed_analysis(rule: str) -> dict:
    """What run_analysis returns, with numbers that tell every rule and column apart."""
    return {**synthetic_analysis(), "images": 7, "skipped_images": [], "valid_pixels": 1234, "rule": rule,
            "pictures": ["a.png", "b.png"]}


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_analyze_prints_each_rules_share_accuracy_recall_the_trained_rule_first(tmp_path, monkeypatch, capsys,
                                                                                  rule):
    """The command's table: the 0.95 threshold, then both CSL rules (the one the checkpoint's config trains with
    first), the per-class rule, the cuts at CSL's share; share / accuracy / recall in percent. --max-ranked-pixels
    reaches the analysis (its default otherwise)."""
    import csl.analyze

    calls = []
    monkeypatch.setattr(csl.analyze, "run_analysis", lambda *a, **k: calls.append(k) or _printed_analysis(rule))
    assert main(["analyze", "--checkpoint", "never-read.pt", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "7 images (unlabeled), 1234 valid pixels, model pixel accuracy 90.0%"
    assert lines[1].split() == ["rule", "share", "accuracy", "recall"]
    rows = [(line[:30].strip(), line[30:].split()) for line in lines[2:-1]]
    paper = [("CSL paper rule, w = 1", ["51.0%", "52.0%", "53.0%"]), ("CSL paper rule, weighted",
                                                                      ["41.0%", "42.0%", "43.0%"])]
    released = [("CSL released rule, w = 1", ["11.0%", "12.0%", "13.0%"]),
                 ("CSL released rule, weighted", ["14.0%", "15.0%", "16.0%"])]
    assert rows == [("threshold 0.95", ["61.0%", "62.0%", "63.0%"]),
                    *(paper + released if rule == "paper" else released + paper),
                    ("CSL per class, w = 1", ["31.0%", "32.0%", "33.0%"]),
                    ("CSL per class, weighted", ["21.0%", "22.0%", "23.0%"]),
                    ("confidence at CSL's share", ["41.0%", "81.0%", "82.0%"]),
                    ("entropy at CSL's share", ["41.0%", "83.0%", "84.0%"]),
                    ("confidence, CSL's per image", ["41.0%", "85.0%", "86.0%"])]
    assert lines[-1] == f"wrote {tmp_path / 'analysis.json'} and 2 pictures"
    assert calls[0]["max_ranked_pixels"] == csl.analyze.DEFAULT_MAX_RANKED_PIXELS
    assert main(["analyze", "--checkpoint", "never-read.pt", "--out", str(tmp_path), "--max-ranked-pixels", "99"]) == 0
    assert calls[1]["max_ranked_pixels"] == 99


def test_baseline_row_is_the_sweeps_entry_at_tau():
    from csl.analyze import baseline_row

    result = {"threshold": [{"tau": 0.9, "share": 0.7}, {"tau": 0.95, "share": 0.6}]}
    assert baseline_row(result) == {"tau": 0.95, "share": 0.6} and baseline_row(result, 0.9)["share"] == 0.7
    assert baseline_row(result, 0.99) is None


def test_cut_at_share_rounds_the_pixel_count_to_the_nearest():
    """round(share * n) pixels, as the per-image CSL amount round(sum of its weights): 2.7 of 10 is 3, not 2."""
    from csl.analyze import _cut_at_share

    score = np.linspace(0.0, 1.0, 10)
    assert _cut_at_share(score, 0.27, True).tolist() == [False] * 7 + [True] * 3
    assert _cut_at_share(score, 0.27, False).tolist() == [True] * 3 + [False] * 7
    assert _cut_at_share(score, 0.24, True).sum() == 2


@pytest.mark.parametrize(("rule", "confidence", "paper_confidence", "released_confidence"),
                         [("paper", "log", "log", "log"), ("paper", "prob", "prob", "log"),
                          ("released", "log", "prob", "log"), ("released", "prob", "prob", "prob")])
def test_an_explicit_confidence_applies_to_the_trained_rule_only(checkpoint, tmp_path, rule, confidence,
                                                                 paper_confidence, released_confidence):
    """``selection.confidence`` is the confidence of the rule the config trains; the other rule is analysed with
    its own default (paper: prob, released: log)."""
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--max-images", "1", "--panels", "0",
                 f"selection.rule={rule}", f"selection.confidence={confidence}"]) == 0
    with open(out / "analysis.json") as f:
        r = json.load(f)
    assert (r["rule"], r["confidence"], r["released_confidence"]) == (rule, paper_confidence, released_confidence)
