"""A clean-room float64 NumPy oracle of docs/selection.md, and the backends compared against it.

The oracle functions below were written from the text of docs/selection.md alone (Sec. 1, 2, 2b, 3 and 5), one
image / one group / one pixel at a time, with exact sums (math.fsum) where the contract accumulates in float64.
csl_kernels is imported only for the calls under test.
"""

import math

import numpy as np
import pytest
import torch

import csl_kernels as ck

IGNORE_VALUE = 255
EPS = 1e-8
RANK_ONE_SINGULAR_RATIO = 1e-12
COLLINEAR_SINE_SQUARED = 1e-8


# --------------------------------------------------------------------------------------------------------------------
# The oracle (docs/selection.md)
# --------------------------------------------------------------------------------------------------------------------


def oracle_validity(logits, ignore=None, valid=None):
    """(valid pixels B x H x W, pixels the map marks valid, n_nonfinite per image) of Sec. 1 / Sec. 2's last part."""
    z = np.asarray(logits, dtype=np.float64)
    batch, _, height, width = z.shape
    if ignore is not None:
        marked = np.asarray(ignore).astype(np.int64) != IGNORE_VALUE
    elif valid is not None:
        marked = np.asarray(valid, dtype=bool)
    else:
        marked = np.ones((batch, height, width), dtype=bool)
    finite = np.isfinite(z).all(axis=1)
    # n_nonfinite counts ignored pixels too (docs/selection.md: "counted in n_nonfinite", ignored or not)
    return marked & finite, marked, (~finite).sum(axis=(1, 2))


def default_confidence(rule):
    return "log" if rule == "released" else "prob"


def oracle_pixel_features(z_n, rule="paper", confidence=None):
    """(f0, v, pseudo-label k') of one pixel's finite logits z_n (C,), Sec. 1 (rule="paper") or Sec. 2b."""
    z_n = np.asarray(z_n, dtype=np.float64)
    num_classes = z_n.shape[0]
    # the first maximum of p in exact arithmetic, i.e. of the logits: two logits closer than exp's rounding tie in the
    # rounded p, and the larger one is still the pseudo-label (docs/selection.md leaves open which p ties)
    top = int(np.argmax(z_n))
    others = np.delete(np.arange(num_classes), top)
    exponentials = np.exp(z_n[others] - z_n[top])
    residual_ratio = math.fsum(exponentials)  # R
    pmax = 1.0 / (1.0 + residual_ratio)
    residual_mass = residual_ratio / (1.0 + residual_ratio)  # r = R / (1 + R)
    residual_probabilities = exponentials / (1.0 + residual_ratio)
    residual_mean = residual_mass / (num_classes - 1)
    squared_deviations = [(p - residual_mean) ** 2 for p in residual_probabilities]
    if rule == "released":
        squared_deviations.append(residual_mean**2)  # the max slot, set to 0
    variance = math.fsum(squared_deviations) / (num_classes - 1)
    penalty = (num_classes - 1) ** 2 / (2.0 * (residual_mass + EPS))
    dispersion = -penalty * variance
    confidence = confidence or default_confidence(rule)
    f0 = -math.log1p(residual_ratio) if confidence == "log" else pmax  # log(pmax) = -log1p(R)
    return f0, dispersion, top


def oracle_features(logits, ignore=None, valid=None, rule="paper", confidence=None):
    """f0, v (B x H x W float64, NaN at invalid pixels: the contract says nothing there), label, valid."""
    z = np.asarray(logits, dtype=np.float64)
    valid_map, _, _ = oracle_validity(z, ignore, valid)
    batch, _, height, width = z.shape
    f0 = np.full((batch, height, width), np.nan)
    dispersion = np.full((batch, height, width), np.nan)
    label = np.zeros((batch, height, width), dtype=np.int64)
    for b, y, x in zip(*np.nonzero(valid_map), strict=True):
        f0[b, y, x], dispersion[b, y, x], label[b, y, x] = oracle_pixel_features(z[b, :, y, x], rule, confidence)
    return f0, dispersion, label, valid_map


def _unit_eigenvector(a, b, c, eigenvalue, first):
    """Sec. 2 step 2: the better-conditioned of (b, lambda - a) and (lambda - c, b); axis-aligned when b == 0."""
    if b == 0.0:
        first_axis = 0 if a >= c else 1
        axis = first_axis if first else 1 - first_axis
        return np.eye(2)[axis]
    candidates = [np.array([b, eigenvalue - a]), np.array([eigenvalue - c, b])]
    best = max(candidates, key=lambda vector: math.hypot(*vector))
    return best / math.hypot(*best)


def oracle_pcos_group(f0, f1, rule="paper", alpha=8.0):
    """PCOS of one group's features (Sec. 2 steps 1-6, Sec. 2b's preservation side): weights and statistics."""
    f0 = np.asarray(f0, dtype=np.float64)
    f1 = np.asarray(f1, dtype=np.float64)
    n = f0.shape[0]
    result = {
        "weight": np.zeros(n),
        "cluster": np.zeros(n, dtype=np.int64),
        "mu": np.zeros((2, 2)),
        "var": np.zeros((2, 2)),
        "count": np.zeros(2, dtype=np.int64),
        "eigenvalues": np.zeros(2),
        "chosen": 0,
        "rank_one": True,
    }
    if n == 0:
        return result
    a = math.fsum(f0 * f0)
    b = math.fsum(f0 * f1)
    c = math.fsum(f1 * f1)
    lambda_1 = (a + c) / 2 + math.sqrt(((a - c) / 2) ** 2 + b * b)
    determinant = a * c - b * b
    lambda_2 = max(determinant, 0.0) / lambda_1 if lambda_1 > 0 else 0.0
    result["eigenvalues"] = np.array([lambda_1, lambda_2])
    s_1, s_2 = math.sqrt(lambda_1), math.sqrt(lambda_2)
    rank_one = s_2 <= RANK_ONE_SINGULAR_RATIO * s_1 or determinant <= COLLINEAR_SINE_SQUARED * a * c
    result["rank_one"] = rank_one
    cluster = np.zeros(n, dtype=np.int64)
    if not rank_one:
        u_1 = _unit_eigenvector(a, b, c, lambda_1, first=True)
        u_2 = _unit_eigenvector(a, b, c, lambda_2, first=False)
        # argmax_i |u_i . phi| / s_i does not change when phi is scaled: each pixel's phi scaled to a largest
        # component of 1 first, so that features of ~1e-320 (log confidence at logit gaps of ~740) do not underflow
        pixel_scale = np.maximum(np.abs(f0), np.abs(f1))
        pixel_scale[pixel_scale == 0] = 1.0
        x, y = f0 / pixel_scale, f1 / pixel_scale
        v_1 = np.abs(u_1[0] * x + u_1[1] * y) / s_1
        v_2 = np.abs(u_2[0] * x + u_2[1] * y) / s_2
        cluster = (v_2 > v_1).astype(np.int64)  # ties: cluster 0
    result["cluster"] = cluster
    features = np.stack([f0, f1], axis=1)
    for k in range(2):
        members = features[cluster == k]
        result["count"][k] = members.shape[0]
        if members.shape[0] == 0:
            continue
        mean = np.array([math.fsum(members[:, i]) / members.shape[0] for i in range(2)])
        result["mu"][k] = mean
        if members.shape[0] > 1:
            result["var"][k] = [
                math.fsum((members[:, i] - mean[i]) ** 2) / (members.shape[0] - 1) for i in range(2)
            ]
    chosen = 0
    if result["count"][1] > 0 and (result["count"][0] == 0 or result["mu"][1, 0] > result["mu"][0, 0]):
        chosen = 1
    result["chosen"] = chosen
    mu, var = result["mu"][chosen], result["var"][chosen]
    z_0 = (f0 - mu[0]) / math.sqrt(var[0] + EPS)
    z_1 = (f1 - mu[1]) / math.sqrt(var[1] + EPS)
    weight = np.exp(-(z_0**2 + z_1**2) / alpha)
    dispersion_side = f1 < mu[1] if rule == "released" else f1 > mu[1]
    weight[(f0 > mu[0]) | dispersion_side] = 1.0
    result["weight"] = weight
    return result


def oracle_pcos(logits, ignore=None, valid=None, alpha=8.0, groups="image", rule="paper", confidence=None,
                features=None):
    """pcos_weights of the contract: weight (float32), label, reliable, stats (dict of numpy arrays).

    features: optional (f0, v) B x H x W to run Sec. 2 on (for float32 logits, whose features are float32).
    """
    z = np.asarray(logits, dtype=np.float64)
    batch, num_classes, height, width = z.shape
    f0, dispersion, label, valid_map = oracle_features(z, ignore, valid, rule, confidence)
    if features is not None:
        f0 = np.where(valid_map, np.asarray(features[0], dtype=np.float64), np.nan)
        dispersion = np.where(valid_map, np.asarray(features[1], dtype=np.float64), np.nan)
    _, _, n_nonfinite = oracle_validity(z, ignore, valid)
    group_shape = (batch,) if groups == "image" else (batch, num_classes)
    stats = {
        "mu": np.zeros(group_shape + (2, 2)),
        "var": np.zeros(group_shape + (2, 2)),
        "count": np.zeros(group_shape + (2,), dtype=np.int64),
        "eigenvalues": np.zeros(group_shape + (2,)),
        "chosen": np.zeros(group_shape, dtype=np.int64),
        "n_nonfinite": n_nonfinite,
    }
    weight = np.zeros((batch, height, width))
    group_indices = [(b,) for b in range(batch)]
    if groups == "class":
        group_indices = [(b, k) for b in range(batch) for k in range(num_classes)]
    for index in group_indices:
        members = valid_map[index[0]].copy()
        if groups == "class":
            members &= label[index[0]] == index[1]
        group = oracle_pcos_group(f0[index[0]][members], dispersion[index[0]][members], rule, alpha)
        weight[index[0]][members] = group["weight"]
        for key in ("mu", "var", "count", "eigenvalues", "chosen"):
            stats[key][index] = group[key]
    weight32 = weight.astype(np.float32)
    reliable = (weight32 == 1.0) & valid_map
    return weight32, label, reliable, stats


def oracle_threshold(logits, ignore=None, valid=None, tau=0.95):
    """Sec. 3: w = [pmax >= tau] & valid (float32), the pseudo-label, reliable."""
    f0, _, label, valid_map = oracle_features(logits, ignore, valid, "paper", "prob")
    weight = (np.where(valid_map, f0, -np.inf) >= tau).astype(np.float32)
    return weight, label, (weight == 1.0) & valid_map


def oracle_weighted_cross_entropy(logits, label, weight, ignore=None, valid=None):
    """Sec. 5: (loss, dL/dz) in float64; N_valid = pixels the map marks valid."""
    z = np.asarray(logits, dtype=np.float64)
    label = np.asarray(label)
    weight = np.asarray(weight, dtype=np.float64)
    _, marked, _ = oracle_validity(np.zeros_like(z), ignore, valid)
    n_valid = int(marked.sum())
    gradient = np.zeros_like(z)
    if n_valid == 0:  # 0 / 0 in the contract; the package gives loss 0 and a zero gradient (not in the text)
        return 0.0, gradient
    terms = []
    for b, y, x in zip(*np.nonzero(marked & (weight != 0)), strict=True):
        z_n, w_n, y_n = z[b, :, y, x], weight[b, y, x], int(label[b, y, x])
        top = z_n.max()
        log_sum_shifted = math.log(math.fsum(np.exp(z_n - top)))  # log-sum-exp - max, kept apart from the max
        terms.append(w_n * ((top - z_n[y_n]) + log_sum_shifted))
        softmax = np.exp((z_n - top) - log_sum_shifted)
        onehot = np.eye(z_n.shape[0])[y_n]
        gradient[b, :, y, x] = w_n * (softmax - onehot) / n_valid
    return math.fsum(terms) / n_valid, gradient


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def random_logits(seed, batch, num_classes, height, width, layout="contiguous", dtype=torch.float64):
    """Logits with a spread of confidences: per-pixel scales from 0.3 to 12 and a boosted class at some pixels."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.3, 1.0, 3.0, 6.0, 12.0], size=(batch, 1, height, width))
    z = rng.standard_normal((batch, num_classes, height, width)) * scale
    boost = rng.integers(0, num_classes, size=(batch, height, width))
    boosted = np.take_along_axis(z, boost[:, None], 1) + rng.uniform(0, 6, (batch, 1, height, width))
    np.put_along_axis(z, boost[:, None], boosted, 1)
    if layout == "channels_last":
        return torch.from_numpy(np.ascontiguousarray(z.transpose(0, 2, 3, 1))).to(dtype).permute(0, 3, 1, 2)
    if layout == "strided":
        wide = np.repeat(z, 2, axis=3)
        wide[..., 1::2] = np.nan  # never read: a backend that ignores the strides reads NaN
        return torch.from_numpy(wide).to(dtype)[..., ::2]
    return torch.from_numpy(z).to(dtype)


def random_ignore(seed, batch, height, width, fraction=0.2, dtype=torch.uint8, all_ignored_image=None):
    rng = np.random.default_rng(seed + 1000)
    ignore = np.where(rng.random((batch, height, width)) < fraction, IGNORE_VALUE,
                      rng.integers(0, 21, (batch, height, width)))
    if all_ignored_image is not None:
        ignore[all_ignored_image] = IGNORE_VALUE
    return torch.from_numpy(ignore).to(dtype)


def to_numpy(tensor):
    return None if tensor is None else tensor.detach().to("cpu").numpy()


def assert_close_at(actual, expected, mask, rtol, atol, what):
    actual = np.asarray(actual, dtype=np.float64)[mask]
    expected = np.asarray(expected, dtype=np.float64)[mask]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def assert_pcos_matches(result, expected, stats_rtol=1e-12, weight_atol=2e-7, var_atol=1e-30):
    """var_atol: absolute error of the variances relative to the squared feature scale. The reference's are exact to
    ~1e-32 (1e-30); the extension's shifted sums, shifted by the group's mean rather than the cluster's, lose
    ~1e-16 x (cluster mean - group mean)^2 (1e-15), which sqrt(var + 1e-8) does not see."""
    weight, label, reliable, stats = expected
    assert result.weight.dtype == torch.float32
    assert result.label.dtype == torch.int64
    assert result.reliable.dtype == torch.bool
    np.testing.assert_array_equal(to_numpy(result.label), label)
    np.testing.assert_allclose(to_numpy(result.weight), weight, rtol=0, atol=weight_atol)
    np.testing.assert_array_equal(to_numpy(result.reliable), reliable)
    if result.stats is None:
        return
    np.testing.assert_array_equal(to_numpy(result.stats.count), stats["count"])
    np.testing.assert_array_equal(to_numpy(result.stats.chosen), stats["chosen"])
    np.testing.assert_array_equal(to_numpy(result.stats.n_nonfinite), stats["n_nonfinite"])
    # absolute tolerances: rounding at the scale of the features (a variance of identical values is ~1e-32, not 0);
    # a variance's error from its features' rounding (~1e-16 |mu|) is ~1e-16 |mu| sqrt(var) per pixel
    feature_scale = np.abs(stats["mu"]).max(initial=0.0)
    absolute = {"mu": 1e-15 * feature_scale,
                "var": var_atol * feature_scale**2 + 1e-14 * np.abs(stats["mu"]) * np.sqrt(stats["var"]),
                "eigenvalues": stats_rtol * np.abs(stats["eigenvalues"]).max(initial=0.0) * 1e-3}
    for key in ("mu", "var", "eigenvalues"):
        actual = to_numpy(getattr(result.stats, key))
        assert actual.dtype == np.float64, key
        np.testing.assert_array_less(np.abs(actual - stats[key]), stats_rtol * np.abs(stats[key]) + absolute[key]
                                     + 1e-300, err_msg=key)


# --------------------------------------------------------------------------------------------------------------------
# The oracle against itself: hand-computed values of the contract
# --------------------------------------------------------------------------------------------------------------------


def test_oracle_features_by_hand():
    # p = (0.5, 0.25, 0.25): even residual, v = 0; p = (0.5, 0.5, 0) beats nothing: v < 0 (Sec. E.1 of the paper)
    f0, v, k = oracle_pixel_features(np.log([0.5, 0.25, 0.25]))
    assert (k, f0, v) == (0, pytest.approx(0.5, rel=1e-15), pytest.approx(0.0, abs=1e-16))
    f0, v, k = oracle_pixel_features(np.log([0.25, 0.5, 0.25 - 1e-9, 1e-9]))
    assert k == 1 and v < 0
    # released: var + m^2 / (C - 1) with m = 0.25, C = 3, g = 4 / (2 (0.5 + eps))
    _, v_released, _ = oracle_pixel_features(np.log([0.5, 0.25, 0.25]), rule="released")
    assert v_released == pytest.approx(-4 / (2 * (0.5 + EPS)) * 0.25**2 / 2, rel=1e-14)
    # ties: lowest index; C = 2: v = 0 under the paper's rule
    assert oracle_pixel_features(np.array([1.0, 1.0, 0.0]))[2] == 0
    assert oracle_pixel_features(np.array([0.3, 2.0]))[1] == 0.0


# --------------------------------------------------------------------------------------------------------------------
# residual_features
# --------------------------------------------------------------------------------------------------------------------

SHAPES = [(1, 3, 5, 7), (2, 2, 4, 6), (3, 21, 5, 4), (2, 150, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rule,confidence", [("paper", None), ("paper", "log"), ("released", None),
                                             ("released", "prob")])
def test_residual_features_match_oracle(shape, rule, confidence):
    layout = ["contiguous", "channels_last", "strided"][sum(shape) % 3]
    logits = random_logits(sum(shape), *shape, layout=layout)
    ignore = random_ignore(sum(shape), shape[0], shape[2], shape[3],
                           all_ignored_image=shape[0] - 1 if shape[0] > 1 else None)
    result = ck.residual_features(logits, ignore, rule=rule, confidence=confidence, backend="reference")
    f0, v, label, valid = oracle_features(to_numpy(logits), to_numpy(ignore), rule=rule, confidence=confidence)
    assert valid.any() and not valid.all()
    assert result.f0.dtype == torch.float64 and result.v.dtype == torch.float64 and result.label.dtype == torch.int64
    np.testing.assert_array_equal(to_numpy(result.label)[valid], label[valid])
    assert_close_at(to_numpy(result.f0), f0, valid, 1e-13, 1e-300, "f0")
    assert_close_at(to_numpy(result.v), v, valid, 1e-12, 1e-300, "v")
    assert np.all(to_numpy(result.v)[valid] <= 0)
    # ignored pixels: (f0, v, label) = (0, 0, 0) (the function's docstring; docs/selection.md Sec. 1)
    for output in result:
        assert not to_numpy(output)[~valid].any()


def test_residual_features_adversarial_pixels():
    pixels = np.array([
        [0.0, 0.0, 0.0, 0.0],  # uniform: k' = 0, pmax = 1/4, v = 0
        [3.0, 3.0, -1.0, 0.5],  # tie at the max: the lowest index
        [60.0, 0.0, -5.0, 2.0],  # saturated: pmax = 1 in float64, r ~ 1e-26 from R / (1 + R), not 1 - pmax = 0
        [800.0, 0.0, -700.0, 799.0],  # huge logits, finite: softmax from the shifted logits
        [-1e4, -1e4 - 1.0, -1e4 - 2.0, -1e4 - 3.0],
        [1.0, 1.0 - 1e-9, 1.0 - 2e-9, -30.0],  # near-even residual: the two-pass variance
    ])
    logits = torch.from_numpy(pixels.T.reshape(1, 4, 1, -1).copy())
    for rule in ("paper", "released"):
        result = ck.residual_features(logits, None, rule=rule, backend="reference")
        f0, v, label, valid = oracle_features(to_numpy(logits), rule=rule)
        np.testing.assert_array_equal(to_numpy(result.label), label)
        np.testing.assert_allclose(to_numpy(result.f0), f0, rtol=1e-13, atol=1e-300)
        np.testing.assert_allclose(to_numpy(result.v), v, rtol=1e-11, atol=1e-300)
    # the saturated pixel's residual mass is not lost: v is a tiny negative number, not 0
    assert to_numpy(result.v)[0, 0, 2] < 0
    assert label[0, 0, 0] == 0 and label[0, 0, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_residual_features_low_precision_logits_close_to_oracle(dtype):
    logits = random_logits(5, 2, 7, 6, 5, dtype=dtype)
    result = ck.residual_features(logits, None, backend="reference")
    f0, v, label, _ = oracle_features(logits.to(torch.float64).numpy())
    np.testing.assert_array_equal(to_numpy(result.label), label)
    np.testing.assert_allclose(to_numpy(result.f0).astype(np.float64), f0, rtol=2e-6)
    np.testing.assert_allclose(to_numpy(result.v).astype(np.float64), v, rtol=1e-4, atol=1e-6 * np.abs(v).max())


# --------------------------------------------------------------------------------------------------------------------
# pcos_weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("groups", ["image", "class"])
@pytest.mark.parametrize("rule,confidence,alpha", [("paper", None, 8.0), ("paper", "log", 64.0),
                                                   ("released", None, 8.0), ("released", "prob", 2.0)])
def test_pcos_weights_match_oracle(shape, groups, rule, confidence, alpha):
    seed = sum(shape) * 7 + len(groups)
    layout = ["contiguous", "channels_last", "strided"][seed % 3]
    logits = random_logits(seed, *shape, layout=layout)
    ignore = random_ignore(seed, shape[0], shape[2], shape[3], all_ignored_image=1 if shape[0] == 3 else None)
    result = ck.pcos_weights(logits, ignore, alpha=alpha, groups=groups, rule=rule, confidence=confidence,
                             return_stats=True, backend="reference")
    expected = oracle_pcos(to_numpy(logits), to_numpy(ignore), alpha=alpha, groups=groups, rule=rule,
                           confidence=confidence)
    assert_pcos_matches(result, expected)


@pytest.mark.parametrize("seed", range(6))
def test_pcos_weights_many_pixels_split_into_two_clusters(seed):
    """Larger images: both clusters populated, Gaussian weights strictly between 0 and 1 at some pixels."""
    logits = random_logits(100 + seed, 2, 21, 12, 11)
    for rule in ("paper", "released"):
        result = ck.pcos_weights(logits, None, rule=rule, return_stats=True, backend="reference")
        expected = oracle_pcos(to_numpy(logits), rule=rule)
        assert_pcos_matches(result, expected)
        assert (expected[3]["count"] > 0).all()
        assert ((expected[0] > 0) & (expected[0] < 1)).any()


def test_pcos_weights_from_float32_features():
    """float32 logits: float32 features; Sec. 2 on those features, accumulated in float64."""
    logits = random_logits(11, 3, 21, 9, 8, dtype=torch.float32)
    ignore = random_ignore(11, 3, 9, 8)
    for groups in ("image", "class"):
        for rule in ("paper", "released"):
            features = ck.residual_features(logits, ignore, rule=rule, backend="reference")
            assert features.f0.dtype == torch.float32
            result = ck.pcos_weights(logits, ignore, groups=groups, rule=rule, return_stats=True, backend="reference")
            expected = oracle_pcos(logits.double().numpy(), to_numpy(ignore), groups=groups, rule=rule,
                                   features=(to_numpy(features.f0), to_numpy(features.v)))
            assert_pcos_matches(result, expected, stats_rtol=1e-9, weight_atol=1e-6)


def _pixels(rows, batch_of=1):
    """B x C x 1 x N logits from N rows of C logits."""
    array = np.asarray(rows, dtype=np.float64)
    return torch.from_numpy(np.ascontiguousarray(array.T.reshape(1, array.shape[1], 1, -1))).repeat(batch_of, 1, 1, 1)


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_pcos_degenerate_groups(rule):
    # one valid pixel: rank one, count (1, 0), var 0, weight 1 (phi = mu)
    one = _pixels([[2.0, 0.5, -1.0]])
    result = ck.pcos_weights(one, None, rule=rule, return_stats=True, backend="reference")
    expected = oracle_pcos(to_numpy(one), rule=rule)
    assert_pcos_matches(result, expected)
    assert expected[3]["count"].tolist() == [[1, 0]] and expected[0].tolist() == [[[1.0]]]
    assert to_numpy(result.stats.eigenvalues)[0, 1] == 0.0  # lambda_2 = 0 exactly for one pixel (Sec. 2 step 2)
    # identical pixels: rank one, every weight 1
    same = _pixels([[2.0, 0.5, -1.0, 0.25]] * 9)
    result = ck.pcos_weights(same, None, rule=rule, return_stats=True, backend="reference")
    assert_pcos_matches(result, oracle_pcos(to_numpy(same), rule=rule))
    assert to_numpy(result.weight).min() == 1.0 and to_numpy(result.stats.count).tolist() == [[9, 0]]
    # C = 2 under the paper's rule: v = 0, rank one
    two = random_logits(3, 2, 2, 4, 5)
    result = ck.pcos_weights(two, None, rule=rule, return_stats=True, backend="reference")
    assert_pcos_matches(result, oracle_pcos(to_numpy(two), rule=rule))
    if rule == "paper":
        assert (to_numpy(result.stats.count)[:, 1] == 0).all()


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_pcos_class_groups_with_one_class_present_and_tiny_groups(rule):
    rng = np.random.default_rng(7)
    z = rng.standard_normal((2, 5, 4, 4))
    z[0, 3] += 20.0  # image 0: class 3 everywhere
    z[1, 1, 0, 0] += 30.0  # image 1: class 1 at one pixel only (a group of size 1)
    z[1, 4, 1:, :] += 15.0
    logits = torch.from_numpy(z)
    result = ck.pcos_weights(logits, None, groups="class", rule=rule, return_stats=True, backend="reference")
    expected = oracle_pcos(z, groups="class", rule=rule)
    assert_pcos_matches(result, expected)
    counts = expected[3]["count"].sum(-1)
    assert counts[0].tolist() == [0, 0, 0, 16, 0] and counts[1, 1] == 1


def test_pcos_all_ignored_and_nonfinite_pixels():
    logits = random_logits(21, 3, 4, 5, 6)
    logits[0, 2, 1, 1] = float("nan")
    logits[0, 0, 2, 3] = float("inf")
    logits[0, 1, 4, 5] = -float("inf")
    logits[2, :, 0, 0] = float("nan")
    logits[1, 0, 0, 0] = float("nan")  # in the ignored image
    ignore = torch.zeros(3, 5, 6, dtype=torch.int64)
    ignore[1] = IGNORE_VALUE
    ignore[2, 0, 1] = IGNORE_VALUE
    for groups in ("image", "class"):
        result = ck.pcos_weights(logits, ignore, groups=groups, return_stats=True, backend="reference")
        expected = oracle_pcos(to_numpy(logits), to_numpy(ignore), groups=groups)
        assert_pcos_matches(result, expected)
        assert to_numpy(result.stats.n_nonfinite).tolist() == [3, 1, 1]  # the NaN pixel of the ignored image 1 too
        weight = to_numpy(result.weight)
        assert not np.isnan(weight).any() and weight[1].max() == 0 and weight[0, 1, 1] == 0
        assert to_numpy(result.label)[1].max() == 0 and to_numpy(result.label)[0, 1, 1] == 0


def test_pcos_saturated_logits_tie_at_confidence_one():
    """pmax == 1 in float64 at most pixels: f0 ties with mu[0]; dispersions of ~1e-20 that differ."""
    rng = np.random.default_rng(4)
    z = rng.standard_normal((2, 6, 5, 5))
    z[:, 2] += rng.uniform(40, 60, (2, 5, 5))
    z[1, :, :2] = rng.standard_normal((6, 2, 5))  # image 1: some uncertain pixels beside the saturated ones
    for rule in ("paper", "released"):
        for groups in ("image", "class"):
            result = ck.pcos_weights(torch.from_numpy(z), None, rule=rule, groups=groups, return_stats=True,
                                     backend="reference")
            assert_pcos_matches(result, oracle_pcos(z, rule=rule, groups=groups))


def test_pcos_tie_of_the_clusters_mean_confidence_chooses_cluster_0():
    """float32 logits with p_max = 1 exactly at every pixel and dispersions of ~1e-9 that differ: two clusters (only
    the first cut applies, s_2 / s_1 ~ 1e-9) whose mean confidences tie at 1: c* = 0 (Sec. 2 step 5)."""
    rng = np.random.default_rng(0)
    z = np.zeros((1, 3, 1, 40), dtype=np.float32)
    z[0, 0, 0] = rng.uniform(17.5, 18.5, 40)
    z[0, 2, 0] = rng.uniform(-3, 0, 40)
    logits = torch.from_numpy(z)
    features = ck.residual_features(logits, None, backend="reference")
    assert (features.f0 == 1).all()
    result = ck.pcos_weights(logits, None, return_stats=True, backend="reference")
    expected = oracle_pcos(z.astype(np.float64), features=(to_numpy(features.f0), to_numpy(features.v)))
    assert_pcos_matches(result, expected, stats_rtol=1e-9, weight_atol=1e-6)
    stats = expected[3]
    assert (stats["count"] > 0).all() and stats["mu"][0, 0, 0] == stats["mu"][0, 1, 0] == 1.0
    assert to_numpy(result.stats.chosen).tolist() == [0]


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_pcos_preservation_is_strict_at_a_tie_with_the_mean_confidence(rule):
    """float32 logits whose residual mass is 1/2 split differently: p_max = 0.5 exactly at every pixel, so f0 equals
    mu[0]; a pixel is kept at weight 1 only for its dispersion (phi[0] > mu[0] is strict), the others get the
    Gaussian weight."""
    splits = [(0.5, 0.5), (0.9, 0.1), (0.7, 0.3), (0.99, 0.01), (0.6, 0.4), (0.8, 0.2)]
    logits = _pixels([[0.0, math.log(high), math.log(low)] for high, low in splits]).float()
    features = ck.residual_features(logits, None, rule=rule, confidence="prob", backend="reference")
    assert (features.f0 == 0.5).all()
    result = ck.pcos_weights(logits, None, rule=rule, confidence="prob", return_stats=True, backend="reference")
    expected = oracle_pcos(logits.double().numpy(), rule=rule, confidence="prob",
                           features=(to_numpy(features.f0), to_numpy(features.v)))
    assert_pcos_matches(result, expected, stats_rtol=1e-9, weight_atol=1e-6)
    assert (expected[3]["mu"][0, :, 0] == 0.5).all()
    assert 0 < expected[0].min() < 0.9 and expected[2].sum() < len(splits)


def test_pcos_group_of_zero_features():
    """log confidence at logits 800 apart: f0 = log(1) = 0 and v = 0 at every pixel, G = 0: rank one, weight 1."""
    logits = _pixels([[1000.0, 0.0, 0.0], [900.0, 0.0, -5.0], [0.0, 800.0, 0.0]])
    for rule, confidence in (("released", None), ("paper", "log")):
        result = ck.pcos_weights(logits, None, rule=rule, confidence=confidence, return_stats=True,
                                 backend="reference")
        expected = oracle_pcos(to_numpy(logits), rule=rule, confidence=confidence)
        assert_pcos_matches(result, expected)
        assert to_numpy(result.stats.eigenvalues).tolist() == [[0.0, 0.0]]
        assert to_numpy(result.weight).tolist() == [[[1.0, 1.0, 1.0]]]


def test_pseudo_label_of_logits_closer_than_the_rounding_of_p():
    """Logits one ulp apart have equal rounded p: the pseudo-label is still the larger logit's (p's exact argmax)."""
    for dtype, low in ((np.float64, np.float64(0.01)), (np.float32, np.float32(0.1))):
        high = np.nextafter(low, dtype(1))
        logits = torch.from_numpy(np.array([low, high, -3.0], dtype=dtype).reshape(1, 3, 1, 1))
        probabilities = torch.softmax(logits, dim=1).flatten()
        assert probabilities[0] == probabilities[1]
        assert oracle_features(logits.double().numpy())[2].item() == 1
        assert ck.residual_features(logits, None, backend="reference").label.item() == 1
        assert ck.pcos_weights(logits, None, backend="reference").label.item() == 1


def test_pcos_valid_map_equals_ignore_map():
    logits = random_logits(31, 2, 21, 6, 7)
    ignore = random_ignore(31, 2, 6, 7, fraction=0.4, dtype=torch.int32)
    by_ignore = ck.pcos_weights(logits, ignore, return_stats=True, backend="reference")
    by_valid = ck.pcos_weights(logits, valid=ignore != IGNORE_VALUE, return_stats=True, backend="reference")
    expected = oracle_pcos(to_numpy(logits), valid=to_numpy(ignore) != IGNORE_VALUE)
    assert_pcos_matches(by_ignore, expected)
    assert_pcos_matches(by_valid, expected)


def test_ignore_values_other_than_255_are_valid():
    logits = random_logits(41, 1, 3, 2, 3)
    ignore = torch.tensor([[[0, 256, -1], [255, 254, 1000]]], dtype=torch.int16)
    result = ck.pcos_weights(logits, ignore, return_stats=True, backend="reference")
    assert to_numpy(result.stats.count).sum() == 5
    assert_pcos_matches(result, oracle_pcos(to_numpy(logits), to_numpy(ignore)))


@pytest.mark.parametrize("bad", ["int8", "bool", "float", "both", "one_class"])
def test_invalid_inputs_refused(bad):
    logits = random_logits(1, 2, 3, 4, 4)
    ignore = torch.zeros(2, 4, 4, dtype=torch.uint8)
    kwargs = {}
    if bad == "int8":
        ignore = ignore.to(torch.int8)
    elif bad == "bool":
        ignore = ignore.bool()
    elif bad == "float":
        ignore = ignore.float()
    elif bad == "both":
        kwargs["valid"] = torch.ones(2, 4, 4, dtype=torch.bool)
    else:
        logits = logits[:, :1]
    for op in (ck.residual_features, ck.pcos_weights, ck.threshold_weights):
        with pytest.raises((ValueError, TypeError)):
            op(logits, ignore, backend="reference", **kwargs)


@pytest.mark.xfail(strict=True, reason="the reference compares |u_2 . phi| s_1 > |u_1 . phi| s_2, which underflows "
                   "to 0 > 0 for features of ~1e-320 (float64 logits ~740 apart, log confidence): cluster 0")
def test_pcos_assignment_of_features_near_the_underflow():
    """argmax_i |u_i . phi| / s_i does not depend on the scale of phi; a pixel at logit gaps of 738 and 745 (f0 ~
    -3e-321, v = 0) goes where a pixel (-1, 0) would: cluster 1 here."""
    logits = _pixels([[0.0, -20.0, -24.0], [0.0, -19.0, -26.0], [0.0, -21.0, -22.0], [0.0, -738.0, -745.0]])
    result = ck.pcos_weights(logits, None, confidence="log", return_stats=True, backend="reference")
    expected = oracle_pcos(to_numpy(logits), confidence="log")
    assert expected[3]["count"].tolist() == [[1, 3]]
    assert to_numpy(result.stats.count).tolist() == [[1, 3]]


# --------------------------------------------------------------------------------------------------------------------
# threshold_weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.95, 1.0])
def test_threshold_weights_match_oracle(tau):
    logits = random_logits(int(tau * 100), 2, 5, 6, 7, layout="channels_last")
    # exact ties: pmax = 1/2 (C = 2 equal logits would be a tie: here two equal leaders and -inf-like others),
    # pmax = 1 (saturated)
    logits[0, :, 0, 0] = torch.tensor([0.0, 0.0, -800.0, -800.0, -800.0], dtype=torch.float64)
    logits[0, :, 0, 1] = torch.tensor([0.0, 50.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    logits[1, 3, 2, 2] = float("nan")
    ignore = random_ignore(3, 2, 6, 7)
    ignore[0, 0, :2] = 0
    result = ck.threshold_weights(logits, ignore, tau=tau, backend="reference")
    weight, label, reliable = oracle_threshold(to_numpy(logits), to_numpy(ignore), tau=tau)
    assert result.weight.dtype == torch.float32
    np.testing.assert_array_equal(to_numpy(result.weight), weight)
    np.testing.assert_array_equal(to_numpy(result.label), label)
    np.testing.assert_array_equal(to_numpy(result.reliable), reliable)
    assert weight[0, 0, 1] == 1.0 and (weight[0, 0, 0] == 1.0) == (tau <= 0.5)


# --------------------------------------------------------------------------------------------------------------------
# weighted_cross_entropy
# --------------------------------------------------------------------------------------------------------------------


def _cross_entropy_case(seed, shape, layout):
    batch, num_classes, height, width = shape
    logits = random_logits(seed, *shape, layout=layout)
    rng = np.random.default_rng(seed + 5)
    label = torch.from_numpy(rng.integers(0, num_classes, (batch, height, width)))
    weight = torch.from_numpy(rng.choice([0.0, 0.25, 1.0, -0.5, 0.9], size=(batch, height, width))).float()
    ignore = random_ignore(seed, batch, height, width)
    # unused pixels may carry anything: a label out of range, NaN logits
    unused = (weight == 0) | (ignore == IGNORE_VALUE)
    label[unused] = 1000
    return logits, label, weight, ignore


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weighted_cross_entropy_matches_oracle(shape):
    layout = ["contiguous", "channels_last", "strided"][sum(shape) % 3]
    logits, label, weight, ignore = _cross_entropy_case(sum(shape), shape, layout)
    logits = logits.detach().clone().requires_grad_(True)
    with torch.no_grad():
        unused = ((weight == 0) | (ignore == IGNORE_VALUE))[:, None].expand_as(logits)
        logits[unused] = float("nan")
    loss = ck.weighted_cross_entropy(logits, label, weight, ignore, backend="reference")
    loss.backward()
    expected_loss, expected_gradient = oracle_weighted_cross_entropy(to_numpy(logits), to_numpy(label),
                                                                     to_numpy(weight), to_numpy(ignore))
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-13, abs=1e-300)
    np.testing.assert_allclose(to_numpy(logits.grad), expected_gradient, rtol=1e-12, atol=1e-17)


def test_weighted_cross_entropy_uses_map_count_not_weight_sum():
    logits = torch.zeros(1, 3, 1, 4, dtype=torch.float64, requires_grad=True)
    label = torch.zeros(1, 1, 4, dtype=torch.int64)
    weight = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    loss = ck.weighted_cross_entropy(logits, label, weight, None, backend="reference")
    assert loss.item() == pytest.approx(math.log(3) / 4, rel=1e-15)


def test_weighted_cross_entropy_without_valid_pixels_and_with_nonfinite_unused_logits():
    """N_valid counts the pixels the map marks valid, those with non-finite logits too; no valid pixel: loss 0 and a
    zero gradient (0 / 0 in the formula)."""
    logits = torch.zeros(2, 3, 1, 4, dtype=torch.float64)
    logits[0, :, 0, 1] = float("nan")
    logits.requires_grad_(True)
    label = torch.zeros(2, 1, 4, dtype=torch.int64)
    weight = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    ignore = torch.zeros(2, 1, 4, dtype=torch.uint8)
    ignore[1] = IGNORE_VALUE
    loss = ck.weighted_cross_entropy(logits, label, weight, ignore, backend="reference")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(3) / 4, rel=1e-15)
    expected_loss, expected_gradient = oracle_weighted_cross_entropy(to_numpy(logits), to_numpy(label),
                                                                     to_numpy(weight), to_numpy(ignore))
    assert loss.item() == pytest.approx(expected_loss, rel=1e-15)
    np.testing.assert_allclose(to_numpy(logits.grad), expected_gradient, rtol=1e-15, atol=0)
    logits.grad = None
    loss = ck.weighted_cross_entropy(logits, label, weight, torch.full_like(ignore, IGNORE_VALUE), backend="reference")
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


def test_weighted_cross_entropy_used_label_out_of_range_raises():
    logits, label, weight, ignore = _cross_entropy_case(2, (2, 4, 3, 3), "contiguous")
    used = ((weight != 0) & (ignore != IGNORE_VALUE)).nonzero()[0]
    label[tuple(used)] = 4
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        ck.weighted_cross_entropy(logits, label, weight, ignore, backend="reference")


def test_weighted_cross_entropy_nonfinite_weight_stays_in_its_pixel():
    logits, label, weight, ignore = _cross_entropy_case(3, (1, 5, 4, 4), "contiguous")
    ignore.zero_()
    weight.fill_(0.5)
    label.clamp_(max=4)
    weight[0, 1, 2] = float("inf")
    logits = logits.clone().requires_grad_(True)
    loss = ck.weighted_cross_entropy(logits, label, weight, ignore, backend="reference")
    loss.backward()
    assert not math.isfinite(loss.item())
    gradient = to_numpy(logits.grad)
    assert not np.isfinite(gradient[0, :, 1, 2]).any()
    finite_weight = weight.clone()
    finite_weight[0, 1, 2] = 0.0
    _, expected_gradient = oracle_weighted_cross_entropy(to_numpy(logits), to_numpy(label), to_numpy(finite_weight))
    others = np.ones(gradient.shape, dtype=bool)
    others[0, :, 1, 2] = False
    np.testing.assert_allclose(gradient[others], expected_gradient[others], rtol=1e-12,
                               atol=1e-15 * np.abs(expected_gradient).max())


def test_weighted_cross_entropy_refuses_weight_requiring_grad():
    logits, label, weight, ignore = _cross_entropy_case(4, (1, 3, 2, 2), "contiguous")
    with pytest.raises((ValueError, RuntimeError)):
        ck.weighted_cross_entropy(logits, label, weight.requires_grad_(True), ignore, backend="reference")


# --------------------------------------------------------------------------------------------------------------------
# The C++ extension's CPU backend on the same oracle (built once, cached)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["paper", "released"])
@pytest.mark.parametrize("groups", ["image", "class"])
def test_cpu_backend_pcos_matches_oracle(rule, groups):
    logits = random_logits(77, 3, 21, 7, 9, layout="channels_last")
    logits[0, 4, 2, 2] = float("nan")
    ignore = random_ignore(77, 3, 7, 9, all_ignored_image=2)
    result = ck.pcos_weights(logits, ignore, groups=groups, rule=rule, return_stats=True, backend="cpu")
    expected = oracle_pcos(to_numpy(logits), to_numpy(ignore), groups=groups, rule=rule)
    assert_pcos_matches(result, expected, stats_rtol=1e-10, weight_atol=1e-6, var_atol=1e-15)
    features = ck.residual_features(logits, ignore, rule=rule, backend="cpu")
    f0, v, label, valid = oracle_features(to_numpy(logits), to_numpy(ignore), rule=rule)
    np.testing.assert_array_equal(to_numpy(features.label)[valid], label[valid])
    assert_close_at(to_numpy(features.f0), f0, valid, 1e-13, 1e-300, "f0")
    assert_close_at(to_numpy(features.v), v, valid, 1e-11, 1e-300, "v")


def test_cpu_backend_cross_entropy_and_threshold_match_oracle():
    logits, label, weight, ignore = _cross_entropy_case(9, (3, 21, 5, 6), "channels_last")
    logits = logits.detach().clone().requires_grad_(True)
    loss = ck.weighted_cross_entropy(logits, label, weight, ignore, backend="cpu")
    loss.backward()
    expected_loss, expected_gradient = oracle_weighted_cross_entropy(to_numpy(logits), to_numpy(label),
                                                                     to_numpy(weight), to_numpy(ignore))
    assert loss.item() == pytest.approx(expected_loss, rel=1e-13)
    np.testing.assert_allclose(to_numpy(logits.grad), expected_gradient, rtol=1e-12, atol=1e-17)
    result = ck.threshold_weights(logits.detach(), ignore, tau=0.9, backend="cpu")
    weight, label, reliable = oracle_threshold(to_numpy(logits), to_numpy(ignore), tau=0.9)
    np.testing.assert_array_equal(to_numpy(result.weight), weight)
    np.testing.assert_array_equal(to_numpy(result.label), label)


def test_cpu_backend_preservation_at_a_cluster_of_equal_dispersions():
    """float32, C = 3, paper rule: six pixels with an even residual (v = 0 exactly) and varied p_max form the
    reliable cluster, one uneven pixel the other: mu[1] = 0 exactly, so v = 0 is not above it and the pixels below
    the mean confidence get their Gaussian weight (the reference and Triton agree). The extension's cluster means are
    its shift plus the mean deviation from it: with the unrounded group mean as the shift, mu[1] was -3e-18 and the
    preservation rule kept those pixels at weight 1 (0 > -3e-18)."""
    logits = _pixels([[0.78, 0.0, 0.0], [2.52, 0.0, 0.0], [0.62, 0.0, 0.0], [1.64, 0.0, 0.0], [0.58, 0.0, 0.0],
                      [2.13, 0.0, 0.0], [1.0, 1.0, -1.47]]).float()
    features = ck.residual_features(logits, None, backend="reference")
    expected = oracle_pcos(logits.double().numpy(), features=(to_numpy(features.f0), to_numpy(features.v)))
    reference = ck.pcos_weights(logits, None, return_stats=True, backend="reference")
    assert_pcos_matches(reference, expected, stats_rtol=1e-9, weight_atol=1e-6)
    assert expected[3]["mu"][0, 0, 1] == 0.0 and expected[0].min() < 0.9
    # The extension computes float32 logits' features in float32: the oracle on those features.
    features = ck.residual_features(logits, None, backend="cpu")
    expected = oracle_pcos(logits.double().numpy(), features=(to_numpy(features.f0), to_numpy(features.v)))
    assert expected[3]["mu"][0, 0, 1] == 0.0 and expected[0].min() < 0.9
    result = ck.pcos_weights(logits, None, return_stats=True, backend="cpu")
    assert_pcos_matches(result, expected, stats_rtol=1e-9, weight_atol=1e-6, var_atol=1e-15)
