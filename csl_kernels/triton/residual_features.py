"""Triton kernel of the per-pixel CSL features (docs/selection.md Sec. 1): f0, residual dispersion v, pseudo-label.

One pass over the logits: every program handles a tile of pixels of one image and walks the classes in tiles with
an online softmax. The running state of a pixel is its maximum, pseudo-label, ``R`` (sum of ``exp(z_k - z_max)`` over
the non-max classes) and the count / mean / M2 of those exponentials; when a later tile raises the maximum the state
is rescaled and the superseded maximum joins the residual, and tile statistics are merged with Chan's formula. When
``C`` fits one tile this is exactly the two-pass computation in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._backends import register
from .._checks import compute_dtype, register_not_differentiable
from .._eager import op_or_launch
from ..residual_features import ResidualFeatures, residual_features_outputs_like
from ._common import (
    USE_LIBDEVICE,
    batch_slices,
    cdiv,
    device_guard,
    next_pow2,
    pixel_offsets,
    pixel_strides,
    rows,
    tl_dtype,
    valid_at,
    valid_pointer,
    wide,
)
from .tuning import Config, Tunable, tuned

MAX_BLOCK_C = 32  # classes per tile; larger C is walked with the online softmax
# Pixels x classes per program tile and warps per program. The default keeps 4 values per thread, which on sm_90 takes
# 64-120 registers and does not spill (`python -m csl_kernels.triton.compile_check` reports the resource usage; 4096
# values at 4 warps would take 255 registers and spill ~1 KB per thread). The other candidates (2-8 values per thread,
# none spills: tests/test_triton_compile.py; 16 warps or 2048 values at 4 warps would, and 2048 at 8 warps does by
# 20-24 B at a 16-class tile in the int64-offset variant) are timed on the user's GPU (csl_kernels/triton/tuning.py).
DEFAULT_CONFIG = Config(tile=1024, num_warps=8)
CANDIDATES = (DEFAULT_CONFIG, Config(512, 4), Config(1024, 4), Config(512, 8))
TUNABLE = Tunable("residual_features", DEFAULT_CONFIG, CANDIDATES)


def feature_blocks(num_classes: int, config: Config) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)`` for ``num_classes`` classes and a tile of ``config.tile`` elements."""
    block_c = min(next_pow2(num_classes), MAX_BLOCK_C)
    return max(1, config.tile // block_c), block_c


@triton.jit
def _log1p(x, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        out = libdevice.log1p(x)
    else:
        # Interpreter: log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u (Goldberg / Kahan).
        u = 1.0 + x
        out = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
    return out


@triton.jit
def _pixel_features(z_ptr, offs_p, pmask, C, sc, LOG_CONFIDENCE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                    RELEASED: tl.constexpr, WIDE: tl.constexpr):
    """Features of BLOCK_P pixels whose class-0 logits lie at ``z_ptr + offs_p`` (class stride ``sc``; ``WIDE``:
    int64 class offsets, with ``offs_p`` int64, for images that span 2^31 elements or more).

    Returns ``(f0, v, label, finite)``; values of non-finite pixels are meaningless (the caller zeroes them).
    """
    cols = tl.arange(0, BLOCK_C)
    z_max = tl.full([BLOCK_P], float("-inf"), ACC)
    label = tl.zeros([BLOCK_P], tl.int32)
    n_bad = tl.zeros([BLOCK_P], tl.int32)
    big_r = tl.zeros([BLOCK_P], ACC)
    n_res = tl.zeros([BLOCK_P], ACC)
    mean = tl.zeros([BLOCK_P], ACC)
    m2 = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        k = c0 + cols
        kmask = k < C
        if WIDE:
            k = k.to(tl.int64)
        z = tl.load(z_ptr + offs_p[:, None] + k[None, :] * sc, mask=pmask[:, None] & kmask[None, :], other=0.0)
        z = z.to(ACC)
        ok = (z - z) == 0  # false for NaN and +-inf
        n_bad += tl.sum((kmask[None, :] & ~ok).to(tl.int32), axis=1)
        z = tl.where(kmask[None, :], tl.where(ok, z, 0.0), float("-inf"))
        t_max = tl.max(z, axis=1)
        t_arg = tl.min(tl.where(z == t_max[:, None], cols[None, :], BLOCK_C), axis=1)  # ties: lowest index
        raised = t_max > z_max  # strict: ties keep the earlier (lower) index
        new_max = tl.where(raised, t_max, z_max)
        label = tl.where(raised, c0 + t_arg, label)
        member = kmask[None, :] & ~(raised[:, None] & (cols[None, :] == t_arg[:, None]))
        e = tl.where(member, tl.exp(z - new_max[:, None]), 0.0)
        n_t = tl.sum(member.to(ACC), axis=1)
        r_t = tl.sum(e, axis=1)
        mean_t = r_t / tl.maximum(n_t, 1.0)
        d = tl.where(member, e - mean_t[:, None], 0.0)
        m2_t = tl.sum(d * d, axis=1)
        # Rescale the running state to the new maximum (s = 1 when it stays, 0 on the first tile); a superseded
        # maximum becomes a residual class with value s (Welford update with one sample).
        s = tl.exp(z_max - new_max)
        big_r = big_r * s
        mean = mean * s
        m2 = m2 * s * s
        demoted = raised & (c0 > 0)
        n_one = n_res + 1.0
        d_one = s - mean
        mean_one = mean + d_one / n_one
        big_r = tl.where(demoted, big_r + s, big_r)
        m2 = tl.where(demoted, m2 + d_one * (s - mean_one), m2)
        mean = tl.where(demoted, mean_one, mean)
        n_res = tl.where(demoted, n_one, n_res)
        # Chan's merge of the tile's residual statistics.
        n_tot = n_res + n_t
        frac = n_t / tl.maximum(n_tot, 1.0)
        delta = mean_t - mean
        mean = mean + delta * frac
        m2 = m2 + m2_t + delta * delta * n_res * frac
        n_res = n_tot
        big_r = big_r + r_t
        z_max = new_max
    # r = R / (1 + R) never cancels (1 - pmax would); p_k = e_k / (1 + R), so var(p) = M2(e) / (1 + R)^2 / (C - 1).
    inv = 1.0 / (1.0 + big_r)
    r = big_r * inv
    others = (C - 1).to(ACC)
    var = m2 * inv * inv / others
    if RELEASED:  # the released rule counts the max slot as a 0 among the others: + (0 - m)^2 / (C - 1)
        m = r / others
        var = var + m * m / others
    g = others * others / (2.0 * (r + 1e-8))
    v = -g * var
    if LOG_CONFIDENCE:
        f0 = -_log1p(big_r, USE_LIBDEVICE)
    else:
        f0 = inv
    return f0, v, label, n_bad == 0


@triton.jit
def _residual_features_kernel(z_ptr, valid_ptr, f0_ptr, v_ptr, label_ptr, HW, W, C, sb, sc, sh, sw,
                              HAS_VALID: tl.constexpr, IGNORE_MAP: tl.constexpr, LOG_CONFIDENCE: tl.constexpr,
                              ACC: tl.constexpr,
                              FLAT_HW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                              USE_LIBDEVICE: tl.constexpr, RELEASED: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:  # one image spans >= 2^31 elements: int64 offsets (from the block start on)
        pid = pid.to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    f0, v, label, finite = _pixel_features(z_ptr + b * sb, pixel_offsets(p, W, sh, sw, FLAT_HW), pmask, C, sc,
                                           LOG_CONFIDENCE, ACC, BLOCK_P, BLOCK_C, USE_LIBDEVICE, RELEASED, WIDE)
    out = b * HW + p
    keep = finite
    if HAS_VALID:
        keep = keep & valid_at(valid_ptr, out, pmask, IGNORE_MAP)
    tl.store(f0_ptr + out, tl.where(keep, f0, 0.0), mask=pmask)
    tl.store(v_ptr + out, tl.where(keep, v, 0.0), mask=pmask)
    tl.store(label_ptr + out, tl.where(keep, label, 0).to(tl.int64), mask=pmask)


def residual_features_launch(logits: torch.Tensor, valid: torch.Tensor | None, log_confidence: bool,
                             released: bool = False) -> ResidualFeatures:
    bsz, ncls, h, w = logits.shape
    slices = batch_slices(bsz)
    if slices is not None:
        parts = [residual_features_launch(logits[s], rows(valid, s), log_confidence, released) for s in slices]
        return ResidualFeatures(*(torch.cat(outs) for outs in zip(*parts, strict=True)))
    out = residual_features_outputs_like(logits)
    hw = h * w
    if bsz == 0 or hw == 0:
        return out
    sb, sh, sw, flat = pixel_strides(logits)
    use_int64 = wide(logits, extra=(hw,))  # an image spans or holds >= 2^31 elements (any layout, read in place)
    valid_c, has_valid, ignore_map = valid_pointer(valid, logits)
    acc = tl_dtype(compute_dtype(logits))

    def launch(config: Config) -> None:
        block_p, block_c = feature_blocks(ncls, config)
        _residual_features_kernel[(cdiv(hw, block_p), bsz)](
            logits, valid_c, out.f0, out.v, out.label, hw, w, ncls, sb, logits.stride(1), sh, sw,
            HAS_VALID=has_valid, IGNORE_MAP=ignore_map, LOG_CONFIDENCE=bool(log_confidence), ACC=acc, FLAT_HW=flat,
            BLOCK_P=block_p, BLOCK_C=block_c, USE_LIBDEVICE=USE_LIBDEVICE, RELEASED=bool(released),
            WIDE=use_int64, num_warps=config.num_warps,
        )

    with device_guard(logits):
        tuned(TUNABLE, logits, launch)
    return out


@torch.library.custom_op("csl_triton::residual_features", mutates_args=())
def residual_features_op(
    logits: torch.Tensor, valid: torch.Tensor | None, log_confidence: bool, released: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(residual_features_launch(logits, valid, log_confidence, released))


@residual_features_op.register_fake
def _(logits, valid, log_confidence, released=False):
    return tuple(residual_features_outputs_like(logits))


@register("residual_features", "triton")
def residual_features_triton(logits: torch.Tensor, valid: torch.Tensor | None, log_confidence: bool,
                             released: bool = False) -> ResidualFeatures:
    return ResidualFeatures(*op_or_launch(torch.ops.csl_triton.residual_features, residual_features_launch, logits,
                                          valid, bool(log_confidence), bool(released)))


register_not_differentiable(residual_features_op, "residual_features")
