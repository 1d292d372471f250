"""`python -m csl.report` on the committed CamVid records (docs/results/camvid/seed0, seed1): the run folders are
rebuilt from them as `csl demo` and `csl analyze` lay them out, and the report must give the numbers
docs/results/camvid.md states."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from conftest import ROOT, synthetic_analysis

from csl import report

RECORDS = os.path.join(ROOT, "docs", "results", "camvid")


def run_folder(tmp_path, seed: int) -> str:
    """A `csl demo` output folder made of the committed records of ``seed``."""
    src = os.path.join(RECORDS, f"seed{seed}")
    folder = tmp_path / f"seed{seed}"
    folder.mkdir()
    shutil.copy(os.path.join(src, "summary.json"), folder / "summary.json")
    for name in os.listdir(src):
        kind, _, rest = name.partition("_")
        run, ext = os.path.splitext(rest)
        if kind == "metrics" and ext == ".jsonl":
            (folder / run).mkdir(exist_ok=True)
            shutil.copy(os.path.join(src, name), folder / run / "metrics.jsonl")
        elif kind == "analysis" and ext == ".json":
            (folder / "analysis" / run).mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(src, name), folder / "analysis" / run / "analysis.json")
    return str(folder)


def table_row(text: str, label: str) -> list[str]:
    """The cells after ``label`` of the first table row that starts with it."""
    for line in text.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_report_of_two_seeds_gives_the_documented_numbers(tmp_path, capsys):
    folders = [run_folder(tmp_path, 0), run_folder(tmp_path, 1)]
    out = tmp_path / "report"
    assert report.main([*folders, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    pictures = sorted((p.name for p in out.glob("*.png")), key=text.index)  # in the order the report shows them
    assert "miou_by_seed.png" in pictures and "miou_seed0.png" in pictures
    assert f"wrote {out / 'report.md'} and {len(pictures)} picture(s) beside it: {', '.join(pictures)}" in (
        capsys.readouterr().out)
    # Final mIoU per seed and the mean of the two, as in docs/results/camvid.md ("A second seed").
    assert table_row(text, "warm-up (start of every method)")[:2] == ["49.2", "50.1"]
    supervised = table_row(text, report.LABELS["supervised"])
    threshold = table_row(text, report.LABELS["threshold"])
    csl = table_row(text, report.LABELS["csl"])
    assert supervised[:2] == ["50.6", "54.8"] and supervised[2].startswith("52.7")
    assert threshold[:2] == ["47.4", "51.5"] and threshold[2].startswith("49.4")
    assert csl[:2] == ["46.3", "50.3"] and csl[2].startswith("48.3")
    # Runs trained beside the demo's methods (their folders hold only metrics.jsonl) come after them.
    assert table_row(text, report.LABELS["csl_no_tmp"])[:3] == ["46.9", "50.9", "48.9 ± 2.0"]
    assert table_row(text, report.LABELS["confidence_share"])[:2] == ["47.0", "51.2"]
    # The paired differences to the threshold, as camvid.md states them (CSL 1.1 / 1.2 points under it).
    gaps = text[text.index("### Difference to the threshold"):]
    assert table_row(gaps, report.LABELS["csl"]) == ["-1.1", "-1.2", "-1.1 ± 0.0"]
    assert table_row(gaps, report.LABELS["supervised"])[:2] == ["+3.2", "+3.3"]
    assert (out / "miou_by_seed.png").stat().st_size > 10_000 and "](miou_by_seed.png)" in text
    # One summary line per analysed model and seed; CSL's weighted share on seed 0's warm-up model is 77.9 %.
    summary_lines = [line for line in text.splitlines() if re.match(r"\| [01] \| ", line)]
    assert len(summary_lines) == 4 + 5  # seed 0: four analysed models, seed 1: five (also the released rule's run)
    assert any(line.startswith("| 1 | CSL, released code's rule |") for line in summary_lines)
    warmup0 = next(line for line in summary_lines if line.startswith("| 0 | warm-up |"))
    assert "| 77.9 / 95.3 / 84.4 |" in warmup0
    # Pictures per seed, referenced by the Markdown.
    for seed in (0, 1):
        for name in (f"miou_seed{seed}.png", f"pseudo_labels_seed{seed}.png"):
            assert (out / name).stat().st_size > 10_000 and f"]({name})" in text


def test_a_run_beside_the_demo_that_stopped_is_named_not_tabled(tmp_path):
    folder = run_folder(tmp_path, 0)
    with open(os.path.join(folder, "csl_no_tmp", "config.yaml"), "w") as f:
        f.write("train:\n  iters: 1200\n")  # its records end with the evaluation at iteration 600
    run = report.load_run(folder)
    assert run["unfinished"] == {"csl_no_tmp": (600, 1200)} and "csl_no_tmp" not in run["results"]
    assert "confidence_share" in run["results"]  # no config.yaml: taken as finished
    # A run sized in epochs (train.iters null, as the VOC / Cityscapes / COCO configs): epochs x their length.
    with open(os.path.join(folder, "csl_no_tmp", "config.yaml"), "w") as f:
        f.write("train:\n  iters: null\n  epochs: 12\n  iters_per_epoch: 100\n")
    assert report.load_run(folder)["unfinished"] == {"csl_no_tmp": (600, 1200)}
    # Epochs whose length came from the data set (iters_per_epoch null): the total is unknown, so not finished.
    with open(os.path.join(folder, "csl_no_tmp", "config.yaml"), "w") as f:
        f.write("train:\n  iters: null\n  epochs: 80\n  iters_per_epoch: null\n")
    assert report.load_run(folder)["unfinished"] == {"csl_no_tmp": (600, None)}
    # The total that evaluations record now decides over the config.
    metrics = os.path.join(folder, "csl_no_tmp", "metrics.jsonl")
    with open(metrics) as f:
        lines = f.read().splitlines()
    last = max(i for i, line in enumerate(lines) if '"kind": "eval"' in line)
    record = json.loads(lines[last])
    record["total_iters"] = record["iter"]
    with open(metrics, "w") as f:
        f.write("\n".join([*lines[:last], json.dumps(record), *lines[last + 1:]]) + "\n")
    assert report.load_run(folder)["unfinished"] == {} and "csl_no_tmp" in report.load_run(folder)["results"]
    with open(metrics, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "csl_no_tmp", "config.yaml"), "w") as f:
        f.write("train:\n  iters: 1200\n")
    out = tmp_path / "report"
    report.write_report([folder], str(out))
    text = (out / "report.md").read_text()
    assert "`csl_no_tmp` stopped after its evaluation at iteration 600 of 1200" in text
    assert f"| {report.LABELS['csl_no_tmp']} |" not in text


def test_two_folders_of_one_seed_are_refused(tmp_path, capsys):
    first = run_folder(tmp_path, 0)
    second = str(tmp_path / "1_4_seed0")
    shutil.copytree(first, second)
    assert report.main([first, second, "--out", str(tmp_path / "report")]) == 2
    assert "have the same seed 0; the report takes one folder per seed" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_mean_says_over_how_many_seeds():
    assert report._mean_spread([0.5, 0.4, 0.6]) == "50.0 ± 10.0"  # three seeds: the sample sd
    assert report._mean_spread([0.5, 0.4, 0.7]) == "53.3 ± 15.3"
    assert report._mean_spread([0.5, 0.6]) == "55.0 ± 5.0"  # two: half the range
    assert report._mean_spread([0.5, None, 0.6]) == "55.0 ± 7.1 (2 of 3 seeds)"
    assert report._mean_spread([-0.011, None], signed=True) == "-1.1 (1 of 2 seeds)"
    assert report._mean_spread([None, None]) == "-"


def test_report_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "is " + str(tmp_path) + " a `csl demo` output folder?" in capsys.readouterr().err


def test_per_class_table_uses_the_analysis_class_names(tmp_path):
    run = report.load_run(run_folder(tmp_path, 1))
    table = report.per_class_table(run)
    assert table.splitlines()[2].startswith("| sky |")
    assert table_row(table, "**mIoU**")[0] == "**50.1**"  # the warm-up column comes first
    with open(os.path.join(RECORDS, "seed1", "analysis_warmup.json")) as f:
        assert len(table.splitlines()) == 2 + len(json.load(f)["class_names"]) + 1


@pytest.mark.parametrize("seeds", [(0,), (1,)])
def test_one_seed_has_no_mean_column(tmp_path, seeds):
    runs = [report.load_run(run_folder(tmp_path, s)) for s in seeds]
    head = report.results_table(runs).splitlines()[0]
    assert "mean" not in head and f"mIoU seed {seeds[0]} (%)" in head


def test_miou_panels_one_per_schedule(tmp_path):
    """The mIoU curves of two run folders side by side (how camvid.md compares schedules)."""
    from csl.plots import plot_miou_panels

    panels = {}
    for seed in (0, 1):
        run = report.load_run(run_folder(tmp_path, seed))
        panels[f"seed {seed}"] = {report.LABELS[m]: run["metrics"][m]["eval"] for m in run["methods"]}
    out = plot_miou_panels(panels, str(tmp_path / "pictures" / "miou.png"))
    assert os.path.getsize(out) > 10_000


def test_a_method_has_one_colour_in_every_picture(tmp_path, kept_figures):
    """Colours follow the method, not the order a picture draws it in: threshold orange, CSL blue (Okabe-Ito, safe
    for colour-blind readers) in the mIoU curves and the pseudo-label curves alike, whatever else is drawn."""
    from matplotlib.colors import to_hex

    from csl import plots

    run = report.load_run(run_folder(tmp_path, 0))
    evals = {report.LABELS[m]: run["metrics"][m]["eval"] for m in run["methods"]}
    pseudo = {report.LABELS[m]: run["metrics"][m]["pseudo_labels"] for m in run["methods"]
              if run["metrics"][m]["pseudo_labels"]}
    plots.plot_miou_curves(dict(reversed(list(evals.items()))), "miou.png")  # drawn in the other order
    plots.plot_pseudo_label_curves(pseudo, "pseudo.png")
    plots.plot_miou_panels({"a": {report.LABELS["csl"]: evals[report.LABELS["csl"]]}, "b": evals}, "panels.png")
    expected = {report.LABELS["threshold"]: "#e69f00", report.LABELS["csl"]: "#0072b2"}
    seen = {}
    for fig in kept_figures:
        for ax in fig.axes:
            for line in ax.get_lines():
                if line.get_label() in expected:
                    seen.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    assert seen == {label: {colour} for label, colour in expected.items()}
    assert len(set(plots.method_colours(list(evals)).values())) == len(evals)  # no two methods share one


def test_unevaluated_beside_runs_and_analyses_of_other_checkpoints_are_named(tmp_path):
    folder = run_folder(tmp_path, 0)
    os.makedirs(os.path.join(folder, "csl_alpha64"))
    with open(os.path.join(folder, "csl_alpha64", "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"kind": "train", "iter": 20, "loss": 0.5}) + "\n")  # stopped before any evaluation
    with open(os.path.join(folder, "csl_alpha64", "config.yaml"), "w") as f:
        f.write("train:\n  iters: 600\n")
    analysis = os.path.join(folder, "analysis", "csl", "analysis.json")
    with open(analysis) as f:
        a = json.load(f)
    a.update(checkpoint="/runs/seed0/csl/best.pt", checkpoint_iteration=400)  # not the final model (600)
    with open(analysis, "w") as f:
        json.dump(a, f)
    run = report.load_run(folder)
    assert run["unfinished"]["csl_alpha64"] == (None, 600)
    out = tmp_path / "report"
    report.write_report([folder], str(out))
    text = (out / "report.md").read_text()
    assert "`csl_alpha64` stopped before its first evaluation; it is not in the tables" in text
    assert "the analysis of `csl` is of `best.pt` at iteration 400, not of the final model (iteration 600)" in text


def test_the_warmup_row_gives_its_best_evaluation(tmp_path):
    folder = run_folder(tmp_path, 0)
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    summary["warmup"]["best_miou"] = 0.55  # a warm-up whose last evaluation was not its best
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    text = report.results_table([report.load_run(folder)])
    assert table_row(text, "warm-up (start of every method)")[:2] == ["49.2", "55.0"]


def test_records_cut_by_a_crash_are_named_and_the_final_model_stays_the_summarys(tmp_path, capsys, caplog):
    """A metrics.jsonl whose last evaluation was torn: the per-class table keeps the final model of summary.json, a
    note says where the records end, the torn line is warned about once; unreadable JSON files are named."""
    folder = run_folder(tmp_path, 0)
    metrics = os.path.join(folder, "csl", "metrics.jsonl")
    with open(metrics) as f:
        text = f.read()
    with open(metrics, "w") as f:
        f.write(text[:-40])  # the final evaluation record cut mid-line
    out = tmp_path / "report"
    assert report.main([folder, "--out", str(out)]) == 0
    assert caplog.text.count("is not a JSON record") == 1
    md = (out / "report.md").read_text()
    assert "`csl/metrics.jsonl` ends at the evaluation of iteration 500; the final model's (iteration 600)" in md
    assert table_row(report.per_class_table(report.load_run(folder)), "**mIoU**")[3] == "**46.3**"  # csl, final
    assert "not of the final model" not in md  # its analysis is of iteration 600, the final model
    # A method's records gone (deleted, or not copied with the folder): said, not silently left out of the pictures
    os.remove(metrics)
    assert report.main([folder, "--out", str(out), "--overwrite"]) == 0
    md = (out / "report.md").read_text()
    assert "`csl/metrics.jsonl` is missing: its curves are not drawn; its figures in the tables are summary.json's" \
        in md
    with open(metrics, "w"):  # emptied
        pass
    assert report.main([folder, "--out", str(out), "--overwrite"]) == 0
    md = (out / "report.md").read_text()
    assert "`csl/metrics.jsonl` holds no evaluation record: its mIoU curve is not drawn" in md
    summary = os.path.join(folder, "summary.json")
    with open(summary) as f:
        text = f.read()
    for content, message in ((text[:300], f"{summary} is not readable JSON"),
                             ("[]", f"{summary} holds a JSON list, expected an object"),
                             ('{"results": {}}', f"{summary} has no 'results' and 'config' objects")):
        with open(summary, "w") as f:
            f.write(content)
        assert report.main([folder, "--out", str(out), "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert report.main([folder, "--out", str(tmp_path / "a_file")]) == 2
    assert "--out " + str(tmp_path / "a_file") + " is a file; give a folder" in capsys.readouterr().err


def test_an_analysis_older_than_its_checkpoint_is_named(tmp_path):
    """A stage trained again after its analysis (csl demo --fresh, csl train --overwrite keep analysis/): the
    analysis describes the replaced model, and at the same iteration nothing else in the report tells it apart."""
    folder = run_folder(tmp_path, 0)
    checkpoint = tmp_path / "csl_latest.pt"
    checkpoint.write_bytes(b"the retrained model")
    analysis = os.path.join(folder, "analysis", "csl", "analysis.json")
    with open(analysis) as f:
        a = json.load(f)
    a.update(checkpoint=str(checkpoint), checkpoint_iteration=600)  # the final model's iteration
    with open(analysis, "w") as f:
        json.dump(a, f)
    os.utime(analysis, (1_000_000, 1_000_000))
    os.utime(checkpoint, (2_000_000, 2_000_000))  # trained after the analysis was written
    out = tmp_path / "report"
    report.write_report([folder], str(out))
    said = f"the analysis of `csl` was written before its checkpoint `{checkpoint}`, which was trained again since"
    assert said in (out / "report.md").read_text()
    os.utime(checkpoint, (500_000, 500_000))  # analysed after its training: no note
    report.write_report([folder], str(out), overwrite=True)
    assert "was written before its checkpoint" not in (out / "report.md").read_text()


def test_a_report_written_again_leaves_no_picture_of_the_earlier_one(tmp_path, capsys):
    folders = [run_folder(tmp_path, 0), run_folder(tmp_path, 1)]
    out = tmp_path / "report"
    assert report.main([*folders, "--out", str(out)]) == 0
    assert {"miou_by_seed.png", "miou_seed0.png", "miou_seed1.png"} <= set(os.listdir(out))
    (out / "notes.txt").write_text("mine")
    assert report.main([folders[0], "--out", str(out)]) == 2
    assert f"--out {out} already holds a report (report.md); replace it with --overwrite" in capsys.readouterr().err
    assert report.main([folders[0], "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["miou_seed0.png", "notes.txt", "pseudo_labels_seed0.png", "report.md"]


def test_an_evaluation_without_a_defined_miou_is_a_gap(tmp_path):
    """A validation set without a labelled pixel gives ``miou: null`` records (the trainer writes them so): the
    best mIoU is over the defined ones, and the curves and the seed picture draw a gap."""
    from csl.plots import plot_miou_by_seed, plot_miou_panels

    folder = run_folder(tmp_path, 0)
    method = report.load_run(folder)["methods"][0]
    path = os.path.join(folder, method, "metrics.jsonl")
    records = [json.loads(line) for line in open(path)]
    first_eval = next(r for r in records if r.get("kind") == "eval")
    records.insert(records.index(first_eval), {**first_eval, "iter": first_eval["iter"] - 1, "miou": None})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    run = report.load_run(folder)
    evals = run["metrics"][method]["eval"]
    assert evals[0]["miou"] is None
    assert run["results"][method]["best_miou"] == max(e["miou"] for e in evals[1:])
    curves = plot_miou_panels({"seed 0": {method: evals}}, str(tmp_path / "curves.png"))
    seeds = plot_miou_by_seed({"a": {0: None, 1: 0.4}, "b": {0: 0.3, 1: 0.5}}, str(tmp_path / "seeds.png"))
    assert os.path.getsize(curves) > 1000 and os.path.getsize(seeds) > 1000


def test_an_analysis_of_the_validation_images_is_labelled_with_its_run(tmp_path):
    """`csl analyze --split val` writes analysis/<run>_val: its rows name the run's method and the images, and its
    checkpoint is compared with that run's final model."""
    folder = run_folder(tmp_path, 0)
    with open(os.path.join(folder, "analysis", "threshold", "analysis.json")) as f:
        a = json.load(f)
    a.update(split="val", checkpoint="/runs/seed0/threshold/best.pt", checkpoint_iteration=400)
    os.makedirs(os.path.join(folder, "analysis", "threshold_val"))
    with open(os.path.join(folder, "analysis", "threshold_val", "analysis.json"), "w") as f:
        json.dump(a, f)
    out = tmp_path / "report"
    report.write_report([folder], str(out))
    text = (out / "report.md").read_text()
    label = report.LABELS["threshold"]
    assert table_row(text, "0")  # the summary table has rows of seed 0
    rows = [line for line in text.splitlines() if line.startswith(f"| 0 | {label}")]
    assert [row.split("|")[2].strip() for row in rows] == [label, f"{label}, val images"], rows
    assert f"val images, model: {label}\n" in text and "| threshold_val |" not in text
    assert "the analysis of `threshold_val` is of `best.pt` at iteration 400, not of the final model" in text


def _synthetic_run() -> dict:
    """A run dict as load_run returns it, with numbers that tell every column apart."""
    final = {"iter": 10, "miou": 0.5, "iou": [0.11, 0.22, 0.33]}
    pl = {"kind": "pseudo_labels", "iter": 10, "mask_ratio": 0.9, "sampling_rate": 0.41, "accuracy": 0.82,
          "recall": 0.63, "weighted_share": 0.54, "weighted_accuracy": 0.75, "weighted_recall": 0.36}
    return {"summary": {"results": {"csl": {"miou": 0.5, "iou": final["iou"], "iters": 10}},
                        "config": {"seed": 0}},
            "methods": ["csl"], "results": {"csl": {"miou": 0.5}}, "analyses": {},
            "metrics": {"csl": {"eval": [final], "pseudo_labels": [pl]}}}


def test_per_class_table_gives_each_class_its_own_iou():
    table = report.per_class_table(_synthetic_run())
    assert [table_row(table, f"class {k}")[0] for k in range(3)] == ["11.0", "22.0", "33.0"]


def test_per_class_table_names_the_datasets_classes_without_an_analysis():
    """As csl eval names them: the demo's summary.json stores the run's config, whose dataset has class names (the
    synthetic scenes' shapes); they were "class 0", "class 1", ... unless an analysis was there to take them from."""
    run = _synthetic_run()
    run["summary"]["config"]["data"] = {"dataset": "synthetic", "num_classes": 3}
    table = report.per_class_table(run)
    assert [table_row(table, name)[0] for name in ("background", "disk", "rectangle")] == ["11.0", "22.0", "33.0"]
    run["summary"]["config"]["data"] = {"dataset": "folder", "num_classes": 3}  # a dataset without names
    assert table_row(report.per_class_table(run), "class 2")[0] == "33.0"


def test_training_pseudo_label_table_columns_are_share_accuracy_recall():
    table = report.training_pl_table(_synthetic_run())
    row = table_row(table, report.LABELS["csl"])
    assert row == ["10", "90.0", "41.0 / 82.0 / 63.0", "54.0 / 75.0 / 36.0"]


def _run_of_seed(seed: int, results: dict, warmup: dict | None = None) -> dict:
    """A run dict as load_run returns it, for the tables that read only its seed and results."""
    return {"summary": {"config": {"seed": seed}, "results": results, "warmup": warmup}, "methods": list(results),
            "results": results, "analyses": {}, "metrics": {}, "unfinished": {}}


def test_gaps_table_leaves_out_the_reference_and_subtracts_it_seed_by_seed():
    """Each other method's final mIoU minus the threshold's of the same seed, in points; no row for the threshold
    itself (its difference to itself says nothing)."""
    runs = [_run_of_seed(0, {"threshold": {"miou": 0.40}, "csl": {"miou": 0.43}}),
            _run_of_seed(1, {"threshold": {"miou": 0.50}, "csl": {"miou": 0.49}})]
    table = report.gaps_table(runs)
    assert table_row(table, report.LABELS["csl"]) == ["+3.0", "-1.0", "+1.0 ± 2.0"]
    assert f"| {report.LABELS['threshold']} |" not in table
    assert len(table.splitlines()) == 2 + 1
    # a gap that rounds to zero is no loss: "0.0", never "-0.0"
    even = [_run_of_seed(0, {"threshold": {"miou": 0.4004}, "csl": {"miou": 0.4}}),
            _run_of_seed(1, {"threshold": {"miou": 0.5}, "csl": {"miou": 0.4998}})]
    assert table_row(report.gaps_table(even), report.LABELS["csl"]) == ["0.0", "0.0", "0.0 ± 0.0"]


def test_results_table_gives_each_methods_best_miou_and_time():
    """After the final mIoU of each seed: the best evaluation's mIoU and the training seconds of each seed."""
    runs = [_run_of_seed(0, {"csl": {"miou": 0.50, "best_miou": 0.55, "seconds": 120.4}}),
            _run_of_seed(1, {"csl": {"miou": 0.52, "best_miou": 0.61, "seconds": 99.6}})]
    row = table_row(report.results_table(runs), report.LABELS["csl"])
    assert row == ["50.0", "52.0", "51.0 ± 1.0", "55.0 / 61.0", "120 / 100"]


def test_per_class_table_of_a_run_beside_the_demo_is_its_last_evaluation():
    """A run trained beside the demo's methods has no summary.json result: its final model is its last evaluation
    record, not its first."""
    run = _synthetic_run()
    run["methods"].append("csl_no_tmp")
    run["metrics"]["csl_no_tmp"] = {"eval": [{"iter": 5, "miou": 0.2, "iou": [0.1, 0.2, 0.3]},
                                             {"iter": 10, "miou": 0.4, "iou": [0.3, 0.4, 0.5]}], "pseudo_labels": []}
    table = report.per_class_table(run)
    assert table_row(table, "class 0") == ["11.0", "30.0"] and table_row(table, "**mIoU**") == ["**50.0**", "**40.0**"]


def test_selection_table_rows_give_each_rules_share_accuracy_recall():
    """Every rule of an analysis in its own row, its share, accuracy and recall in that column order."""
    table = report.selection_table(synthetic_analysis())
    assert table.splitlines()[0] == "| rule | share (%) | accuracy (%) | recall (%) |"
    assert table_row(table, "confidence >= 0.9") == ["71.0", "72.0", "73.0"]
    assert table_row(table, "**confidence >= 0.95**") == ["**61.0**", "**62.0**", "**63.0**"]  # the baseline
    assert table_row(table, "**CSL per image, reliable (w = 1)**") == ["**51.0**", "**52.0**", "**53.0**"]
    assert table_row(table, "**CSL per image, weighted**") == ["**41.0**", "**42.0**", "**43.0**"]
    assert table_row(table, "CSL per class, reliable") == ["31.0", "32.0", "33.0"]
    assert table_row(table, "CSL per class, weighted") == ["21.0", "22.0", "23.0"]
    assert table_row(table, "CSL, released code's rule, reliable") == ["11.0", "12.0", "13.0"]
    assert table_row(table, "CSL, released code's rule, weighted") == ["14.0", "15.0", "16.0"]
    assert table_row(table, "confidence, best pixels at the released rule's weighted share") == ["17.0", "18.0",
                                                                                                  "19.0"]
    assert table_row(table, "entropy, best pixels at CSL's weighted share (all images pooled)") == ["41.0", "83.0",
                                                                                                     "84.0"]
    assert table_row(table, "confidence, best pixels of each image at its CSL amount") == ["41.0", "85.0", "86.0"]
    assert table_row(table, "all pixels") == ["100.0", "90.0", "100.0"]


def test_selection_summary_row_gives_threshold_csl_and_the_confidence_cuts_in_order():
    """One line per analysed model: pixel accuracy, the 0.95 threshold, CSL reliable, CSL weighted (share /
    accuracy / recall), then the confidence cut at CSL's share pooled and per image (accuracy / recall)."""
    run = _run_of_seed(3, {})
    run["analyses"] = {"csl": synthetic_analysis()}
    table = report.selection_summary_table([run])
    row = table_row(table, "3")
    assert row == [report.LABELS["csl"], "90.0", "61.0 / 62.0 / 63.0", "51.0 / 52.0 / 53.0", "41.0 / 42.0 / 43.0",
                   "81.0 / 82.0", "85.0 / 86.0"]


def _draw_no_seed_or_curve_pictures(monkeypatch) -> None:
    """The report's seed and curve pictures not drawn (tests of its text)."""
    from csl import plots

    for name in ("plot_miou_by_seed", "plot_miou_curves", "plot_pseudo_label_curves"):
        monkeypatch.setattr(plots, name, lambda data, path: path)


def test_whole_records_and_an_analysis_of_the_final_model_get_no_note(tmp_path, monkeypatch):
    """The notes on records cut short and on analyses of another checkpoint appear only when that is so: not for
    metrics that reach the final model, nor for an analysis whose checkpoint is of the final iteration. The note
    summary.json keeps (what was trained, how) is given under its seed."""
    _draw_no_seed_or_curve_pictures(monkeypatch)
    folder = run_folder(tmp_path, 0)
    analysis = os.path.join(folder, "analysis", "csl", "analysis.json")
    with open(analysis) as f:
        a = json.load(f)
    a.update(checkpoint="/runs/seed0/csl/latest.pt", checkpoint_iteration=600)  # the final model (iteration 600)
    with open(analysis, "w") as f:
        json.dump(a, f)
    report.write_report([folder], str(tmp_path / "report"))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "metrics.jsonl` ends at the evaluation" not in text and "not of the final model" not in text
    with open(os.path.join(folder, "summary.json")) as f:
        assert f"Seed 0: {json.load(f)['note']}\n" in text


def test_the_differences_to_the_threshold_are_given_when_one_seed_lacks_it(tmp_path, monkeypatch):
    """A seed without a threshold run still gets the table of differences: "-" for that seed, the other seed's
    difference given."""
    _draw_no_seed_or_curve_pictures(monkeypatch)
    folders = [run_folder(tmp_path, 0), run_folder(tmp_path, 1)]
    summary = os.path.join(folders[1], "summary.json")
    with open(summary) as f:
        s = json.load(f)
    del s["results"]["threshold"]
    with open(summary, "w") as f:
        json.dump(s, f)
    shutil.rmtree(os.path.join(folders[1], "threshold"))
    report.write_report(folders, str(tmp_path / "report"))
    text = (tmp_path / "report" / "report.md").read_text()
    gaps = text[text.index("### Difference to the threshold"):]
    assert table_row(gaps, report.LABELS["csl"])[:2] == ["-1.1", "-"]


def test_the_seed_picture_draws_each_methods_final_miou_and_the_warmup(tmp_path, monkeypatch):
    """miou_by_seed.png is given every seed's final mIoU (not the best evaluation) per method, the warm-up first."""
    from csl import plots

    drawn = {}
    monkeypatch.setattr(plots, "plot_miou_by_seed", lambda finals, path: drawn.update(finals) or path)
    folders = [run_folder(tmp_path, 0), run_folder(tmp_path, 1)]
    report.write_report(folders, str(tmp_path / "report"))
    runs = [report.load_run(f) for f in folders]
    assert list(drawn)[0] == "warm-up"
    assert drawn["warm-up"] == {r["summary"]["config"]["seed"]: r["summary"]["warmup"]["miou"] for r in runs}
    for m in ("supervised", "threshold", "csl"):  # seed 0's supervised and CSL runs ended below their best
        assert drawn[report.LABELS[m]] == {r["summary"]["config"]["seed"]: r["results"][m]["miou"] for r in runs}


def test_a_run_record_without_a_field_the_report_reads_is_named(tmp_path, capsys):
    """A summary.json without a field the report reads (here the config's seed): exit 2 naming the field, no
    traceback."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"results": {}, "config": {}}))
    assert report.main([str(folder), "--out", str(tmp_path / "report")]) == 2
    assert "csl report: error: a run record lacks the field 'seed' (is every folder a finished `csl demo` output?)" \
        in capsys.readouterr().err
