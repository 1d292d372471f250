"""CI smoke test of the benchmarks: the whole suite on one tiny CPU shape (no timing assertions), the JSON layout,
and the official-style selection against the reference backend."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import required_backends, skip_or_fail

import csl_kernels
from csl_bench.__main__ import main as bench_main
from csl_bench.official import official_pcos, official_trusted_mask, unimatch_weighted_cross_entropy
from csl_bench.settings import PROVIDERS

OPS = ("residual_features", "pcos_weights", "trusted_mask", "weighted_cross_entropy")


def separated_logits(batch: int = 3, classes: int = 7, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Two well-separated populations per image: confident pixels (margin ~9) and ambiguous ones (margin ~1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, size, size, generator=g) * 0.5
    label = torch.randint(0, classes, (batch, 1, size, size), generator=g)
    margin = torch.where(torch.rand(batch, 1, size, size, generator=g) < 0.6, 9.0, 1.0)
    margin = margin + 0.5 * torch.rand(batch, 1, size, size, generator=g)
    return logits.scatter_add_(1, label, margin)


@pytest.mark.parametrize("with_ignore", [False, True])
def test_official_matches_reference(with_ignore):
    logits = separated_logits()
    ignore = None
    if with_ignore:
        ignore = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.int64)
        ignore[:, :, 30:] = csl_kernels.IGNORE_INDEX
        ignore[2] = csl_kernels.IGNORE_INDEX  # one image with no valid pixel at all
    weight, label, reliable = official_pcos(logits, ignore, alpha=8.0)
    ref = csl_kernels.pcos_weights(logits, ignore, alpha=8.0, backend="reference")
    valid = torch.ones_like(ref.reliable) if ignore is None else ignore != csl_kernels.IGNORE_INDEX
    # The input is not degenerate: soft weights strictly between 0 and 1 and preserved ones both occur.
    soft = (ref.weight > 0.01) & (ref.weight < 0.99)
    assert soft.sum() > 50 and ref.reliable.sum() > 50
    torch.testing.assert_close(weight, ref.weight, atol=2e-5, rtol=0)
    assert torch.equal(label[valid], ref.label[valid])
    assert torch.equal(reliable, ref.reliable)
    if with_ignore:
        assert weight[~valid].abs().max() == 0


def test_official_takes_an_image_with_one_valid_pixel():
    """One valid pixel gives a 2 x 1 feature matrix with a single singular value: rank one, cluster 0 (spec Sec. 2)."""
    logits = separated_logits(batch=2, classes=5, size=9)
    ignore = torch.full((2, 9, 9), csl_kernels.IGNORE_INDEX, dtype=torch.int64)
    ignore[0, 4, 5] = 0
    ignore[1, :, :4] = 0
    weight, label, reliable = official_pcos(logits, ignore)
    ref = csl_kernels.pcos_weights(logits, ignore, backend="reference")
    assert weight[0, 4, 5] == 1 and reliable[0].sum() == 1
    torch.testing.assert_close(weight, ref.weight, atol=2e-5, rtol=0)
    assert torch.equal(reliable, ref.reliable)


def assert_official_mask_is_the_references(images, reliable, block: int, seed: int) -> None:
    """The official-style TMP and the reference backend, drawing from generators seeded alike: the same cover (some
    pixels, not all) and the same masked images."""
    masked, cover = official_trusted_mask(images, reliable, block=block, rate=0.5,
                                          generator=torch.Generator().manual_seed(seed))
    ref_masked, ref_cover = csl_kernels.trusted_mask(images, reliable, block=block, rate=0.5,
                                                     generator=torch.Generator().manual_seed(seed), backend="reference")
    assert cover.any() and not cover.all()
    assert torch.equal(cover, ref_cover) and torch.equal(masked, ref_masked)


@pytest.mark.parametrize("size", [(122, 64), (37, 305)])
def test_official_mask_cells_are_the_specs_at_sizes_where_float_nearest_is_off(size):
    """At H = 122 with 32-pixel blocks, F.interpolate's float32 nearest puts row 61 in cell 1 where y * gh // H = 0."""
    assert_official_mask_is_the_references(torch.randn(2, 3, *size), torch.ones(2, *size, dtype=torch.bool), 32, 5)


def test_official_mask_and_loss_match_reference():
    logits = separated_logits(batch=2, classes=5, size=37)
    images = torch.randn(2, 3, 37, 37)
    assert_official_mask_is_the_references(images, torch.softmax(logits, 1).amax(1) > 0.9, 8, 3)

    label = logits.argmax(1)
    weight = torch.rand(2, 37, 37, generator=torch.Generator().manual_seed(4))
    ignore = torch.zeros(2, 37, 37, dtype=torch.int64)
    ignore[1, :10] = csl_kernels.IGNORE_INDEX
    weight = torch.where(ignore != csl_kernels.IGNORE_INDEX, weight, 0.0)
    loss = unimatch_weighted_cross_entropy(logits, label, weight, ignore)
    ref = csl_kernels.weighted_cross_entropy(logits, label, weight, ignore, backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)


def test_bench_smoke_suite_json(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    payload = bench_main(["--smoke", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["records"] == json.loads(json.dumps(payload["records"], default=str))
    env = data["environment"]
    for key in ("device_name", "torch", "triton", "cuda_runtime", "git_commit", "cpu_count", "date"):
        assert key in env
    assert env["device"] == "cpu" and env["cpu_count"] >= 1
    assert data["copy_bandwidth"]["gbps"] > 0
    # How the Triton kernels were launched: the autotune mode the suite set; nothing is timed on CPU tensors.
    assert data["triton_tuning"]["autotune"] == os.environ["CSL_TRITON_AUTOTUNE"]
    assert data["triton_tuning"]["chosen"] == {} and data["triton_tuning"]["cache"].endswith(".json")

    records = data["records"]
    # Every op lists every provider exactly once (unavailable ones with their reason), none failed.
    assert sorted((r["op"], r["provider"]) for r in records) == sorted((o, p) for o in OPS for p in PROVIDERS)
    for r in records:
        assert r["status"] in ("ok", "unavailable"), (r["op"], r["provider"], r.get("reason"))
        assert r["shape"] == "smoke" and r["dims"] == {"B": 2, "C": 5, "H": 17, "W": 19}
        if r["status"] == "unavailable":
            assert isinstance(r["reason"], str) and r["reason"]
            continue
        t = r["time_ms"]
        assert t["q20"] <= t["median"] <= t["q80"] and t["reps"] >= 1
        assert r["gbps"] > 0 and r["floor_bytes"] > 0 and "pct_copy_bw" in r and "x_official" in r
        assert "vs_eager" in r
    by = {(r["op"], r["provider"]): r for r in records}
    for op in OPS:
        assert by[(op, "official")]["status"] == "ok" and by[(op, "eager")]["status"] == "ok"
        assert by[(op, "compile")]["status"] == "unavailable"  # skipped in smoke mode, with the reason
    assert by[("pcos_weights", "cuda")]["reason"]  # no CUDA here: listed, not dropped
    # A required backend that runs on CPU tensors was benchmarked, not listed away (Triton only under its interpreter).
    on_cpu = required_backends() - {"cuda"} - ({"triton"} if os.environ.get("TRITON_INTERPRET") != "1" else set())
    for provider in sorted(on_cpu):
        for op in OPS:
            assert by[(op, provider)]["status"] == "ok", (op, provider, by[(op, provider)].get("reason"))
    # The official selection agrees with the reference on the smoke input, and so does every fused backend.
    for r in records:
        if r["op"] == "pcos_weights" and r["status"] == "ok":
            assert r["vs_eager"]["max_abs_weight"] < 1e-3, r["provider"]
            assert r["vs_eager"]["label_mismatch"] == 0, r["provider"]

    train = data["train_step"]
    assert {r["selection"] for r in train} >= {"official", "eager", "cpu"}
    for r in train:
        assert r["status"] in ("ok", "unavailable"), (r["selection"], r.get("reason"))
        if r["status"] == "ok":
            assert r["step_ms"]["median"] > 0 and 0 <= r["csl_share_pct"] <= 100
            assert set(r["csl_parts_ms"]) == {"select", "mask", "loss", "loss_backward"}
    assert {r["selection"]: r["status"] for r in train}["official"] == "ok"
    for g in data["goals"]:
        assert set(g) >= {"goal", "where", "measured", "target", "met"}
    printed = capsys.readouterr().out
    assert "| pcos_weights | smoke | fp32 | official |" in printed and "| goal |" in printed

    merged = bench_main(["--merge", str(out), "--out", str(tmp_path / "merged.json")])
    assert len(merged["records"]) == len(records) and len(merged["train_step"]) == len(train)
    assert json.loads((tmp_path / "merged.json").read_text())["merged_from"] == [str(out)]


def test_train_step_loss_backward_region_brackets_only_the_loss():
    """The benchmark's backward region of each weighted loss opens right before the loss's own backward and closes
    right after it, with no network backward in between (recorded order, not timing)."""
    from csl.losses import CrossEntropy
    from csl.step import KernelOps, StepConfig, train_step
    from csl.trainer import build_scheduler
    from csl_bench import bench_train_step as bts

    events: list[str] = []

    class RecordingTimer(bts.RegionTimer):
        def open(self, key):
            events.append(f"open{key}")
            super().open(key)

        def close(self, key, name):
            events.append(f"close{key}")
            super().close(key, name)

    class LoggedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, loss):
            return loss.view_as(loss)

        @staticmethod
        def backward(ctx, grad):
            events.append("loss")
            return grad

    class RecordingOps(KernelOps):
        def loss(self, logits, label, weight, ignore):
            return LoggedLoss.apply(super().loss(logits, label, weight, ignore))

    device = torch.device("cpu")
    cfg = bts.CONFIGS["smoke"]
    torch.manual_seed(0)
    model = bts.build_model({"backbone": "resnet18", "output_stride": 16, "dilations": [6, 12, 18]}, cfg.classes)
    for p in model.parameters():
        p.register_hook(lambda g: events.append("param"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    timer = RecordingTimer(device)
    train_step(model, optimizer, build_scheduler(optimizer, 10), torch.amp.GradScaler("cpu", enabled=False),
               *bts.make_batches(cfg, device), selector=bts.Selector(backend="reference"), criterion=CrossEntropy(),
               cfg=StepConfig(backend="reference"), generator=torch.Generator().manual_seed(0),
               ops=bts.TimedOps(RecordingOps("reference"), timer), region=timer)
    parts = timer.totals_ms()
    assert set(parts) == {"select", "mask", "loss", "loss_backward"} and all(v >= 0 for v in parts.values())
    marks = [e for e in events if e != "param"]
    assert sorted(marks) == sorted(["open1", "open2", "open3", "close1", "close2", "close3", "loss", "loss", "loss"])
    for key in (1, 2, 3):
        begin, end = events.index(f"open{key}"), events.index(f"close{key}")
        assert end - begin == 2 and events[begin + 1] == "loss", events[begin:end + 1]
    assert "param" in events


def test_bench_host_overhead_table_and_json(tmp_path, capsys):
    """Every row of the host-side benchmark is measured (triton with stubbed launches counts its launches), printed
    and written; no timing is asserted."""
    from csl_bench.bench_host_overhead import main as host_main
    from csl_kernels.triton import compile_check

    problem = compile_check.interpreter_problem()
    if problem:  # e.g. Triton 3.6 with NumPy 2.4 on a GPU machine (CI has Triton 3.8)
        skip_or_fail("triton", f"the triton rows need Triton's interpreter: {problem}", interpreter_only=True)
    out = tmp_path / "host.json"
    payload = host_main(["--calls", "20", "--repeats", "2", "--out", str(out)])
    rows = {(r["op"], r["provider"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows == {(r["op"], r["provider"]): r for r in payload["rows"]}
    for provider in ("triton", "cpu"):
        for op in ("pcos_weights", "weighted_cross_entropy fwd+bwd", "weighted_cross_entropy fwd (no grad)"):
            assert rows[(op, provider)]["us_min"] > 0, (op, provider)
    assert rows[("pcos_weights", "triton")]["launches_per_call"] == 5
    assert rows[("weighted_cross_entropy fwd+bwd", "triton")]["launches_per_call"] == 3
    assert rows[("weighted_cross_entropy forward launcher alone", "triton")]["launches_per_call"] == 2
    assert rows[("weighted_cross_entropy backward launcher alone", "triton")]["launches_per_call"] == 1
    assert rows[("F.cross_entropy fwd+bwd", "torch")]["us_min"] > 0
    assert rows[("empty autograd.Function fwd+bwd", "torch")]["us_min"] > 0
    for provider in ("triton", "cpu"):  # the op's own share of a backward() that starts the engine anyway
        beyond = rows[("weighted_cross_entropy fwd+bwd beyond an empty autograd.Function", provider)]
        whole = rows[("weighted_cross_entropy fwd+bwd", provider)]
        # min over rounds of (CE - empty) is below the CE's own round there, so below the CE's minimum
        assert beyond["us_min"] < whole["us_min"]
        assert beyond["launches_per_call"] == whole["launches_per_call"]
    assert "| pcos_weights | triton |" in capsys.readouterr().out


def test_bench_host_overhead_empty_launch_row():
    """The row that times Triton's own launcher (measured on a GPU by gpu_check.sh) launches its kernel: here under
    the interpreter, where the empty kernel runs."""
    from csl_bench.bench_host_overhead import empty_launch_row
    from csl_kernels.triton import compile_check

    if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors reach the kernel only under the interpreter
        pytest.skip("needs TRITON_INTERPRET=1 in this process (the GPU row is measured by gpu_check.sh)")
    problem = compile_check.interpreter_problem()
    if problem:
        skip_or_fail("triton", f"needs Triton's interpreter: {problem}", interpreter_only=True)
    row = empty_launch_row("cpu", calls=5, repeats=2)
    assert row["provider"] == "triton (interpreter)" and row["launches_per_call"] == 1
    assert 0 < row["us_min"] <= row["us_median"]


def test_a_failed_provider_fails_the_command(capsys):
    """A provider that raised keeps its row (status error, with the reason) and makes the command exit 1, so that
    scripts/gpu_check.sh's stage says it; a provider that cannot run here does not."""
    from csl_bench.runner import exit_status

    row = {"op": "pcos_weights", "shape": "voc321", "dtype": "bf16"}
    unavailable = dict(row, provider="cuda", status="unavailable", reason="no CUDA device")
    assert exit_status({"records": [dict(row, provider="cpu", status="ok"), unavailable]}) == 0
    failed = dict(row, provider="triton", status="error", reason="RuntimeError: illegal memory access")
    assert exit_status({"records": [unavailable, failed]}) == 1
    assert "error: pcos_weights voc321 bf16 triton: RuntimeError: illegal memory access" in capsys.readouterr().err


def _record(op, provider, median, status="ok"):
    r = {"op": op, "shape": "voc321", "dtype": "bf16", "provider": provider, "status": status}
    if status == "ok":
        r["time_ms"] = {"median": median, "q20": median, "q80": median, "reps": 3}
        r["memory"] = {}
    else:
        r["reason"] = "not selected (--providers)"
    return r


def _run_file(path, providers_measured, device_name="NVIDIA H200"):
    records = [_record("pcos_weights", p, t) if p in providers_measured else _record("pcos_weights", p, None,
                                                                                      "unavailable")
               for p, t in (("official", 22.0), ("cuda", 0.25), ("triton", 0.5))]
    payload = {"environment": {"device": "cuda", "device_name": device_name}, "settings": {},
               "copy_bandwidth": {"gbps": 3000.0}, "records": records, "train_step": [], "goals": [],
               "triton_tuning": {}}
    path.write_text(json.dumps(payload))
    return path


def test_merge_takes_each_providers_measured_row_and_computes_the_speedups_across_runs(tmp_path, monkeypatch):
    """Providers run one per command: each run lists the others as not selected; the merge keeps the measured rows,
    x_official across the runs, and names its file after the recorded GPU (none is needed here)."""
    from csl_bench import __main__ as bench_cli
    from csl_bench import report

    a = _run_file(tmp_path / "a.json", {"official"})
    b = _run_file(tmp_path / "b.json", {"cuda", "triton"})
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results").mkdir()  # as in a checkout
    payload = bench_cli.merge([a, b], None)
    by = {r["provider"]: r for r in payload["records"]}
    assert {p: r["status"] for p, r in by.items()} == {"official": "ok", "cuda": "ok", "triton": "ok"}
    assert by["cuda"]["x_official"] == pytest.approx(88.0) and by["triton"]["x_official"] == pytest.approx(44.0)
    assert any(g["goal"] == "PCOS >= 100x official" and g["met"] is False for g in payload["goals"])
    written = list((tmp_path / "results").iterdir())
    assert len(written) == 1 and written[0].name.endswith("-nvidia-h200.json")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        bench_cli.merge([a, b], written[0])
    with pytest.raises(SystemExit, match="pcos_weights voc321 bf16 cuda was measured in both"):
        bench_cli.merge([b, _run_file(tmp_path / "c.json", {"cuda"})], tmp_path / "d.json")
    with pytest.raises(SystemExit, match="cannot read"):
        bench_cli.merge([tmp_path / "missing.json"], tmp_path / "e.json")


def _step_row(selection, median, status="ok"):
    row = {"config": "r101 crop321", "selection": selection, "status": status}
    if status == "ok":
        row.update(step_ms={"median": median, "q20": median, "q80": median}, csl_ms={"median": 1.0},
                   csl_share_pct=100.0 / median)
    return row


def test_merge_keys_training_step_rows_and_computes_their_speedup_again(tmp_path):
    """A training-step run per selection: the measured rows over the unavailable ones, x_official across the runs;
    one selection measured in two runs is refused as an op's provider is."""
    from csl_bench import __main__ as bench_cli

    def run(path, rows):
        payload = json.loads(_run_file(path, set()).read_text())
        path.write_text(json.dumps({**payload, "train_step": rows}))
        return path

    a = run(tmp_path / "a.json", [_step_row("official", 150.0), _step_row("cuda", None, "unavailable")])
    b = run(tmp_path / "b.json", [_step_row("official", None, "unavailable"), _step_row("cuda", 120.0)])
    train = {r["selection"]: r for r in bench_cli.merge([a, b], tmp_path / "m.json")["train_step"]}
    assert {s: r["status"] for s, r in train.items()} == {"official": "ok", "cuda": "ok"}
    assert train["cuda"]["x_official"] == pytest.approx(1.25)
    with pytest.raises(SystemExit, match="r101 crop321 official was measured in both"):
        bench_cli.merge([a, run(tmp_path / "c.json", [_step_row("official", 140.0)])], tmp_path / "n.json")


def test_a_failed_training_step_fails_the_command(capsys):
    from csl_bench.runner import exit_status

    ok = {"config": "smoke", "selection": "official", "status": "ok"}
    failed = {"config": "smoke", "selection": "cpu", "status": "error", "reason": "RuntimeError: boom"}
    assert exit_status({"records": [], "train_step": [ok]}) == 0
    assert exit_status({"records": [], "train_step": [ok, failed]}) == 1
    assert "training step smoke cpu: RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["csl_bench", "bench_pcos_weights"])
def test_an_existing_output_is_refused_before_any_work(tmp_path, monkeypatch, command):
    from csl_bench import __main__ as bench_cli
    from csl_bench import bench_pcos_weights, runner

    works, main = (bench_cli, bench_main) if command == "csl_bench" else (runner, bench_pcos_weights.SPEC.main)
    out = tmp_path / "x.json"
    out.write_text("{}")
    for work in ("run_op", "copy_bandwidth_gbps", "environment"):
        monkeypatch.setattr(works, work, lambda *a, **k: pytest.fail("worked before refusing the output file"))
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["--smoke", "--device", "cpu", "--out", str(out)])
    assert out.read_text() == "{}"


def test_the_default_output_is_the_checkouts_results_folder_else_one_in_the_working_folder(tmp_path, monkeypatch):
    """A checkout writes beside the committed results; an installed package (no results folder: a wheel ships none)
    writes into ./csl_bench_results, not into site-packages."""
    from csl_bench import report

    cpu = torch.device("cpu")
    assert report.default_output_path(cpu).parent == report.RESULTS_DIR and report.RESULTS_DIR.is_dir()
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "site-packages" / "csl_bench" / "results")
    monkeypatch.chdir(tmp_path)
    path = report.default_output_path(cpu, suffix="-x")
    assert path.parent == tmp_path / "csl_bench_results" and path.name.endswith("-x.json")


@pytest.mark.parametrize("command", ["csl_bench", "bench_auto_choice", "bench_host_overhead"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, command):
    """A folder given as --out, or a file under a path that cannot be a folder, is refused before anything is
    measured; an existing file is refused without --overwrite by every script that writes JSON."""
    from csl_bench import __main__ as bench_cli
    from csl_bench import bench_auto_choice, bench_host_overhead

    main = {"csl_bench": bench_main, "bench_auto_choice": bench_auto_choice.main,
            "bench_host_overhead": bench_host_overhead.main}[command]
    for module, work in ((bench_cli, "run_op"), (bench_cli, "copy_bandwidth_gbps"), (bench_auto_choice, "_choices"),
                         (bench_host_overhead.subprocess, "run")):
        monkeypatch.setattr(module, work, lambda *a, **k: pytest.fail("worked before refusing the output file"))
    args = {"csl_bench": ["--smoke", "--device", "cpu"], "bench_auto_choice": ["--device", "cpu"],
            "bench_host_overhead": ["--workers", "cpu"]}[command]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write .*a-file/x.json"):
        main([*args, "--out", str(blocker / "x.json")])
    with pytest.raises(SystemExit, match="is a folder"):
        main([*args, "--out", str(tmp_path), "--overwrite"])
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main([*args, "--out", str(blocker)])
    assert blocker.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_missing_output_folder_is_created_as_the_help_says(tmp_path, capsys):
    """Every script's --help says that --out creates missing folders, and the check made before any work does."""
    from csl_bench import bench_auto_choice, bench_host_overhead
    from csl_bench.report import check_output_path

    for main in (bench_main, bench_auto_choice.main, bench_host_overhead.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "missing folders are created" in " ".join(capsys.readouterr().out.split())
    target = tmp_path / "new" / "sub" / "x.json"
    assert check_output_path(target, overwrite=False) == target
    assert target.parent.is_dir() and not target.exists()


def test_skip_train_and_train_only_exclude_each_other():
    with pytest.raises(SystemExit):  # argparse
        bench_main(["--skip-train", "--train-only"])


def test_host_overhead_median_of_an_even_count():
    from csl_bench.bench_host_overhead import _row

    assert _row("op", "p", [10.0, 20.0])["us_median"] == 15.0
    assert _row("op", "p", [1.0, 100.0, 2.0, 3.0])["us_median"] == 2.5


def test_long_training_step_rounds_say_how_far_they_got(monkeypatch):
    """The training-step benchmark says which round it is in once 10 s have passed since its last line (it was
    silent until its table): on a clock that moves 11 s a reading every round is said, on one that moves 1 ms none."""
    import itertools
    import types

    from csl_bench import bench_train_step as bts

    for step_s, expected in ((11, ["warmup round 1 of 1", "timed round 1 of 2", "timed round 2 of 2"]), (1e-3, [])):
        clock = itertools.count(0, step_s)
        monkeypatch.setattr(bts, "time", types.SimpleNamespace(perf_counter=lambda clock=clock: float(next(clock))))
        lines = []
        records = bts.run(torch.device("cpu"), "smoke", steps=2, warmup=1, log=lines.append)
        ok = sum(r["status"] == "ok" for r in records)
        assert ok >= 1
        assert [line for line in lines if " round " in line] == [f"train_step {e} ({ok} selections)" for e in expected]


# --- The harness's arithmetic, inputs and bookkeeping on synthetic data (no timing is measured) -----------------


def test_quantiles_are_the_20_50_80_percent_points_and_an_even_count_has_the_mean_median():
    from csl_bench.timing import quantiles

    q = quantiles([float(v) for v in (9, 1, 5, 3, 7, 2, 10, 4, 8, 6, 11)])
    assert (q["q20"], q["median"], q["q80"], q["min"], q["mean"], q["reps"]) == (3.0, 6.0, 9.0, 1.0, 6.0, 11)
    assert quantiles([4.0, 1.0, 3.0, 2.0])["median"] == 2.5


def test_repetitions_and_warmup_come_from_the_budget_over_one_timed_call(monkeypatch):
    """One call that takes 10 ms on the clock: 0.5 s of budget is 50 repetitions, 0.1 s of warm-up 10 calls; the
    repetitions are held within [min_reps, max_reps] and warm-up to 50 calls."""
    import itertools
    import types

    from csl_bench import timing
    from csl_bench.settings import Settings

    def plan(**kw):
        clock = itertools.count(0.0, 0.01)
        monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
        settings = Settings(device=torch.device("cpu"), suite="cpu", shapes=(), dtypes=(), **kw)
        return timing.plan_reps(lambda: None, [()], settings)

    assert plan(warmup_s=0.1, rep_s=0.5, min_reps=3, max_reps=200) == (10, 50)
    assert plan(warmup_s=0.0, rep_s=0.5, min_reps=3, max_reps=20) == (0, 20)
    assert plan(warmup_s=5.0, rep_s=0.01, min_reps=3, max_reps=200) == (50, 3)


def test_interleaved_timing_takes_turns_round_by_round_and_rotates_the_buffers(monkeypatch):
    """7 repetitions each over 5 rounds are 2, 2, 1, 1, 1 per round, the providers taking turns; each provider's calls
    go through the input copies in order across the rounds."""
    from csl_bench import timing
    from csl_bench.settings import Settings

    monkeypatch.setattr(timing, "plan_reps", lambda fn, buffers, settings: (0, 7))
    calls = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in ("a", "b")}
    buffers = [(0,), (1,), (2,)]
    settings = Settings(device=torch.device("cpu"), suite="cpu", shapes=(), dtypes=())
    out = timing.bench_interleaved(fns, buffers, settings)
    assert [name for name, _ in calls] == list("aabbaabbababab")
    for name in "ab":
        assert [i for n, i in calls if n == name] == [0, 1, 2, 0, 1, 2, 0]
        assert out[name]["reps"] == 7


def test_copy_bandwidth_counts_the_read_and_the_write(monkeypatch):
    from csl_bench import timing

    monkeypatch.setattr(timing, "bench_fn", lambda fn, buffers, settings: {"median": 1e-3})
    bw = timing.copy_bandwidth_gbps(torch.device("cpu"), nbytes=1000)
    assert bw["bytes"] == 1000 and bw["gbps"] == pytest.approx(2.0)  # 2 x 1000 B in 1 us


def test_each_ops_floor_counts_every_byte_an_ideal_kernel_moves():
    from csl_bench import bench_pcos_weights, bench_residual_features, bench_trusted_mask
    from csl_bench import bench_weighted_cross_entropy as bench_ce
    from csl_bench.settings import Shape

    shape = Shape("t", 2, 5, 3, 4)  # 24 pixels, 120 logits
    # logits read; ignore int64 read; weight f32 + label int64 + reliable bool written
    assert bench_pcos_weights.floor_bytes(shape, torch.float32) == 120 * 4 + 24 * (8 + 4 + 8 + 1)
    assert bench_pcos_weights.floor_bytes(shape, torch.bfloat16) == 120 * 2 + 24 * 21
    # logits read; ignore read; f0, v f32 and label int64 written
    assert bench_residual_features.floor_bytes(shape, torch.float32) == 120 * 4 + 24 * (8 + 4 + 4 + 8)
    # logits read and their gradient written; label int64, weight f32, ignore int64 read
    assert bench_ce.floor_bytes(shape, torch.bfloat16) == 2 * 120 * 2 + 24 * (8 + 4 + 8)
    # 3-channel f32 images read and written; reliable read and cover written (bool)
    assert bench_trusted_mask.floor_bytes(shape, torch.float32) == 24 * (3 * 4 * 2 + 1 + 1)


def test_benchmark_inputs_are_deterministic_with_the_ignore_border_on_odd_images():
    from csl_bench.inputs import make_ignore, make_logits
    from csl_bench.settings import Shape

    shape, cpu = Shape("t", 3, 4, 20, 16), torch.device("cpu")
    logits = make_logits(shape, torch.float32, cpu)
    assert torch.equal(logits, make_logits(shape, torch.float32, cpu))
    assert not torch.equal(logits, make_logits(shape, torch.float32, cpu, seed=1))
    ignore = make_ignore(shape, cpu)
    assert ignore.dtype == torch.int64 and ignore.shape == (3, 20, 16)
    assert not ignore[0].any() and not ignore[2].any()
    border = torch.zeros(20, 16, dtype=torch.bool)
    border[:, 14:] = True  # W // 8 = 2 right columns
    border[18:, :] = True  # H // 10 = 2 bottom rows
    assert torch.equal(ignore[1] == csl_kernels.IGNORE_INDEX, border) and torch.equal(ignore[1] == 0, ~border)


def test_l2_copies_reach_four_times_the_l2_within_the_memory_share_and_keep_requires_grad(monkeypatch):
    import types

    from csl_bench.inputs import rotating_buffers

    free = [10**9]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(L2_cache_size=1000))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[0], 10**9))
    logits = torch.zeros(100, requires_grad=True)  # 400 bytes: ceil(4 x 1000 / 400) = 10 copies
    inputs = (logits, torch.zeros(0, dtype=torch.int64), 8.0)
    buffers = rotating_buffers(inputs, torch.device("cuda"))
    assert len(buffers) == 10 and buffers[0] is inputs
    for copy in buffers[1:]:
        assert copy[0] is not logits and copy[0].requires_grad and copy[0].is_leaf and copy[2] == 8.0
    free[0] = 4000  # 30 % of the free memory holds 3 copies
    assert len(rotating_buffers(inputs, torch.device("cuda"))) == 3
    assert rotating_buffers(inputs, torch.device("cpu")) == [inputs]


def test_run_op_records_ratios_deviation_and_failures_of_each_provider():
    """A fake op on CPU: GB/s and x_floor from the floor bytes and the median, vs_eager from the provider's own output,
    a raising provider as an error (exit 1), and --providers leaving the others not selected."""
    from csl_bench.runner import OpSpec, exit_status, run_op
    from csl_bench.settings import Settings, Shape

    def boom(x):
        raise RuntimeError("boom")

    spec = OpSpec("fake", lambda shape, dtype, device: (torch.ones(3),), lambda shape, dtype: 10**6,
                  lambda settings, shape: {"official": lambda x: (2 * x,), "eager": lambda x: (x,),
                                           "triton": lambda x: (x,), "cpu": boom},
                  lambda out, ref, inputs: {"dev": float((out[0] - ref[0]).abs().max())})
    settings = Settings(device=torch.device("cpu"), suite="smoke", shapes=(Shape("s", 1, 1, 1, 3),),
                        dtypes=("fp32",), providers=("official", "eager", "cpu"), warmup_s=0.0, rep_s=0.0,
                        min_reps=1, max_reps=1, copy_gbps=100.0)
    by = {r["provider"]: r for r in run_op(spec, settings, log=lambda line: None)}
    for name in ("official", "eager"):
        r = by[name]
        seconds = r["time_ms"]["median"] * 1e-3
        assert r["status"] == "ok" and r["gbps"] == pytest.approx(1e-3 / seconds)
        assert r["x_floor"] == pytest.approx(seconds / (10**6 / 100e9))
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / 100.0)
    assert by["official"]["vs_eager"] == {"dev": 1.0} and by["eager"]["vs_eager"] == {"dev": 0.0}
    assert by["cpu"]["status"] == "error" and by["cpu"]["reason"] == "RuntimeError: boom"
    assert by["triton"]["status"] == "unavailable" and by["triton"]["reason"] == "not selected (--providers)"
    assert by["compile"]["status"] == "unavailable"
    assert exit_status({"records": list(by.values())}) == 1


def test_each_ops_vs_eager_compares_the_providers_output_with_the_references():
    from csl_bench import bench_pcos_weights, bench_residual_features, bench_trusted_mask
    from csl_bench import bench_weighted_cross_entropy as bench_ce

    ignore = torch.tensor([[0, 255, 0, 0]])
    ref = (torch.tensor([[0.5, 0.0, 1.0, 1.0]]), torch.tensor([[1, 0, 2, 3]]),
           torch.tensor([[False, False, True, True]]))
    out = (torch.tensor([[0.25, 0.0, 1.0, 1.0]]), torch.tensor([[1, 4, 2, 0]]),
           torch.tensor([[False, True, True, True]]))
    # the label differs on one of 3 valid pixels (the ignored one is not compared)
    assert bench_pcos_weights.compare(out, ref, (None, ignore)) == {
        "max_abs_weight": 0.25, "label_mismatch": pytest.approx(1 / 3), "reliable_mismatch": 0.25}
    # the ignored pixel (9.0) is neither compared nor in the scale of v
    feats = (torch.tensor([[0.5, 9.0, 0.5, 0.5]]), torch.tensor([[-2.0, 9.0, -1.0, -4.0]]),
             torch.tensor([[1, 9, 2, 3]]))
    got = (feats[0] + 0.125, feats[1] * 1.5, feats[2])
    assert bench_residual_features.compare(got, feats, (None, ignore)) == {
        "max_abs_f0": 0.125, "max_rel_v": 0.5, "label_mismatch": 0.0}
    grad = torch.tensor([[0.5, -2.0]])
    assert bench_ce.compare((torch.tensor(3.0), grad * 1.25), (torch.tensor(2.0), grad), ()) == {
        "rel_loss": 0.5, "max_rel_grad": 0.25}
    images = torch.zeros(1, 1, 1, 4)
    cover = torch.tensor([[[True, False, False, False]]])
    assert bench_trusted_mask.compare((images + 0.5, ~cover), (images, cover), ()) == {
        "max_abs_image": 0.5, "cover_mismatch": 1.0}


def test_official_providers_agree_with_eager_on_the_benchmark_inputs():
    """The official TMP draws its grid from the generator seeded like the others', the official loss counts only the
    valid pixels: on the smoke inputs both give the eager provider's outputs."""
    from csl_bench import bench_trusted_mask
    from csl_bench import bench_weighted_cross_entropy as bench_ce
    from csl_bench.settings import SHAPES, Settings

    shape = SHAPES["smoke"][0]
    settings = Settings(device=torch.device("cpu"), suite="smoke", shapes=(shape,), dtypes=("fp32",),
                        use_compile=False)
    inputs = bench_trusted_mask.make_inputs(shape, torch.float32, settings.device)
    fns = bench_trusted_mask.providers(settings, shape)
    torch.manual_seed(1)  # not the providers' seed: a grid drawn from the global generator would differ
    (masked, cover), (ref_masked, ref_cover) = fns["official"](*inputs), fns["eager"](*inputs)
    assert cover.any() and not cover.all() and torch.equal(cover, ref_cover) and torch.equal(masked, ref_masked)
    inputs = bench_ce.make_inputs(shape, torch.float32, settings.device)
    assert (inputs[3] == csl_kernels.IGNORE_INDEX).any()
    fns = bench_ce.providers(settings, shape)
    (loss, grad), (ref_loss, ref_grad) = fns["official"](*inputs), fns["eager"](*inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)


def _goal_records():
    def rec(op, provider, median, extra=None, **kw):
        return {"op": op, "shape": "voc321", "dtype": "bf16", "provider": provider, "status": "ok",
                "time_ms": {"median": median}, "memory": {"extra_bytes": extra}, **kw}

    return [rec("pcos_weights", "cuda", 0.2, x_official=120.0, x_compile=4.0, x_floor=1.2),
            rec("pcos_weights", "triton", 0.4, x_official=60.0, x_compile=2.0, x_floor=2.4),
            rec("weighted_cross_entropy", "official", 1.0, extra=400),
            rec("weighted_cross_entropy", "cuda", 0.25, extra=80, x_official=4.0)]


def test_goals_use_the_right_ratio_and_direction():
    from csl_bench.report import evaluate_goals

    goals = {(g["goal"], g["where"]): g for g in evaluate_goals(_goal_records(), [], torch.device("cuda"))}
    floor = "PCOS within 1.5x of the copy-bandwidth floor"
    assert goals[(floor, "voc321 bf16 cuda")]["met"] is True and goals[(floor, "voc321 bf16 triton")]["met"] is False
    triton = goals[("Triton PCOS within 1.5x of the extension (issue 14)", "voc321 bf16 triton")]
    assert triton["measured"] == pytest.approx(2.0) and triton["met"] is False
    memory = goals[("weighted CE peak memory <= 1/4 of eager F.cross_entropy (official; issue 14)",
                    "voc321 bf16 cuda")]
    assert memory["measured"] == pytest.approx(0.2) and memory["met"] is True
    assert {g["where"].split()[-1] for g in goals.values()} == {"cuda", "triton"}  # no cpu goals on a GPU run


def test_merge_refuses_runs_of_different_devices(tmp_path):
    from csl_bench import __main__ as bench_cli

    a = _run_file(tmp_path / "a.json", {"official"})
    b = _run_file(tmp_path / "b.json", {"cuda"}, device_name="NVIDIA H100 80GB HBM3")
    with pytest.raises(SystemExit, match="different devices"):
        bench_cli.merge([a, b], tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_custom_shape_is_batch_classes_height_width():
    from csl_bench.settings import parse_shape

    shape = parse_shape("4x21x33x35")
    assert (shape.batch, shape.classes, shape.height, shape.width) == (4, 21, 33, 35) and shape.name == "4x21x33x35"


def test_host_overhead_rounds_take_turns_after_every_warmup():
    from csl_bench.bench_host_overhead import _rounds, _warmup_calls

    calls = []
    out = _rounds({n: (lambda n=n: calls.append(n)) for n in "ab"}, calls=2, repeats=2)
    warm = _warmup_calls(2)
    assert warm == 50 and calls == ["a"] * warm + ["b"] * warm + list("aabbaabb")
    assert set(out) == {"a", "b"} and all(len(t) == 2 for t in out.values())


def test_host_overhead_beyond_empty_row_is_the_loss_less_the_empty_function_round_by_round(monkeypatch):
    from csl_bench import bench_host_overhead as bho

    times = {"pcos_weights": [5.0, 6.0], "weighted_cross_entropy fwd+bwd": [30.0, 20.0],
             "weighted_cross_entropy fwd (no grad)": [9.0, 8.0], bho.EMPTY_FUNCTION: [12.0, 4.0]}
    monkeypatch.setattr(bho, "_rounds", lambda fns, calls, repeats, sync=None: {k: times[k] for k in fns})
    rows = {r["op"]: r for r in bho._op_rows("cpu", calls=1, repeats=2)}
    assert rows[bho.BEYOND_EMPTY]["us_min"] == 16.0 and rows[bho.BEYOND_EMPTY]["us_median"] == 17.0
    assert rows["weighted_cross_entropy fwd+bwd"]["us_min"] == 20.0


def test_host_overhead_command_exits_1_when_a_worker_fails(tmp_path, monkeypatch):
    """The script's own exit status (its __main__ block): a worker with no result is a row with the error, and 1."""
    import runpy
    import subprocess
    import sys
    import warnings

    def no_result(cmd, **kwargs):  # the worker's process (and git) time out
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(subprocess, "run", no_result)
    out = tmp_path / "h.json"
    monkeypatch.setattr(sys, "argv", ["bench_host_overhead", "--workers", "baseline", "--worker-timeout", "5",
                                      "--out", str(out)])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
        runpy.run_module("csl_bench.bench_host_overhead", run_name="__main__")
    assert exit_.value.code == 1
    assert json.loads(out.read_text())["rows"] == [{"op": "-", "provider": "baseline", "error": "no result within 5 s"}]


def test_training_step_selections_take_turns_step_by_step(monkeypatch):
    """Warm-up round then timed rounds, one step of every selection each; x_official and the CSL share from the
    medians (a stub step whose region takes 1, 1, 4 clock units and the whole step 2 more)."""
    import itertools
    import types

    from csl_bench import bench_train_step as bts

    class Tiny(torch.nn.Linear):
        def param_groups(self, lr, head_factor):
            return [{"params": list(self.parameters())}]

    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr(bts, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(bts, "build_model", lambda cfg, classes: Tiny(1, 1))
    order, count = [], {}

    def fake_step(*args, selector, region, **kwargs):
        name = "official" if isinstance(selector, bts.OfficialSelector) else selector.backend
        order.append(name)
        count[name] = count.get(name, 0) + 1
        for _ in range({2: 1, 3: 1, 4: 4}.get(count[name], 1)):  # timed steps 1-3 (the first call is the warm-up)
            with region("select"):
                pass

    monkeypatch.setattr(bts, "train_step", fake_step)
    records = {r["selection"]: r for r in bts.run(torch.device("cpu"), "smoke", steps=3, warmup=1,
                                                     log=lambda line: None)}
    ran = [name for name, r in records.items() if r["status"] == "ok"]
    ran = ["reference" if name == "eager" else name for name in ran]
    assert len(ran) >= 2 and order == ran * 4
    for r in records.values():
        if r["status"] == "ok":
            # step: t0, region begin / end per region, t1 -> 3, 3, 9 units; CSL 1, 1, 4: medians 3000 and 1000 ms
            assert r["step_ms"]["median"] == 3000.0 and r["csl_ms"]["median"] == 1000.0
            assert r["csl_share_pct"] == pytest.approx(100 / 3) and r["x_official"] == pytest.approx(1.0)


def test_auto_choice_measures_in_a_cache_of_its_own_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """Without CSL_AUTO_CACHE the script measures in a temporary cache folder that it removes; the variable and the
    csl_kernels logger are as they were afterwards. A cache the caller names is used and kept."""
    import logging
    import tempfile

    from csl_bench.bench_auto_choice import main as auto_main

    monkeypatch.delenv("CSL_AUTO_CACHE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    logger = logging.getLogger("csl_kernels")
    before = list(logger.handlers), logger.level, logger.propagate
    payload = auto_main(["--device", "cpu", "--shapes", "smoke", "--dtypes", "fp32"])
    assert payload["cache"] == "temporary (removed)" and list(tmp_path.iterdir()) == []
    assert "CSL_AUTO_CACHE" not in os.environ
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    assert [(r["op"], r["shape"], r["dtype"]) for r in payload["choices"]] == [
        ("pcos_weights", "smoke", "fp32"), ("weighted_cross_entropy", "smoke", "fp32")]
    named = tmp_path / "mine" / "auto.json"
    monkeypatch.setenv("CSL_AUTO_CACHE", str(named))
    assert auto_main(["--device", "cpu", "--shapes", "smoke", "--dtypes", "fp32"])["cache"] == str(named)
    assert os.environ["CSL_AUTO_CACHE"] == str(named)


def test_auto_choice_does_not_use_choices_the_process_read_from_another_cache(tmp_path, monkeypatch):
    """Choices a process already read from the user's cache are not the script's: it starts from its own file, and
    afterwards the process reads its cache file again."""
    from csl_bench import bench_auto_choice
    from csl_kernels import _measured

    monkeypatch.delenv("CSL_AUTO_CACHE", raising=False)
    monkeypatch.setattr(_measured, "_choices", {"pcos_weights | GPU | float32 C21 px2^20": "cuda"})
    monkeypatch.setattr(_measured, "_by_shape", {("pcos_weights", "cuda", "float32", (1, 21), ""): "cuda"})
    monkeypatch.setattr(_measured, "_logged", {"pcos_weights | GPU | float32 C21 px2^20"})
    seen = []

    def record(*args):
        seen.append((_measured._choices, dict(_measured._by_shape), set(_measured._logged),
                     _measured.cache_path().parent.name.startswith("csl-auto-")))
        return []

    monkeypatch.setattr(bench_auto_choice, "_choices", record)
    bench_auto_choice.main(["--device", "cpu", "--shapes", "smoke", "--dtypes", "fp32"])
    assert seen == [(None, {}, set(), True)]
    assert (_measured._choices, _measured._by_shape, _measured._logged) == (None, {}, set())


def test_official_two_class_features_are_rank_one_and_one_cluster():
    """With two classes the residual dispersion is 0 at every pixel: the 2 x N feature matrix has rank one and every
    pixel is in cluster 0 (spec Sec. 2), not split by the arbitrary second singular vector."""
    logits = torch.randn(2, 2, 5, 6, generator=torch.Generator().manual_seed(0)) * 3
    weight, label, reliable = official_pcos(logits)
    ref = csl_kernels.pcos_weights(logits, None, backend="reference")
    assert ((ref.weight > 0.01) & (ref.weight < 0.99)).sum() > 10
    torch.testing.assert_close(weight, ref.weight, atol=2e-5, rtol=0)
    assert torch.equal(reliable, ref.reliable) and torch.equal(label, ref.label)


def test_a_provider_that_fails_only_when_timed_is_an_error():
    """Interleaved timing raises, so each provider is timed alone: the one that raises is an error (exit 1), the
    others are measured."""
    from csl_bench.runner import OpSpec, exit_status, run_op
    from csl_bench.settings import Settings, Shape

    calls = [0]

    def once(x):
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("illegal memory access")
        return (x,)

    spec = OpSpec("fake", lambda shape, dtype, device: (torch.ones(3),), lambda shape, dtype: 12,
                  lambda settings, shape: {"eager": lambda x: (x,), "triton": once},
                  lambda out, ref, inputs: {})
    settings = Settings(device=torch.device("cpu"), suite="smoke", shapes=(Shape("s", 1, 1, 1, 3),),
                        dtypes=("fp32",), warmup_s=0.0, rep_s=0.0, min_reps=1, max_reps=1)
    records = run_op(spec, settings, log=lambda line: None)
    by = {r["provider"]: r for r in records}
    assert by["eager"]["status"] == "ok" and by["eager"]["time_ms"]["reps"] == 1
    assert by["triton"]["status"] == "error" and by["triton"]["reason"] == "RuntimeError: illegal memory access"
    assert exit_status({"records": records}) == 1


def test_merge_keeps_a_failed_row_over_a_not_selected_one(tmp_path):
    """A provider that failed in one run and was not selected in another stays failed, so the merge exits 1."""
    from csl_bench import __main__ as bench_cli
    from csl_bench.runner import exit_status

    a = _run_file(tmp_path / "a.json", {"official"})
    data = json.loads(a.read_text())
    for r in data["records"]:
        if r["provider"] == "cuda":
            r.update(status="error", reason="RuntimeError: boom")
    a.write_text(json.dumps(data))
    b = _run_file(tmp_path / "b.json", {"triton"})
    payload = bench_cli.merge([b, a], tmp_path / "m.json")
    assert {r["provider"]: r["status"] for r in payload["records"]} == {"official": "ok", "cuda": "error",
                                                                        "triton": "ok"}
    assert exit_status(payload) == 1


def test_step_speedup_needs_a_measured_official_step():
    from csl_bench.bench_train_step import add_step_speedups

    rows = [{"config": "c", "selection": "official", "status": "error", "reason": "RuntimeError: boom"},
            _step_row("cuda", 120.0) | {"config": "c"}]
    add_step_speedups(rows)
    assert all("x_official" not in r for r in rows)


def test_official_loss_upcasts_low_precision_logits_as_autocast_does():
    logits = separated_logits(batch=2, classes=5, size=9).to(torch.bfloat16)
    label, weight = logits.argmax(1), torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(0))
    ignore = torch.zeros(2, 9, 9, dtype=torch.int64)
    loss = unimatch_weighted_cross_entropy(logits, label, weight, ignore)
    assert loss.dtype == torch.float32
    assert loss == unimatch_weighted_cross_entropy(logits.float(), label, weight, ignore)


def test_merge_keeps_each_rows_floor_ratio(tmp_path):
    """x_floor is a row's own time over its floor, not a ratio to another row: a merge keeps it (the x_* speed-ups it
    computes again across the runs), and the floor goal is evaluated on it."""
    from csl_bench import __main__ as bench_cli

    a = _run_file(tmp_path / "a.json", {"official"})
    b = _run_file(tmp_path / "b.json", {"cuda"})
    data = json.loads(b.read_text())
    for r in data["records"]:
        if r["status"] == "ok":
            r["x_floor"] = 11.0
    b.write_text(json.dumps(data))
    payload = bench_cli.merge([a, b], tmp_path / "m.json")
    assert {r["provider"]: r.get("x_floor") for r in payload["records"]} == {"official": None, "cuda": 11.0,
                                                                              "triton": None}
    floor = [g for g in payload["goals"] if g["goal"] == "PCOS within 1.5x of the copy-bandwidth floor"]
    assert [(g["where"], g["measured"], g["met"]) for g in floor] == [("voc321 bf16 cuda", 11.0, False)]


def test_train_step_suite_coco_runs_unimatchs_coco_step(monkeypatch):
    """``--suite coco``: UniMatch's COCO model and classes (Xception-65, 81 classes, bf16 autocast) through every
    selection; here at crop 33 and one image per view (the real crop 513 is a GPU's work)."""
    from csl_bench import bench_train_step as bts

    assert bts.CONFIGS["coco"] == bts.BenchShape("xception", 513, 2, 81, torch.bfloat16)
    monkeypatch.setitem(bts.CONFIGS, "coco", bts.BenchShape("xception", 33, 1, 81, torch.bfloat16))
    monkeypatch.setitem(bts.STEPS, "coco", (1, 0))
    records = bts.main(["--suite", "coco", "--device", "cpu"])
    assert {r["config"] for r in records} == {"deeplabv3plus-xception crop33 B1+1+1 bf16"}
    assert {r["selection"] for r in records} >= {"official", "eager", "cpu"}
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    with pytest.raises(SystemExit):
        bts.main(["--suite", "coco", "--smoke"])  # one or the other
