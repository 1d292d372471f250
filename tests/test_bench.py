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


def test_an_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    from csl_bench import __main__ as bench_cli

    out = tmp_path / "x.json"
    out.write_text("{}")
    for work in ("run_op", "copy_bandwidth_gbps", "environment"):
        monkeypatch.setattr(bench_cli, work, lambda *a, **k: pytest.fail("worked before refusing the output file"))
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        bench_main(["--smoke", "--device", "cpu", "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse: the two flags exclude each other
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
