"""scripts/camvid_overview.py and scripts/camvid_oracle.py: the tables of docs/results/camvid.md are what the committed
records give."""

from __future__ import annotations

import itertools
import json
import os
import re

import numpy as np
import pytest
from conftest import ROOT, load_script

from csl.logging_utils import read_metrics


def test_the_documented_table_is_the_records_table(tmp_path):
    overview = load_script("camvid_overview")
    finals = overview.load()
    table = overview.table(finals)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()  # regenerated whenever a record changes
    assert "| 1/4, mean | 48.3 | 52.5 | 48.1 | 47.8 | 48.1 | 48.2 | -0.3 |" in table
    # A paired difference is of one split and seed: CSL minus threshold of 1/4 seed 2 from its own records.
    assert abs(finals[("1/4", 2)]["csl"] - finals[("1/4", 2)]["threshold"] - (-1.04)) < 0.01
    path = overview.picture(finals, str(tmp_path / "overview.png"))
    assert os.path.getsize(path) > 10_000


def test_the_documented_oracle_table_is_the_records_table(tmp_path):
    """The table of "Perfect pseudo-labels" is scripts/camvid_oracle.py's output over the committed records."""
    oracle = load_script("camvid_oracle")
    runs = oracle.load()
    table = oracle.table(runs)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()
    seed0, seed1, seed2 = runs["1/8", 0, ""], runs["1/8", 1, ""], runs["1/8", 2, ""]
    assert {("1/8", 0, ""), ("1/8", 1, ""), ("1/8", 2, "")} <= set(runs)
    assert {"supervised", "oracle", "threshold"} <= set(seed0) <= set(seed1)
    assert set(seed2) == {"warmup", "supervised", "oracle", "threshold", "csl"}
    assert abs(seed2["oracle"]["miou"][-1] - seed2["threshold"]["miou"][-1] - 2.27) < 0.01
    assert set(runs["1/4", 0, ""]) == {"warmup", "supervised", "oracle", "threshold", "csl"}
    assert abs(runs["1/4", 0, ""]["csl"]["miou"][-1] - runs["1/4", 0, ""]["threshold"]["miou"][-1]) < 0.01  # level
    seed1 = runs["1/4", 1, ""]  # its CSL stage stopped for time
    assert set(seed1) == {"warmup", "supervised", "oracle", "threshold"}
    assert abs(seed1["oracle"]["miou"][-1] - seed1["threshold"]["miou"][-1] - 4.19) < 0.01
    assert abs(runs["1/4", 0, ""]["oracle"]["miou"][-1] - runs["1/4", 0, ""]["threshold"]["miou"][-1] - 1.82) < 0.01
    # Beside the committed 1/4 seed 1 runs (their warm-up, repeated bit for bit): continuations read from their folder.
    amd = runs["1/4", 1, "AMD EPYC"]
    assert {"warmup", "supervised", "oracle", "threshold", "csl"} <= set(amd)
    assert amd["threshold"]["miou"] == [100 * r["miou"] for r in read_metrics(
        os.path.join(ROOT, "docs", "results", "camvid", "1_4_seed1", "metrics_threshold.jsonl"), "eval")]
    assert abs(amd["oracle"]["miou"][-1] - amd["threshold"]["miou"][-1] - 3.74) < 0.01
    assert abs(amd["oracle"]["miou"][-1] - amd["csl"]["miou"][-1] - 3.47) < 0.01
    assert abs(amd["oracle"]["crops"] - 51.83) < 0.01 and amd["threshold"]["crops"] is None
    amd2 = runs["1/4", 2, "AMD EPYC"]
    assert abs(amd2["oracle"]["miou"][-1] - amd2["threshold"]["miou"][-1] - 3.04) < 0.01
    assert abs(amd2["csl"]["miou"][-1] - amd2["threshold"]["miou"][-1] - (-1.05)) < 0.01
    # A BatchNorm-re-estimated mIoU is the last JSON line of `csl eval --bn-recalibrate 320`'s output.
    assert abs(seed0["oracle"]["frames"] - 50.75) < 0.01
    # Seed 0's warm-up kept no records: its one evaluation stands in for them.
    assert seed0["warmup"]["miou"] == [oracle.WARMUP_MIOU["seed0_oracle"]]
    path = oracle.picture(runs, str(tmp_path / "oracle.png"))
    assert os.path.getsize(path) > 10_000


def test_the_documented_confidence_table_is_the_records_table(tmp_path):
    """"When does the confidence fail?": the table is scripts/camvid_confidence.py's over the committed records, and
    its figures are the analyses' own numbers."""
    import json

    script = load_script("camvid_confidence")
    rows, short, curve = script.load()
    table = script.table(rows, short)
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert table in f.read()
    assert [r["iter"] for r in rows] == [0, 400, 1000, 2000, 3000, 4000] and short["iter"] == 600
    folder = os.path.join(ROOT, "docs", "results", "camvid", "1_4_seed2_long_supervised")
    assert curve[-1][0] == 4000 and abs(curve[-1][1] - 59.43) < 0.01
    with open(os.path.join(folder, "analysis_iter4000.json")) as f:
        last = json.load(f)
    assert last["checkpoint_iteration"] == 4000
    gap = last["csl"]["weighted"]["accuracy"] - last["confidence_per_image_at_csl_share"]["accuracy"]
    assert abs(rows[-1]["csl_minus_conf"] - 100 * gap) < 1e-9 and -0.3 < 100 * gap < -0.1
    # the confidently wrong pixels: the 0.95 threshold keeps 6.3 % of the warm-up model's errors, 9.7 % at the end
    assert round(rows[0]["wrong_kept"], 1) == 6.3 and round(rows[-1]["wrong_kept"], 1) == 9.7
    path = script.picture(rows, curve, str(tmp_path / "confidence.png"))
    assert os.path.getsize(path) > 10_000
    # The comparison again from the iteration-4000 model: its table too is the records'.
    runs = script.load_continuations()
    assert set(runs) == {(method, seed) for method in ("supervised", "threshold", "csl") for seed in (2, 3, 4)}
    assert all(r["iters"] == [100, 200, 300, 400, 500, 600] for r in runs.values())
    # supervised only from the same model ends 2.4-3.0 points above both selections on every seed, CSL level with
    # the threshold (+0.1, +0.6, +0.3)
    gaps = [runs["supervised", seed]["miou"][-1] - runs[method, seed]["miou"][-1]
            for seed in (2, 3, 4) for method in ("threshold", "csl")]
    assert [round(g, 1) for g in gaps] == [2.7, 2.6, 3.0, 2.4, 2.9, 2.5]
    assert [round(runs["csl", seed]["miou"][-1] - runs["threshold", seed]["miou"][-1], 1) for seed in (2, 3, 4)] == [
        0.1, 0.6, 0.3]
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        assert script.continuation_table(runs, rows[-1]["miou"]) in f.read()
    path = script.continuation_picture(runs, rows[-1]["miou"], str(tmp_path / "from4000.png"))
    assert os.path.getsize(path) > 10_000


def _jsonl(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _evals(*pairs: tuple[int, float]) -> list[dict]:
    return [{"kind": "train", "iter": 1, "loss": 1.0}] + [{"kind": "eval", "iter": i, "miou": m} for i, m in pairs]


def test_the_overview_means_only_over_every_seed_and_draws_paired_differences(kept_figures, tmp_path):
    """A made-up overview: a split's mean is over its own seeds, "-" for a method some seed lacks; CSL minus threshold
    is per split and seed, then averaged over the split's seeds; the picture draws each method minus the threshold of
    the same run at the method's place."""
    overview = load_script("camvid_overview")
    assert overview.METHODS == ["warmup", "supervised", "threshold", "csl", "csl_no_tmp", "confidence_share"]
    full = dict(zip(overview.METHODS, (40.0, 41.0, 42.0, 43.0, 44.0, 45.0), strict=True))
    seed1 = {"warmup": 42.0, "supervised": 43.0, "threshold": 44.0, "csl": 41.0, "confidence_share": 47.0}
    finals = {("1/8", 0): full, ("1/8", 1): seed1, ("1/4", 0): full}
    assert overview.table(finals).splitlines()[2:] == [
        "| 1/8, seed 0 | 40.0 | 41.0 | 42.0 | 43.0 | 44.0 | 45.0 | +1.0 |",
        "| 1/8, seed 1 | 42.0 | 43.0 | 44.0 | 41.0 | - | 47.0 | -3.0 |",
        "| 1/4, seed 0 | 40.0 | 41.0 | 42.0 | 43.0 | 44.0 | 45.0 | +1.0 |",
        "| 1/8, mean | 41.0 | 42.0 | 43.0 | 42.0 | - | 46.0 | -1.0 |",
        "| 1/4, mean | 40.0 | 41.0 | 42.0 | 43.0 | 44.0 | 45.0 | +1.0 |"]
    overview.picture(finals, str(tmp_path / "overview.png"))
    (fig,) = kept_figures
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    # places 0-3: supervised, CSL, CSL without TMP, confidence at CSL's share; the 1/8 runs left of each place (its
    # two seeds 0.08 apart around -0.2), the 1/4 run right
    np.testing.assert_allclose(lines["1/8 split, seed 0"].get_xdata(), [-0.24, 0.76, 1.76, 2.76])
    np.testing.assert_allclose(lines["1/8 split, seed 1"].get_xdata(), [-0.16, 0.84, 2.84])
    np.testing.assert_allclose(lines["1/8 split, seed 1"].get_ydata(), [-1.0, -3.0, 3.0])
    np.testing.assert_allclose(lines["1/4 split, seed 0"].get_xdata(), [0.2, 1.2, 2.2, 3.2])
    np.testing.assert_allclose(lines["1/4 split, seed 0"].get_ydata(), [-1.0, 1.0, 2.0, 3.0])


def _covering_markers(ax, *, unconnected_only: bool = False) -> list[tuple[str, str]]:
    """The pairs of marker labels (``label@index``) in ``ax`` whose markers, as drawn, overlap: centres closer in
    display pixels than half their two sizes together; only the markers without a connecting line if
    ``unconnected_only``."""
    ax.figure.canvas.draw()  # the axes' limits and place as written
    marks = []
    for line in ax.get_lines():
        if line.get_marker() in ("None", "", None) or (unconnected_only and line.get_linestyle() != "None"):
            continue
        radius = line.get_markersize() * ax.figure.dpi / 72 / 2
        xy = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
        marks += [(f"{line.get_label()}@{i}", p, radius) for i, p in enumerate(xy)]
    return [(a, b) for (a, pa, ra), (b, pb, rb) in itertools.combinations(marks, 2) if np.hypot(*(pa - pb)) < ra + rb]


def test_every_run_of_the_overview_has_its_own_place(kept_figures, tmp_path):
    """Three seeds of each split with the same differences to the threshold: every run's marker still shows whole
    beside the others' (the seeds of a split drawn at one place covered each other)."""
    overview = load_script("camvid_overview")
    row = {"supervised": 43.0, "threshold": 42.0, "csl": 42.5, "csl_no_tmp": 42.5, "confidence_share": 42.0}
    finals = {(split, seed): dict(row) for split in ("1/8", "1/4") for seed in (0, 1, 2)}
    overview.picture(finals, str(tmp_path / "overview.png"))
    (fig,) = kept_figures
    assert len([line for line in fig.axes[0].get_lines() if line.get_marker() in ("o", "s")]) == 6
    assert _covering_markers(fig.axes[0]) == []


def test_every_recalibrated_final_model_of_the_oracle_picture_has_its_own_place(kept_figures, tmp_path):
    """Four continuations whose final models re-estimate to the same mIoU: their stars and diamonds all show whole
    (drawn at one place beside the last evaluation they covered each other)."""
    oracle = load_script("camvid_oracle")
    run = {"iters": [100, 200, 300, 400, 500, 600], "miou": [40.0, 41.0, 42.0, 43.0, 44.0, 45.0], "frames": 46.0,
           "crops": 46.0}
    runs = {("1/4", 0, ""): {m: dict(run) for m in ("supervised", "oracle", "threshold", "csl")}}
    oracle.picture(runs, str(tmp_path / "oracle.png"))
    (fig,) = kept_figures
    ax = fig.axes[0]
    assert sorted(line.get_marker() for line in ax.get_lines() if line.get_linestyle() == "None") == ["*"] * 4 + [
        "D"] * 4
    assert _covering_markers(ax, unconnected_only=True) == []


def test_the_oracle_table_and_picture_of_made_up_runs(kept_figures, tmp_path):
    """Differences to the threshold only where a run has the threshold's evaluations (never for the warm-up), the best
    only beside a curve, "-" for a BatchNorm figure not on record; in the picture the warm-up's last mIoU as the line,
    the re-estimated figures right of the last evaluation (star: frames, diamond: crops)."""
    oracle = load_script("camvid_oracle")
    run = lambda miou, frames=None, crops=None: {  # noqa: E731
        "iters": [100 * (i + 1) for i in range(len(miou))], "miou": miou, "frames": frames, "crops": crops}
    runs = {("1/4", 1, "AMD EPYC"): {"warmup": run([40.0, 41.0]), "supervised": run([45.0, 44.0], frames=46.123),
                                     "threshold": run([42.0, 43.5], crops=47.0), "csl": run([41.0])}}
    label = oracle.LABELS
    assert oracle.table(runs).splitlines()[2:] == [
        f"| 1/4, seed 1 (AMD EPYC) | {label['warmup']} | 40.0, 41.0 | 41.0 (41.0) |  | - | - |",
        f"| 1/4, seed 1 (AMD EPYC) | {label['supervised']} | 45.0, 44.0 | 44.0 (45.0) | +3.0, +0.5 | 46.12 | - |",
        f"| 1/4, seed 1 (AMD EPYC) | {label['threshold']} | 42.0, 43.5 | 43.5 (43.5) |  | - | 47.00 |",
        f"| 1/4, seed 1 (AMD EPYC) | {label['csl']} | 41.0 | 41.0 |  | - | - |"]
    oracle.picture(runs, str(tmp_path / "oracle.png"))
    (fig,) = kept_figures
    points = {(line.get_marker(), tuple(line.get_xdata()), tuple(line.get_ydata())) for line in fig.axes[0].get_lines()}
    # evaluations from 100 to 200: a step of 6.25 right of 200, the stars from the second step (supervised first of the
    # four continuations), the diamonds after the stars' four places and one step between (threshold third)
    assert {("None", (0, 1), (41.0, 41.0)), ("*", (212.5,), (46.123,)), ("D", (256.25,), (47.0,))} <= points


def test_a_recalibrated_miou_is_the_last_json_line(tmp_path):
    """``csl eval --bn-recalibrate`` output: its last JSON line, whatever text comes around it; None without one."""
    oracle = load_script("camvid_oracle")
    path = tmp_path / "bn_oracle.txt"
    path.write_text('loading\n{"miou": 0.1}\nre-estimating\n{"miou": 0.4321, "mode": "original"}\n  class 0: 90\n')
    assert abs(oracle.recalibrated_miou(str(path)) - 43.21) < 1e-9
    path.write_text("no record\n")
    assert oracle.recalibrated_miou(str(path)) is None
    assert oracle.recalibrated_miou(str(tmp_path / "absent.txt")) is None


def _analysis(all_acc: float, thr: tuple[float, float], csl: tuple[float, float, float], conf_acc: float,
              iteration: int | None = None) -> dict:
    """What the confidence script reads of a ``csl analyze`` output (a 0.9 threshold too, which it must skip)."""
    analysis = {"all_pixels": {"accuracy": all_acc},
                "threshold": [{"tau": 0.9, "share": 0.99, "accuracy": 0.01, "recall": 0.5},
                              {"tau": 0.95, "share": thr[0], "accuracy": thr[1], "recall": 0.5}],
                "csl": {"weighted": dict(zip(("share", "accuracy", "recall"), csl, strict=True))},
                "confidence_per_image_at_csl_share": {"accuracy": conf_acc}}
    return analysis if iteration is None else {**analysis, "checkpoint_iteration": iteration}


def test_the_confidence_rows_of_made_up_records(tmp_path, monkeypatch):
    """load() on made-up records: the warm-up (its last evaluation) as iteration 0, the long run's analyses in the
    order of their iterations (1000 after 200) with the evaluation of the same iteration or none, the 600-iteration
    run's last evaluation; an analysis of another checkpoint than its name says is refused."""
    script = load_script("camvid_confidence")
    short, long = tmp_path / "short", tmp_path / "long"
    short.mkdir()
    long.mkdir()
    monkeypatch.setattr(script, "SHORT", str(short))
    monkeypatch.setattr(script, "LONG", str(long))
    _jsonl(short / "metrics_warmup.jsonl", _evals((400, 0.40), (800, 0.45)))
    _jsonl(short / "metrics_supervised.jsonl", _evals((300, 0.30), (600, 0.35)))
    _jsonl(long / "metrics_long_supervised.jsonl", _evals((200, 0.50), (1000, 0.60)))
    # the model is wrong on 20 % of the pixels; the threshold keeps half of them, 10 % wrong: 5 % of all, 1/4 of the
    # wrong ones; CSL 0.7 accurate against 0.75 for the most confident pixels: -5 points
    (short / "analysis_warmup.json").write_text(json.dumps(_analysis(0.8, (0.5, 0.9), (0.6, 0.7, 0.65), 0.75)))
    (short / "analysis_supervised.json").write_text(json.dumps(_analysis(0.9, (0.5, 0.9), (0.6, 0.7, 0.65), 0.6)))
    (long / "analysis_iter1000.json").write_text(json.dumps(_analysis(0.9, (0.6, 0.95), (0.7, 0.9, 0.8), 0.8, 1000)))
    (long / "analysis_iter200.json").write_text(json.dumps(_analysis(0.85, (0.5, 0.9), (0.6, 0.8, 0.7), 0.7)))
    (long / "analysis_iter600.json").write_text(json.dumps(_analysis(0.88, (0.5, 0.9), (0.6, 0.8, 0.7), 0.7, 600)))
    rows, short_row, curve = script.load()
    assert curve == [(200, 50.0), (1000, 60.0)]
    assert [(r["iter"], r["miou"]) for r in rows] == [(0, 45.0), (200, 50.0), (600, None), (1000, 60.0)]
    assert (short_row["iter"], short_row["miou"]) == (600, 35.0)
    first = rows[0]
    assert abs(first["wrong_kept"] - 25.0) < 1e-9 and abs(first["csl_minus_conf"] - (-5.0)) < 1e-9
    assert (first["model_accuracy"], first["thr_share"], first["thr_accuracy"]) == (80.0, 50.0, 90.0)
    assert abs(rows[-1]["wrong_kept"] - 100 * 0.6 * 0.05 / 0.1) < 1e-9 and abs(rows[-1]["csl_recall"] - 80.0) < 1e-9
    assert "| long supervised, iteration 600 | - |" in script.table(rows, short_row)
    (long / "analysis_iter1400.json").write_text(json.dumps(_analysis(0.9, (0.6, 0.9), (0.7, 0.9, 0.8), 0.8, 1000)))
    with pytest.raises(ValueError, match=r"analysis_iter1400\.json analysed the checkpoint of iteration 1000"):
        script.load()


def test_the_confidence_script_prints_the_documented_tables(kept_figures, capsys):
    """main(): both printed tables are those of docs/results/camvid.md (the continuations start from the last row,
    the iteration-4000 model); the pictures draw the confidently wrong share and each continuation from its start."""
    script = load_script("camvid_confidence")
    script.main()
    printed = capsys.readouterr().out
    with open(os.path.join(ROOT, "docs", "results", "camvid.md")) as f:
        doc = f.read()
    blocks, block = [], []
    for line in printed.splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            blocks, block = blocks + ["\n".join(block)], []
    assert len(blocks) == 2 and all(b in doc for b in blocks)
    rows, _, _ = script.load()
    assert "from the iteration-4000 model (mIoU 59.4)" in blocks[1] and rows[-1]["iter"] == 4000
    long_fig, from4000 = kept_figures
    (wrong,) = long_fig.axes[2].get_lines()
    assert list(wrong.get_ydata()) == [r["wrong_kept"] for r in rows]
    runs = script.load_continuations()
    for line in from4000.axes[0].get_lines()[:-1]:  # the last: the start model's level
        method, seed = next((m, s) for (m, s) in runs if line.get_label() == f"{script.CONTINUATIONS[m]}, seed {s}")
        assert list(line.get_xdata()) == [0] + runs[method, seed]["iters"]
        assert list(line.get_ydata()) == [rows[-1]["miou"]] + runs[method, seed]["miou"]


def test_the_oracle_runs_of_made_up_records(tmp_path, monkeypatch):
    """load(): an oracle run's own records, the continuations recorded beside an earlier run read from that run's
    folder (their BatchNorm re-estimations too), a run whose folder is not there left out."""
    oracle = load_script("camvid_oracle")
    own, earlier = tmp_path / "1_4_seed1_amd_oracle", tmp_path / "1_4_seed1"
    own.mkdir()
    earlier.mkdir()
    monkeypatch.setattr(oracle, "RECORDS", str(tmp_path))
    monkeypatch.setattr(oracle, "RUNS", [("1/8", 0, "", "not_there", {}),
                                         ("1/4", 1, "AMD EPYC", own.name, oracle._earlier(earlier.name))])
    _jsonl(own / "metrics_warmup.jsonl", _evals((800, 0.40)))
    _jsonl(own / "metrics_oracle.jsonl", _evals((100, 0.50), (200, 0.52)))
    (own / "bn_oracle.txt").write_text('{"miou": 0.53}\n')
    _jsonl(own / "metrics_threshold.jsonl", _evals((100, 0.10), (200, 0.10)))  # not this run's: read beside
    _jsonl(earlier / "metrics_threshold.jsonl", _evals((100, 0.45), (200, 0.46)))
    (earlier / "bn_crops_threshold.txt").write_text('{"miou": 0.47}\n')
    _jsonl(earlier / "metrics_csl.jsonl", _evals((100, 0.44)))
    runs = oracle.load()
    assert list(runs) == [("1/4", 1, "AMD EPYC")]
    row = runs["1/4", 1, "AMD EPYC"]
    assert list(row) == ["warmup", "oracle", "threshold", "csl"]
    assert row["oracle"] == {"iters": [100, 200], "miou": [50.0, 52.0], "frames": 53.0, "crops": None}
    assert row["threshold"] == {"iters": [100, 200], "miou": [45.0, 46.0], "frames": None, "crops": 47.0}
    assert row["warmup"]["miou"] == [40.0] and row["csl"]["miou"] == [44.0]


def test_seed0s_stand_in_warmup_is_its_logged_evaluation():
    """Seed 0's oracle warm-up kept no metrics: the mIoU the script uses is the warm-up's evaluation in the
    experiment.log committed beside its other records."""
    oracle = load_script("camvid_oracle")
    with open(os.path.join(ROOT, "docs", "results", "camvid", "seed0_oracle", "experiment.log")) as f:
        log = f.read()
    warmup = log.split("== supervised warm-up")[1].split("\n== ")[0]
    (logged,) = re.findall(r"eval \(original\): mIoU (\d+\.\d+)", warmup)
    assert oracle.WARMUP_MIOU["seed0_oracle"] == float(logged)


def test_the_overview_of_a_run_without_csl_or_threshold(kept_figures, tmp_path):
    """A run whose CSL stage stopped (or without the threshold) is a row with "-" for the missing figures and no
    paired difference; its split's mean difference is "-" as its means are (only over every seed); the picture
    leaves out a run without the threshold. (The table raised KeyError on such a run.)"""
    overview = load_script("camvid_overview")
    finals = {("1/8", 0): {"warmup": 40.0, "supervised": 41.0, "threshold": 42.0, "csl": 43.0},
              ("1/8", 1): {"warmup": 42.0, "supervised": 43.0, "threshold": 44.0},
              ("1/4", 0): {"warmup": 40.0, "supervised": 41.0}}
    assert overview.table(finals).splitlines()[2:] == [
        "| 1/8, seed 0 | 40.0 | 41.0 | 42.0 | 43.0 | - | - | +1.0 |",
        "| 1/8, seed 1 | 42.0 | 43.0 | 44.0 | - | - | - | - |",
        "| 1/4, seed 0 | 40.0 | 41.0 | - | - | - | - | - |",
        "| 1/8, mean | 41.0 | 42.0 | 43.0 | - | - | - | - |",
        "| 1/4, mean | 40.0 | 41.0 | - | - | - | - | - |"]
    overview.picture(finals, str(tmp_path / "overview.png"))
    (fig,) = kept_figures
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "1/4 split, seed 0" not in labels and "1/8 split, seed 1" in labels
