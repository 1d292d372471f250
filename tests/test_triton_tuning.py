"""Launch-configuration tuning of the Triton kernels (csl_kernels/triton/tuning.py).

Every candidate of every tunable launcher gives the default's outputs (per-pixel outputs bitwise under the interpreter,
within 16 units of the last place on a GPU; the reductions to the last bits); the tuner times each candidate once,
keeps the fastest, writes it to the cache file and reads it back in a fresh process state without timing again; bad
cache files, failing candidates, an unwritable cache, ``CSL_TRITON_AUTOTUNE=0`` and float64 inputs are handled as
documented. On CPU the timer is replaced by a table (the interpreter's timings mean nothing); the CUDA test times for
real.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import require_backend

import csl_kernels as ck

OP = "residual_features"


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """The tuning module with autotuning on, a private cache file and nothing remembered."""
    device = require_backend(OP, "triton")
    from csl_kernels.triton import tuning

    monkeypatch.setenv(tuning.ENV_MODE, "1")
    monkeypatch.setenv(tuning.ENV_CACHE, str(tmp_path / "cache" / "tuning.json"))
    tuning.forget()
    yield tuning, device
    tuning.forget()


class FakeTimer:
    """Stands in for the CUDA-event timer: runs the candidate (so it must work), returns a fixed time per config."""

    def __init__(self, times: dict):
        self.times = times
        self.calls: list = []

    def __call__(self, fn, config):
        fn()
        self.calls.append(config)
        return self.times.get(config, 10.0)


def features_call(device, dtype=torch.float32, classes=21, shape=(2, 13, 21), adversarial=False):
    """Logits and an ignore map (image 1's last 4 columns ignored); ``adversarial``: NaN / +-inf logits on 3 % of
    image 0's pixels and the logits read through swapped H / W strides."""
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(shape[0], classes, *shape[1:], generator=g)
    if adversarial:
        bad = torch.rand(shape[1:], generator=g) < 0.03
        logits[0, 0][bad] = float("nan")
        logits[0, 1][bad.roll(1, 0)] = float("inf")
        logits[0, 1][bad.roll(1, 1)] = -float("inf")
    logits = logits.to(dtype).to(device)
    if adversarial:
        logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2)
    ignore = torch.zeros(shape, dtype=torch.long)
    ignore[1, :, shape[2] - 4:] = ck.IGNORE_INDEX
    return logits, ignore.to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(got: torch.Tensor, expected: torch.Tensor, what) -> None:
    """A per-pixel output of another launch configuration: bitwise equal under the interpreter, which reduces over
    the classes in one order whatever the tile. Compiled for a GPU, a class reduction's order follows the class tile,
    so a float output may differ in its last bits there: within 16 units of the last place (relative, and absolute
    for values under 1). Seen on an H200 (fp32, C = 21 and 150): at most 6.9e-7 relative, 2.9e-6 absolute on values
    near 5, about a quarter of this. Integer and bool outputs stay exact everywhere."""
    if got.is_floating_point() and got.device.type == "cuda":
        ulps = 16 * torch.finfo(got.dtype).eps
        torch.testing.assert_close(got, expected, rtol=ulps, atol=ulps, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(bits(got), bits(expected)), what


def assert_tuned_features_are_the_defaults(module, logits, ignore, caplog) -> None:
    """residual_features on Triton through the tuning path (its INFO records captured by ``caplog``) returns what the
    default launch configuration (``module.forced(0)``) returns."""
    with module.forced(0):
        expected = ck.residual_features(logits, ignore, backend="triton")
    with caplog.at_level(logging.INFO, logger="csl_kernels"):
        got = ck.residual_features(logits, ignore, backend="triton")
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_same(a, b, i)


def close_tolerances(device: torch.device) -> dict:
    """The reductions (float64 PCOS sums, the loss) of another configuration: to the last bits under the
    interpreter. On a GPU their inputs may already differ in the last bits (``assert_same``); a Gaussian weight in the
    tail amplifies that about tenfold, and the smaller eigenvalue of a group's 2 x 2 covariance by its condition
    number: 1e-4 relative there, still far below what a configuration that drops or repeats pixels changes."""
    return {"rtol": 1e-4, "atol": 1e-6} if device.type == "cuda" else {"rtol": 1e-6, "atol": 1e-7}


def run_all_ops(logits, ignore, class_groups: bool):
    """Outputs of every tuned launcher on one input: ``(exact, close)`` dicts of tensors."""
    f0, v, label = ck.residual_features(logits, ignore, backend="triton")
    sel = ck.pcos_weights(logits, ignore, backend="triton", return_stats=True)
    sel_cls = ck.pcos_weights(logits, ignore, groups="class", backend="triton", return_stats=True) if class_groups \
        else sel
    leaf = logits.detach().clone().requires_grad_(True)
    loss = ck.weighted_cross_entropy(leaf, sel.label, sel.weight, ignore, backend="triton")
    loss.backward()
    images = torch.rand(logits.shape[0], 3, *logits.shape[2:], generator=torch.Generator().manual_seed(5))
    masked, cover = ck.trusted_mask(images.to(logits.device), sel.reliable, block=8,
                                    generator=torch.Generator().manual_seed(1), backend="triton")
    exact = {"f0": f0, "v": v, "label": label, "pcos label": sel.label, "pcos class label": sel_cls.label,
             "pcos count": sel.stats.count, "pcos chosen": sel.stats.chosen, "ce grad": leaf.grad, "masked": masked,
             "cover": cover}
    close = {"pcos weight": sel.weight, "pcos mu": sel.stats.mu, "pcos var": sel.stats.var,
             "pcos eigenvalues": sel.stats.eigenvalues, "pcos class weight": sel_cls.weight, "ce loss": loss}
    return exact, close


@pytest.mark.parametrize(("dtype", "classes"), [(torch.float32, 2), (torch.float32, 21), (torch.float32, 150),
                                               (torch.bfloat16, 21)])
def test_every_candidate_gives_the_default_outputs(tuning, monkeypatch, classes, dtype):
    """Per-pixel outputs equal for every candidate (``assert_same``); reductions (float64 PCOS sums, the loss)
    within ``close_tolerances``. The default is held to the float64 reference by the per-op tests. PCOS chunks are
    shrunk to 128 pixels (a multiple of every candidate's tile, as MIN_CHUNK is) so that the interpreter sees three
    chunks per image; class groups only up to C = 21 (C = 150 adds class tiles, which the feature and loss kernels
    cover, at 7x the cost). The input has non-finite pixels and strided rows (``features_call(adversarial=True)``).
    """
    module, device = tuning
    from csl_kernels.triton import pcos_weights

    monkeypatch.setattr(pcos_weights, "MIN_CHUNK", 128)
    logits, ignore = features_call(device, dtype, classes, adversarial=True)
    class_groups = classes <= 21
    with module.forced(0):
        exact0, close0 = run_all_ops(logits, ignore, class_groups)
    assert exact0["cover"].any() and exact0["ce grad"].abs().sum() > 0
    count = max(len(t.candidates) for t in module.TUNABLES.values())
    for index in range(1, count):
        with module.forced(index):
            exact, close = run_all_ops(logits, ignore, class_groups)
        for name, ref in exact0.items():
            assert_same(exact[name], ref, (index, name))
        for name, ref in close0.items():
            torch.testing.assert_close(close[name], ref, **close_tolerances(device), msg=lambda m, i=index, n=name:
                                       f"candidate {i}, {n}: {m}")


def test_tuned_launches_give_the_default_outputs(tuning, monkeypatch):
    """Through the tuning path (every candidate launched, some several times, most into the same output buffers) every
    op returns what the default launch returns: nothing accumulates across launches."""
    module, device = tuning
    from csl_kernels.triton import pcos_weights

    monkeypatch.setattr(pcos_weights, "MIN_CHUNK", 128)
    logits, ignore = features_call(device, classes=5)
    with module.forced(0):
        exact0, close0 = run_all_ops(logits, ignore, class_groups=True)
    # The slowest-but-one candidate wins, so the final launch is not the last one timed.
    timer = FakeTimer({t.candidates[-2]: 0.5 for t in module.TUNABLES.values()})
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", timer)
    exact, close = run_all_ops(logits, ignore, class_groups=True)
    assert {key.split("|")[0] for key in module.chosen()[module.device_section(device)]} == set(module.TUNABLES)
    assert len(timer.calls) == sum(len(t.candidates) for t in module.TUNABLES.values()) + len(
        module.TUNABLES["pcos_weights"].candidates)  # image and class groups are two keys
    for name, ref in exact0.items():
        assert_same(exact[name], ref, name)
    for name, ref in close0.items():
        torch.testing.assert_close(close[name], ref, **close_tolerances(device))


def test_tunables_are_registered_with_spill_free_defaults_first(tuning):
    module, _ = tuning
    assert set(module.TUNABLES) == {"residual_features", "pcos_weights", "trusted_mask",
                                    "weighted_cross_entropy_forward", "weighted_cross_entropy_backward"}
    for t in module.TUNABLES.values():
        assert t.candidates[0] == t.default and len(t.candidates) >= 4


def test_tuning_picks_the_fastest_and_caches_it(tuning, monkeypatch, caplog):
    module, device = tuning
    tunable = module.TUNABLES[OP]
    fastest = tunable.candidates[3]
    timer = FakeTimer({fastest: 1.0, tunable.default: 2.0})
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", timer)
    logits, ignore = features_call(device)
    assert_tuned_features_are_the_defaults(module, logits, ignore, caplog)
    assert timer.calls == list(tunable.candidates)
    assert "tuned residual_features" in caplog.text and fastest.name in caplog.text
    assert "tuning residual_features for float32,C=21,nchw" in caplog.text and str(module.cache_path()) in caplog.text
    key = f"float32,C=21,nchw,px<={triton_next_pow2(2 * 13 * 21)}"
    section = module.device_section(device)
    times = {c.name: timer.times.get(c, 10.0) for c in tunable.candidates}
    entry = {**fastest.as_dict(), "times_ms": times}
    assert module.chosen() == {section: {f"residual_features|{key}": entry}}
    data = json.loads(module.cache_path().read_text())
    assert data == {"format": module.CACHE_FORMAT, "sections": {section: {f"residual_features|{key}": entry}}}
    # The same key again: no timing. A fresh process state reads the file instead of timing.
    ck.residual_features(logits, ignore, backend="triton")
    module.forget()
    monkeypatch.setattr(module, "timer", FakeTimer({}))
    picked = tunable.pick(key, logits, lambda c: pytest.fail("launched while reading the cache"))
    assert picked == fastest and module.timer.calls == []
    assert module.chosen() == {section: {f"residual_features|{key}": fastest.as_dict()}}  # not timed here
    # Another dtype is another key: timed again, and both entries end up in the file.
    ck.residual_features(logits.to(torch.bfloat16), ignore, backend="triton")
    assert module.timer.calls == list(tunable.candidates)
    assert len(json.loads(module.cache_path().read_text())["sections"][section]) == 2


def test_capture_uses_the_cached_choice_and_never_times(tuning, monkeypatch):
    """Inside a CUDA-graph capture (no timing there) a key tuned before gets its cached choice, an unknown key the
    default; neither is timed."""
    module, device = tuning
    tunable = module.TUNABLES[OP]
    fastest = tunable.candidates[2]
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", FakeTimer({fastest: 1.0}))
    logits, _ = features_call(device)
    assert tunable.pick("tuned key", logits, lambda c: None) == fastest
    module.forget()  # a fresh process: the choice is in the file only
    monkeypatch.setattr(module, "tunes_on", lambda d: False)  # capturing
    monkeypatch.setattr(module, "caches_on", lambda d: True)  # on a CUDA device
    monkeypatch.setattr(module, "timer", FakeTimer({}))

    def launch(config):
        raise AssertionError("nothing is timed inside a capture")

    assert tunable.pick("tuned key", logits, launch) == fastest
    assert tunable.pick("another key", logits, launch) == tunable.default
    assert module.timer.calls == []


def triton_next_pow2(n: int) -> int:
    import triton

    return triton.next_power_of_2(n)


def test_autotune_off_and_float64_and_cpu_use_the_default(tuning, monkeypatch):
    module, device = tuning
    tunable = module.TUNABLES[OP]
    monkeypatch.setattr(module, "timer", FakeTimer({}))
    logits, _ = features_call(device)

    def launch(config):
        raise AssertionError("the tuner must not time anything here")

    # Without the tunes_on patch a CPU tensor is never timed.
    assert tunable.pick("k", logits.cpu(), launch) == tunable.default
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    assert tunable.pick("k", logits.double(), launch) == tunable.default
    # The PCOS passes take half the default tile for float64 logits (the default spills with Triton 3.6).
    pcos = module.TUNABLES["pcos_weights"]
    assert pcos.pick("k", logits.double(), launch) == pcos.float64 == module.Config(512, 4) != pcos.default
    monkeypatch.setenv(module.ENV_MODE, "0")
    assert tunable.pick("k", logits, launch) == tunable.default
    assert module.timer.calls == [] and not module.cache_path().exists()
    monkeypatch.setenv(module.ENV_MODE, "yes")
    with pytest.raises(ValueError, match="CSL_TRITON_AUTOTUNE must be 0 .* or 1"):
        tunable.pick("k", logits, launch)


def test_corrupt_or_stale_cache_is_reported_and_replaced(tuning, monkeypatch, caplog):
    module, device = tuning
    tunable = module.TUNABLES[OP]
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    logits, _ = features_call(device)
    path = module.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    monkeypatch.setattr(module, "timer", FakeTimer({tunable.candidates[1]: 1.0}))
    with caplog.at_level(logging.WARNING, logger="csl_kernels"):
        assert tunable.pick("k", logits, lambda c: None) == tunable.candidates[1]
    assert "is not valid" in caplog.text
    stored = json.loads(path.read_text())["sections"][module.device_section(device)]
    assert list(stored) == ["residual_features|k"]
    assert {k: stored["residual_features|k"][k] for k in ("tile", "num_warps")} == tunable.candidates[1].as_dict()
    # Bytes that are not text, and an entry whose tile is no int (Infinity, 1e400: valid JSON), are replaced too.
    section = module.device_section(device)
    for damaged in (b"\xff\xfe\x00garbage", f'{{"format": {module.CACHE_FORMAT}, "sections": {{"{section}": '
                    f'{{"residual_features|k": {{"tile": Infinity, "num_warps": 1e400}}}}}}}}'.encode()):
        path.write_bytes(damaged)
        module.forget()
        monkeypatch.setattr(module, "timer", FakeTimer({tunable.candidates[1]: 1.0}))
        assert tunable.pick("k", logits, lambda c: None) == tunable.candidates[1]
        assert module.timer.calls == list(tunable.candidates)
        assert json.loads(path.read_text())["sections"][section]["residual_features|k"]["tile"] == \
            tunable.candidates[1].tile
    # A stored configuration that is no longer a candidate (another version's list) is timed again; entries of other
    # devices are kept.
    stale = {"format": module.CACHE_FORMAT, "sections": {
        module.device_section(device): {"residual_features|k": {"tile": 3, "num_warps": 1}},
        "Other GPU (sm_80), triton 0": {"residual_features|k": {"tile": 1024, "num_warps": 8}}}}
    path.write_text(json.dumps(stale))
    module.forget()
    monkeypatch.setattr(module, "timer", FakeTimer({tunable.candidates[2]: 1.0}))
    assert tunable.pick("k", logits, lambda c: None) == tunable.candidates[2]
    assert module.timer.calls == list(tunable.candidates)
    sections = json.loads(path.read_text())["sections"]
    assert sections["Other GPU (sm_80), triton 0"] == stale["sections"]["Other GPU (sm_80), triton 0"]
    assert sections[module.device_section(device)]["residual_features|k"]["tile"] == tunable.candidates[2].tile


def test_failing_candidates_are_skipped_and_all_failing_raises(tuning, monkeypatch, caplog):
    module, device = tuning
    monkeypatch.setattr(module, "TUNABLES", dict(module.TUNABLES))
    candidates = (module.Config(256, 4), module.Config(512, 4), module.Config(1024, 8))
    tunable = module.Tunable("test_only", candidates[0], candidates)
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", FakeTimer({candidates[0]: 3.0, candidates[1]: 1.0, candidates[2]: 2.0}))
    x = torch.zeros(4, device=device)

    def launch(config):
        if config == candidates[1]:
            raise RuntimeError("out of resources: shared memory")

    with caplog.at_level(logging.WARNING, logger="csl_kernels"):
        assert tunable.pick("k", x, launch) == candidates[2]
    assert "test_only candidate tile=512,warps=4 failed" in caplog.text and "out of resources" in caplog.text

    def broken(config):
        raise RuntimeError(f"cannot compile {config.name}")

    with pytest.raises(RuntimeError, match="no launch configuration ran .*cannot compile tile=1024,warps=8"):
        tunable.pick("other key", x, broken)
    with pytest.raises(ValueError, match="default"):
        module.Tunable("bad", module.Config(1, 1), candidates)
    with pytest.raises(ValueError, match="float64 configuration tile=1,warps=1 is not among"):
        module.Tunable("bad", candidates[0], candidates, float64=module.Config(1, 1))
    with pytest.raises(ValueError, match="not a candidate"), module.forced({"test_only": module.Config(1, 1)}):
        pass
    with pytest.raises(KeyError, match="unknown tunable"), module.forced({"nope": candidates[0]}):
        pass


def test_unwritable_cache_keeps_the_choice_in_memory(tuning, monkeypatch, tmp_path, caplog):
    module, device = tuning
    tunable = module.TUNABLES[OP]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(module.ENV_CACHE, str(blocker / "tuning.json"))  # its parent is a file
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", FakeTimer({tunable.candidates[-1]: 1.0}))
    logits, _ = features_call(device)
    with caplog.at_level(logging.WARNING, logger="csl_kernels"):
        assert tunable.pick("k", logits, lambda c: None) == tunable.candidates[-1]
    assert "cannot write the tuning cache" in caplog.text
    monkeypatch.setattr(module, "timer", FakeTimer({}))
    assert tunable.pick("k", logits, lambda c: None) == tunable.candidates[-1] and module.timer.calls == []


def test_cache_location_follows_the_environment(tuning, monkeypatch, tmp_path):
    module, _ = tuning
    monkeypatch.delenv(module.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert module.cache_path() == tmp_path / "xdg" / "csl" / "triton-tuning.json"


@pytest.mark.gpu
def test_tuning_on_cuda_times_every_candidate_and_caches(tuning, monkeypatch, caplog):
    """On a GPU: real CUDA-event timings, the choice written to the cache, the outputs those of the default."""
    module, device = tuning
    if device.type != "cuda":
        pytest.skip("needs a CUDA device")
    logits, ignore = features_call(device, classes=21, shape=(4, 129, 131))
    assert_tuned_features_are_the_defaults(module, logits, ignore, caplog)
    assert "tuned residual_features" in caplog.text
    entries = json.loads(module.cache_path().read_text())["sections"][module.device_section(device)]
    (entry,) = entries.values()
    assert module.Config(entry["tile"], entry["num_warps"]) in module.TUNABLES[OP].candidates
    assert set(entry["times_ms"]) == {c.name for c in module.TUNABLES[OP].candidates}
    assert all(t > 0 for t in entry["times_ms"].values())


def test_pretune_tunes_every_op_and_prints_the_choices(tuning, monkeypatch):
    """``pretune`` (behind ``python -m csl_kernels.triton.pretune``) reaches every tunable once per shape."""
    from csl_kernels.triton import pretune

    module, device = tuning
    times = {t.candidates[1]: 1.0 for t in module.TUNABLES.values()}
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", FakeTimer(times))
    pretune.pretune((2, 5, 9, 11), torch.bfloat16, device)
    choices = module.chosen()[module.device_section(device)]
    assert sorted(k.split("|")[0] for k in choices) == sorted(module.TUNABLES)
    for key, entry in choices.items():
        name = key.split("|")[0]
        assert module.Config(entry["tile"], entry["num_warps"]) == module.TUNABLES[name].candidates[1]
    table = pretune.format_choices(module.chosen())
    assert table.count("\n") == 1 + len(module.TUNABLES)
    assert "| residual_features | bfloat16,C=5,nchw,px<=256 | tile=512,warps=4 | 10.0000 | 1.0000 | 10.00x |" in table


def test_pretune_command_line_errors(tuning, capsys, monkeypatch):
    module, _ = tuning
    from csl_kernels.triton.pretune import main

    with pytest.raises(SystemExit):
        main(["--shape", "8,21,321"])
    assert "four positive integers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--shape", "8,21,321,321"]) == 2
        assert "CUDA device" in capsys.readouterr().err
    monkeypatch.setenv(module.ENV_MODE, "0")
    assert main(["--shape", "8,21,321,321", "--device", "cuda"]) == 2
    assert "CSL_TRITON_AUTOTUNE=0 launches the defaults; nothing to tune" in capsys.readouterr().err


def test_autotune_off_or_a_forced_config_wins_over_a_shape_tuned_before(tuning, monkeypatch):
    """CSL_TRITON_AUTOTUNE=0 "always launches the defaults", also for a shape this process tuned and remembers in its
    per-shape fast lookup; a forced configuration wins there too (tuned(): what is forced or the mode can change
    between calls, so neither is remembered)."""
    module, device = tuning
    tunable = module.TUNABLES[OP]
    fastest = tunable.candidates[3]
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", FakeTimer({fastest: 1.0, tunable.default: 2.0}))
    logits, _ = features_call(device)
    launched = []
    module.tuned(tunable, logits, launched.append)
    assert launched[-1] == fastest
    module.tuned(tunable, logits, launched.append)  # the fast lookup
    assert launched[-1] == fastest
    with module.forced({OP: tunable.candidates[1]}):
        module.tuned(tunable, logits, launched.append)
    assert launched[-1] == tunable.candidates[1]
    monkeypatch.setenv(module.ENV_MODE, "0")
    module.tuned(tunable, logits, launched.append)
    assert launched[-1] == tunable.default


def test_forget_drops_the_per_shape_choices_too(tuning, monkeypatch, tmp_path):
    """forget(): "the next call reads the cache file again" -- also for a shape this process already launched, which
    the per-shape fast lookup of tuned() would otherwise answer with the forgotten choice. With a new (empty) cache
    file the shape is timed afresh."""
    module, device = tuning
    tunable = module.TUNABLES[OP]
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", FakeTimer({tunable.candidates[3]: 1.0}))
    logits, _ = features_call(device)
    launched = []
    module.tuned(tunable, logits, launched.append)
    assert launched[-1] == tunable.candidates[3]
    module.forget()
    monkeypatch.setenv(module.ENV_CACHE, str(tmp_path / "another" / "tuning.json"))
    monkeypatch.setattr(module, "timer", FakeTimer({tunable.candidates[2]: 1.0}))
    module.tuned(tunable, logits, launched.append)
    assert module.timer.calls == list(tunable.candidates) and launched[-1] == tunable.candidates[2]


def test_the_tuning_key_names_the_memory_layout(tuning):
    """call_key: contiguous NCHW, channels_last and other strides are tuned apart (the kernels read them in place,
    at different speeds), and the key says which."""
    module, _ = tuning
    z = torch.zeros(2, 21, 4, 5)
    assert ",nchw," in module.call_key(z)
    assert ",nhwc," in module.call_key(z.contiguous(memory_format=torch.channels_last))
    assert ",strided," in module.call_key(z.transpose(-1, -2))


@pytest.mark.parametrize("data", [{"format": 1, "sections": []}, {"format": 2, "sections": "stale"},
                                  {"sections": {}}, {"format": 99, "sections": {}}])
def test_a_cache_file_of_another_format_is_reported_and_tuned_over(tuning, monkeypatch, caplog, data):
    """_read_file: a cache whose format is not CACHE_FORMAT or whose sections are no mapping is "reported and
    replaced" -- never read as entries (a list of sections would fail every later lookup)."""
    module, device = tuning
    tunable = module.TUNABLES[OP]
    monkeypatch.setattr(module, "tunes_on", lambda d: True)
    monkeypatch.setattr(module, "timer", FakeTimer({tunable.candidates[1]: 1.0}))
    logits, _ = features_call(device)
    path = module.cache_path()
    path.parent.mkdir(parents=True)
    key = module.call_key(logits)
    if data.get("format") == 99:  # a well-formed file of a future format, naming another choice
        data["sections"] = {module.device_section(device): {f"{OP}|{key}": tunable.candidates[3].as_dict()}}
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="csl_kernels"):
        assert tunable.pick(key, logits, lambda c: None) == tunable.candidates[1]
    assert "is not valid" in caplog.text
    assert json.loads(path.read_text())["format"] == module.CACHE_FORMAT
