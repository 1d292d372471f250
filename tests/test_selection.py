"""csl.selection: the selection modes of the trainer, and ``confidence_share`` (CSL's share taken by confidence)
against a per-pixel float64 reference written out here."""

from __future__ import annotations

import pytest
import torch
from conftest import require_backend

import csl_kernels
from csl.selection import SELECTION_MODES, Selector, most_confident_at_share
from csl_kernels import IGNORE_INDEX, PCOSResult


def reference_share(logits: torch.Tensor, ignore: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """Per image: rank the valid pixels with a finite float64 confidence, highest first (ties: lower index first),
    keep the first round(sum of weight)."""
    bsz = logits.shape[0]
    conf = torch.softmax(logits.double(), dim=1).amax(dim=1).reshape(bsz, -1)
    selected = torch.zeros_like(conf, dtype=torch.bool)
    for b in range(bsz):
        count = round(float(weight[b].double().sum()))
        eligible = [i for i in range(conf.shape[1]) if torch.isfinite(conf[b, i])
                    and (ignore is None or int(ignore.reshape(bsz, -1)[b, i]) != IGNORE_INDEX)]
        for i in sorted(eligible, key=lambda i: (-float(conf[b, i]), i))[:count]:
            selected[b, i] = True
    return selected.view(weight.shape)


def _pcos_like(weight: torch.Tensor, logits: torch.Tensor) -> PCOSResult:
    return PCOSResult(weight, logits.argmax(dim=1), weight == 1)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 1), (3, 150, 4, 3)])
def test_confidence_share_matches_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=g) * 3
    bsz, _, h, w = shape
    ignore = torch.where(torch.rand((bsz, h, w), generator=g) < 0.2, IGNORE_INDEX, 0).to(torch.uint8)
    weight = torch.rand((bsz, h, w), generator=g) * (ignore != IGNORE_INDEX)
    out = most_confident_at_share(logits, ignore, _pcos_like(weight, logits))
    expected = reference_share(logits, ignore, weight)
    assert torch.equal(out.reliable, expected)
    assert torch.equal(out.weight, expected.float()) and out.weight.dtype == weight.dtype
    assert torch.equal(out.label, logits.argmax(dim=1))
    counts = expected.reshape(bsz, -1).sum(1)
    assert counts.tolist() == [round(float(weight[b].double().sum())) for b in range(bsz)]


def test_confidence_share_adversarial():
    """Ties broken by position, non-finite and ignored pixels never selected, an all-ignored image selects
    nothing, a share above the eligible pixels selects all of them, non-contiguous logits."""
    logits = torch.zeros(3, 4, 2, 3)
    logits[0, 1] = 5.0  # every pixel of image 0 has the same confidence: the first ones are kept
    logits[1, :, 0, 0] = float("nan")
    logits[1, 2, 0, 1] = float("inf")
    logits[1, 0, 1] = torch.tensor([9.0, 8.0, 7.0])
    ignore = torch.zeros(3, 2, 3, dtype=torch.uint8)
    ignore[1, 1, 0] = IGNORE_INDEX  # image 1's most confident pixel
    ignore[2] = IGNORE_INDEX
    weight = torch.tensor([[[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]],  # 2 pixels
                           [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],  # 6, more than image 1's 3 eligible pixels
                           [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    strided = logits.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    out = most_confident_at_share(strided, ignore, _pcos_like(weight, logits))
    assert torch.equal(out.reliable, reference_share(logits, ignore, weight))
    assert out.reliable[0].flatten().tolist() == [True, True, False, False, False, False]
    assert out.reliable[1].flatten().tolist() == [False, False, True, False, True, True]
    assert not out.reliable[2].any()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_selector_confidence_share_takes_csl_share(backend):
    require_backend("pcos_weights", backend)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 9, 11, generator=g) * 4
    ignore = torch.where(torch.rand((2, 9, 11), generator=g) < 0.1, IGNORE_INDEX, 0).to(torch.uint8)
    csl = Selector(mode="csl", backend=backend)(logits, ignore)
    share = Selector(mode="confidence_share", backend=backend)(logits, ignore)
    assert torch.equal(share.reliable, reference_share(logits, ignore, csl.weight))
    assert torch.equal(share.label, csl.label)
    assert share.reliable.any() and not share.reliable.all()
    expected = csl_kernels.pcos_weights(logits, ignore, backend=backend).weight
    assert torch.equal(csl.weight, expected)


def test_every_configurable_selection_mode_selects():
    logits = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 6  # some pixels above 0.95
    for mode in (m for m in SELECTION_MODES if m != "oracle"):  # the oracle reads no logits: below
        selection = Selector(mode=mode, backend="reference")(logits, None)
        assert selection.weight.shape == selection.label.shape == (1, 4, 5), mode
        assert torch.equal(selection.label, logits.argmax(1)), mode
        assert 0 < selection.weight.sum() and bool(((selection.weight >= 0) & (selection.weight <= 1)).all()), mode
        assert selection.reliable.any() and not selection.reliable.all(), mode
    with pytest.raises(ValueError, match="selection mode must be one of"):
        Selector(mode="top_k")


def test_each_mode_is_its_kernel_with_the_papers_settings():
    """csl: PCOS per image (alpha 8, the paper's rule); csl_class: PCOS per predicted class; threshold: tau 0.95.
    The logits are drawn so that each pair of settings compared here selects differently."""
    logits = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(3)) * 3
    ignore = torch.zeros(2, 9, 11, dtype=torch.uint8)
    ignore[:, :2] = IGNORE_INDEX

    def weight(mode: str) -> torch.Tensor:
        return Selector(mode=mode, backend="reference")(logits, ignore).weight

    def pcos(**settings) -> torch.Tensor:
        return csl_kernels.pcos_weights(logits, ignore, backend="reference", **settings).weight

    def threshold(tau: float) -> torch.Tensor:
        return csl_kernels.threshold_weights(logits, ignore, tau=tau, backend="reference").weight

    assert torch.equal(weight("csl"), pcos(alpha=8.0, groups="image", rule="paper"))
    assert torch.equal(weight("csl_class"), pcos(alpha=8.0, groups="class", rule="paper"))
    assert torch.equal(weight("threshold"), threshold(0.95))
    assert not torch.equal(pcos(groups="image"), pcos(groups="class"))
    assert not torch.equal(pcos(alpha=8.0), pcos(alpha=4.0)) and not torch.equal(pcos(), pcos(rule="released"))
    assert not torch.equal(threshold(0.95), threshold(0.9))


@pytest.mark.parametrize("mode", ["csl", "threshold", "oracle"])
@pytest.mark.parametrize(("setting", "message"), [({"alpha": 0.0}, "alpha must be a positive"),
                                                  ({"tau": 1.5}, r"tau must be in \[0, 1\]"),
                                                  ({"rule": "Paper"}, "rule must be one of"),
                                                  ({"confidence": "logit"}, "confidence must be one of")])
def test_selector_checks_every_setting_when_built(mode, setting, message):
    """Also the settings a mode does not read, and when the selector is built, before any step."""
    with pytest.raises(ValueError, match=message):
        Selector(mode=mode, **setting)


@pytest.mark.parametrize(("setting", "message"), [({"tmp_other_view": "Strong"}, "tmp_other_view must be one of"),
                                                  ({"tmp_rate": 1.5}, "tmp_rate must be in"),
                                                  ({"tmp_fraction": -0.1}, "tmp_fraction must be in"),
                                                  ({"cutmix_p": float("nan")}, "cutmix_p must be in"),
                                                  ({"tmp_block": 0}, "tmp_block must be a positive int")])
def test_step_config_checks_its_settings(setting, message):
    """A StepConfig built in code (benchmarks, other trainers) is checked as the config file's keys are: an unknown
    tmp_other_view is an error, not the strong_cutmix branch."""
    from csl.step import StepConfig

    with pytest.raises(ValueError, match=message):
        StepConfig(**setting)
    StepConfig(tmp_other_view="strong", tmp_rate=1.0, tmp_fraction=0.0, cutmix_p=1.0, tmp_block=1)


def test_oracle_takes_the_true_masks():
    """``oracle``: label = the true class at weight 1 where the truth holds one; void, padding and values outside
    [0, C) at weight 0 (label 0), whatever the logits say."""
    logits = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    truth = torch.tensor([[[0, 1, 2, 3, 255], [3, 3, 255, 0, 1], [2, 2, 2, 2, 2]],
                          [[255] * 5, [255] * 5, [255] * 5]])
    out = Selector(mode="oracle")(logits, None, truth=truth)
    known = truth != 255
    assert torch.equal(out.reliable, known) and torch.equal(out.weight, known.float())
    assert torch.equal(out.label, torch.where(known, truth, 0))
    assert out.weight.dtype == torch.float32 and out.label.dtype == truth.dtype
    assert torch.equal(Selector(mode="oracle")(-logits, None, truth=truth).label, out.label)
    four_classes = Selector(mode="oracle")(logits[:, :3], None, truth=truth)  # class 3 is out of range with C = 3
    assert torch.equal(four_classes.reliable, known & (truth < 3))
    with pytest.raises(ValueError, match="oracle.*true masks.*truth="):
        Selector(mode="oracle")(logits, None)


def test_settings_the_selection_mode_does_not_read_are_named(tmp_path):
    from test_train import tiny_config

    from csl.selection import unused_selection_settings
    from csl.trainer import Trainer

    assert unused_selection_settings({"mode": "threshold", "alpha": 4.0, "rule": "paper", "tau": 0.9}) == [
        "selection.alpha=4.0"]
    assert unused_selection_settings({"mode": "csl", "alpha": 4.0, "rule": "released", "tau": 0.9}) == [
        "selection.tau=0.9"]
    assert unused_selection_settings({"mode": "csl_class", "alpha": 8.0, "tau": 0.95}) == []
    assert unused_selection_settings({"mode": "oracle", "alpha": 4.0, "rule": "paper", "tau": 0.9}) == [
        "selection.alpha=4.0", "selection.tau=0.9"]
    Trainer(tiny_config(tmp_path, **{"selection.mode": "threshold", "selection.alpha": 4.0})).close()
    assert "selection.alpha=4.0: not used by selection.mode=threshold" in (tmp_path / "train.log").read_text()


def test_build_selector_defaults_follow_the_spec():
    from csl.selection import build_selector

    sel = build_selector({"mode": "threshold"})
    assert (sel.tau, sel.alpha, sel.rule) == (0.95, 8.0, "paper")


def test_confidence_share_breaks_ties_by_position_in_a_large_image():
    """Ties: the earlier pixel in row-major order, also where torch's unstable sort would reorder them (>= 1000
    pixels on the CPU)."""
    from csl.selection import most_confident_at_share

    logits = torch.zeros(1, 3, 40, 40)
    logits[:, 1] = 2.0  # every pixel has the same confidence
    weight = torch.zeros(1, 40, 40)
    weight.view(-1)[:100] = 1.0
    csl = csl_kernels.PCOSResult(weight, logits.argmax(1), weight == 1)
    out = most_confident_at_share(logits, None, csl)
    assert out.reliable.view(-1)[:100].all() and not out.reliable.view(-1)[100:].any()


def test_the_configured_settings_reach_the_kernels():
    """build_selector's alpha, tau, rule and confidence are the ones the kernels get (not the defaults)."""
    from csl.selection import build_selector

    logits = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(3)) * 3
    ignore = torch.zeros(2, 9, 11, dtype=torch.uint8)
    ignore[:, :2] = IGNORE_INDEX

    def weight(**cfg) -> torch.Tensor:
        return build_selector(cfg, backend="reference")(logits, ignore).weight

    expected = csl_kernels.pcos_weights(logits, ignore, alpha=2.0, rule="released", confidence="prob",
                                        backend="reference").weight
    assert torch.equal(weight(mode="csl", alpha=2.0, rule="released", confidence="prob"), expected)
    assert not torch.equal(expected, csl_kernels.pcos_weights(logits, ignore, backend="reference").weight)
    assert not torch.equal(expected, csl_kernels.pcos_weights(logits, ignore, alpha=2.0, rule="released",
                                                              backend="reference").weight)
    expected = csl_kernels.threshold_weights(logits, ignore, tau=0.6, backend="reference").weight
    assert torch.equal(weight(mode="threshold", tau=0.6), expected)
    assert not torch.equal(expected, csl_kernels.threshold_weights(logits, ignore, backend="reference").weight)
