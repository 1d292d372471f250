"""scripts/camvid_released_parts.py: the released rule's three differences set apart, one at a time."""

from __future__ import annotations

import torch
from conftest import load_script

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
