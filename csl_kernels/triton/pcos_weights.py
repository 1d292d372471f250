"""Triton kernels of PCOS (docs/selection.md Sec. 2), batched over images or (image, class) groups.

The five stages of PCOS, named as in the CPU and CUDA kernels, one launch each on the current stream: no host
synchronisation, no float atomics, shapes that depend only on the input shapes (CUDA-graph capturable):

A) features (one pass over the logits) + per-chunk partial Gram sums and non-finite counts (``_pcos_features_kernel``),
B) group parameters: per group, Gram sums reduced over chunks in a fixed order, closed-form 2 x 2
   eigen-decomposition (``_pcos_group_params_kernel``),
C) cluster assignment + per-chunk (count, mean, M2) records of each (group, cluster) (``_pcos_cluster_kernel``),
D) cluster statistics: per group, records merged with Chan's formula in a fixed order, means, unbiased variances,
   reliable cluster (``_pcos_cluster_stats_kernel``),
E) Gaussian weights with the preservation rule (``_pcos_weight_kernel``).

A chunk is a fixed run of pixels of one image owned by one program, which walks it tile by tile and folds each
tile's partial statistics into its own slots (so the order is fixed); group tiles without a pixel of the tile are
skipped. All statistics are float64.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._backends import register
from .._checks import compute_dtype, register_not_differentiable
from .._eager import op_or_launch
from ..pcos_weights import PCOSOutputs, pcos_outputs_like
from ._common import (
    INT32_LIMIT,
    NO_FP_FUSION,
    USE_LIBDEVICE,
    batch_slices,
    cdiv,
    chan_merge,
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
from .residual_features import DEFAULT_CONFIG, _pixel_features, feature_blocks
from .tuning import Config, Tunable, tuned

GRAM_STATS = 3  # sum xx, xy, yy
CLUSTER_STATS = 5  # count, mean x, mean y, M2 x, M2 y
GROUP_PARAMS = 8  # u1 x, u1 y, s1, s2, rank one (+ padding)
WEIGHT_PARAMS = 4  # mu x, mu y, sd x, sd y of the reliable cluster
MIN_CHUNK = 1024  # pixels per chunk at least
PARTIAL_BUDGET = 64 << 20  # bytes of per-chunk records at most (chunks grow beyond MIN_CHUNK to stay below)
MAX_BLOCK_G = 16  # groups per tile of the one-hot partial sums (class groups)
MAX_BLOCK_K = 128  # chunks per step of the per-group reductions
GROUP_TILE = 256  # groups x chunks per step of the per-group reductions at most (8 x 128 spilled 808 B on sm_90)
MIN_GROUP_PROGRAMS = 256  # programs of the per-group reductions while there are groups enough (group_tile)
BLOCK_W = 1024  # pixels per program of the weight kernel
CLUSTER_BLOCK = 1024  # pixels per tile of the image-group cluster pass at most
CLUSTER_WARPS = 8  # its warps: 4 pixels per thread at the largest tile
# Pixels per tile of the class-group cluster pass at most: at C = 2 the candidate Config(2048, 8) gave it 1024-pixel
# tiles, where it spilled 20 B per thread for sm_80 (ptxas 12.9); every other class count and candidate stays within.
CLASS_CLUSTER_BLOCK = 512
# Tile and warps of the two pixel passes (features + Gram sums, cluster records): the feature pass's default and
# candidates but 512 values at 8 warps, where the class-group feature kernel spills 20 B per thread at a 16-class tile.
# Chunks do not depend on the choice (chunk_pixels), so neither do the per-chunk records nor the order they are merged
# in. Float64 logits take half the default tile at 4 warps: at the default (8 warps, where ptxas caps the registers at
# 128) the class-group feature kernel spills 24 B per thread with Triton 3.6's ptxas 12.8, at 512 x 8 warps 20-36 B
# (Triton 3.6 and 3.8); at 512 x 4 warps at most 16 B (Triton 3.6) and nothing with Triton 3.8.
CANDIDATES = (DEFAULT_CONFIG, Config(512, 4), Config(1024, 4), Config(2048, 8))
TUNABLE = Tunable("pcos_weights", DEFAULT_CONFIG, CANDIDATES, float64=Config(512, 4))


@triton.jit
def _pcos_features_kernel(z_ptr, valid_ptr, feat_ptr, keep_ptr, label_ptr, gram_ptr, bad_ptr,
                          NPIX, HW, W, C, sb, sc, sh, sw, GPI, NCH, TILES,
                          HAS_VALID: tl.constexpr, IGNORE_MAP: tl.constexpr, LOG_CONFIDENCE: tl.constexpr,
                          CLASS_GROUPS: tl.constexpr,
                          ACC: tl.constexpr, FLAT_HW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_G: tl.constexpr, USE_LIBDEVICE: tl.constexpr, RELEASED: tl.constexpr,
                          WIDE: tl.constexpr):
    chunk = tl.program_id(0)
    if WIDE:  # one image spans >= 2^31 elements: int64 pixel indices and offsets (from the chunk start on)
        chunk = chunk.to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    z_base = z_ptr + b * sb
    gcols = tl.arange(0, BLOCK_G)
    n_bad = tl.zeros([BLOCK_P], tl.int32)
    # Image groups: every lane sums its pixels' Gram products over the tiles; one reduction and store per chunk.
    lane_xx = tl.zeros([BLOCK_P], tl.float64)
    lane_xy = tl.zeros([BLOCK_P], tl.float64)
    lane_yy = tl.zeros([BLOCK_P], tl.float64)
    for t in range(0, TILES):
        p = (chunk * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < HW
        f0, v, label, finite = _pixel_features(z_base, pixel_offsets(p, W, sh, sw, FLAT_HW), pmask, C, sc,
                                               LOG_CONFIDENCE, ACC, BLOCK_P, BLOCK_C, USE_LIBDEVICE, RELEASED, WIDE)
        out = b * HW + p
        keep = finite & pmask
        if HAS_VALID:
            keep = keep & valid_at(valid_ptr, out, pmask, IGNORE_MAP)
        x = tl.where(keep, f0, 0.0)
        y = tl.where(keep, v, 0.0)
        label = tl.where(keep, label, 0)
        tl.store(feat_ptr + out, x, mask=pmask)
        tl.store(feat_ptr + NPIX + out, y, mask=pmask)
        tl.store(keep_ptr + out, keep.to(tl.uint8), mask=pmask)
        tl.store(label_ptr + out, label.to(tl.int64), mask=pmask)
        n_bad += (pmask & ~finite).to(tl.int32)
        xd = x.to(tl.float64)  # 0 where not kept
        yd = y.to(tl.float64)
        if CLASS_GROUPS:
            for g0 in range(0, GPI, BLOCK_G):
                groups = g0 + gcols
                hit = keep[:, None] & (label[:, None] == groups[None, :])
                if tl.sum(hit.to(tl.int32)) > 0:
                    sxx = tl.sum(tl.where(hit, (xd * xd)[:, None], 0.0), axis=0)
                    sxy = tl.sum(tl.where(hit, (xd * yd)[:, None], 0.0), axis=0)
                    syy = tl.sum(tl.where(hit, (yd * yd)[:, None], 0.0), axis=0)
                    gmask = groups < GPI
                    slot = gram_ptr + ((b * GPI + groups) * 3) * NCH + chunk
                    tl.debug_barrier()  # this program's previous stores to its slots are visible to every thread
                    tl.store(slot, tl.load(slot, mask=gmask, other=0.0) + sxx, mask=gmask)
                    tl.store(slot + NCH, tl.load(slot + NCH, mask=gmask, other=0.0) + sxy, mask=gmask)
                    tl.store(slot + 2 * NCH, tl.load(slot + 2 * NCH, mask=gmask, other=0.0) + syy, mask=gmask)
        else:
            lane_xx += xd * xd
            lane_xy += xd * yd
            lane_yy += yd * yd
    if not CLASS_GROUPS:
        slot = gram_ptr + (b * 3) * NCH + chunk
        tl.store(slot, tl.sum(lane_xx, axis=0))
        tl.store(slot + NCH, tl.sum(lane_xy, axis=0))
        tl.store(slot + 2 * NCH, tl.sum(lane_yy, axis=0))
    tl.store(bad_ptr + b * NCH + chunk, tl.sum(n_bad, axis=0))


@triton.jit
def _pcos_group_params_kernel(scratch_ptr, bad_ptr, eigen_ptr, nonfinite_ptr, PARAMS, G, GPI, NCH,
                              BLOCK_GRP: tl.constexpr, BLOCK_K: tl.constexpr):
    gram_ptr = scratch_ptr  # the Gram records start the scratch buffer
    params_ptr = scratch_ptr + PARAMS
    g = tl.program_id(0) * BLOCK_GRP + tl.arange(0, BLOCK_GRP).to(tl.int64)
    gm = g < G
    ks = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    acc_b = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    acc_c = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    base = gram_ptr + (g * 3 * NCH)[:, None]
    for k0 in range(0, NCH, BLOCK_K):
        k = (k0 + ks)[None, :]
        km = gm[:, None] & (k < NCH)
        acc_a += tl.load(base + k, mask=km, other=0.0)
        acc_b += tl.load(base + NCH + k, mask=km, other=0.0)
        acc_c += tl.load(base + 2 * NCH + k, mask=km, other=0.0)
    a = tl.sum(acc_a, axis=1)
    b = tl.sum(acc_b, axis=1)
    c = tl.sum(acc_c, axis=1)
    # Closed-form eigen-decomposition of [[a, b], [b, c]] (mirrors closed_form_eigen of the reference).
    half_trace = 0.5 * (a + c)
    half_diff = 0.5 * (a - c)
    lam1 = half_trace + tl.sqrt(half_diff * half_diff + b * b)
    # lambda_2 = det / lambda_1 avoids the cancellation of half_trace - radius when lambda_2 << lambda_1.
    ac = a * c
    det = ac - b * b
    lam2 = tl.where(lam1 > 0, tl.maximum(det / tl.maximum(lam1, 2.2250738585072014e-308), 0.0), 0.0)
    lam1 = tl.maximum(lam1, 0.0)
    ax = b
    ay = lam1 - a
    bx = lam1 - c
    by = b
    norm_a = tl.sqrt(ax * ax + ay * ay)
    norm_b = tl.sqrt(bx * bx + by * by)
    use_a = norm_a >= norm_b
    best_norm = tl.where(use_a, norm_a, norm_b)
    scale = tl.maximum(best_norm, 2.2250738585072014e-308)
    u1x = tl.where(use_a, ax, bx) / scale
    u1y = tl.where(use_a, ay, by) / scale
    axis_aligned = (b == 0) | (best_norm == 0)
    u1x = tl.where(axis_aligned, tl.where(a >= c, 1.0, 0.0), u1x)
    u1y = tl.where(axis_aligned, tl.where(a >= c, 0.0, 1.0), u1y)
    s1 = tl.sqrt(lam1)
    s2 = tl.sqrt(lam2)
    out = params_ptr + g * 8
    tl.store(out, u1x, mask=gm)
    tl.store(out + 1, u1y, mask=gm)
    tl.store(out + 2, s1, mask=gm)
    tl.store(out + 3, s2, mask=gm)
    rank_one = (s2 <= 1e-12 * s1) | (det <= 1e-8 * ac)  # RANK_ONE_RTOL, COLLINEAR_RTOL of the reference
    tl.store(out + 4, tl.where(rank_one, 1.0, 0.0), mask=gm)
    tl.store(eigen_ptr + g * 2, lam1, mask=gm)
    tl.store(eigen_ptr + g * 2 + 1, lam2, mask=gm)
    # The first group of every image also reduces the image's non-finite counts.
    first = gm & (g % GPI == 0)
    img = g // GPI
    acc_n = tl.zeros([BLOCK_GRP, BLOCK_K], tl.int64)
    for k0 in range(0, NCH, BLOCK_K):
        k = (k0 + ks)[None, :]
        acc_n += tl.load(bad_ptr + (img * NCH)[:, None] + k, mask=first[:, None] & (k < NCH), other=0).to(tl.int64)
    tl.store(nonfinite_ptr + img, tl.sum(acc_n, axis=1), mask=first)


@triton.jit
def _load_features(feat_ptr, NPIX, keep_ptr, label_ptr, i, pmask, CLASS_GROUPS: tl.constexpr):
    """What kernel A stored for pixels ``i``: ``(keep, x, y, group)`` with float64 features (0 where not kept) and
    the group within the image (the pseudo-label for class groups, else 0)."""
    keep = (tl.load(keep_ptr + i, mask=pmask, other=0) != 0) & pmask
    x = tl.load(feat_ptr + i, mask=keep, other=0.0).to(tl.float64)
    y = tl.load(feat_ptr + NPIX + i, mask=keep, other=0.0).to(tl.float64)
    if CLASS_GROUPS:
        gid = tl.load(label_ptr + i, mask=keep, other=0).to(tl.int32)
    else:
        gid = tl.zeros_like(i).to(tl.int32)
    return keep, x, y, gid


@triton.jit
def _pcos_cluster_kernel(feat_ptr, keep_ptr, label_ptr, scratch_ptr, NPIX, PART, PARAMS, HW, GPI, NCH, TILES,
                         CLASS_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr):
    part_ptr = scratch_ptr + PART
    params_ptr = scratch_ptr + PARAMS
    b = tl.program_id(1).to(tl.int64)
    # The chunk's first pixel and how many of its pixels exist, as int64 scalars once (an image may hold 2^31 pixels
    # or more); inside the chunk, tile offsets and lanes are int32 (int64 lanes made the widest tile spill on sm_90).
    chunk = tl.program_id(0)
    first = chunk.to(tl.int64) * (TILES * BLOCK_P)
    row = b * HW + first
    in_chunk = tl.minimum(HW - first, TILES * BLOCK_P).to(tl.int32)
    gcols = tl.arange(0, BLOCK_G)
    lanes = tl.arange(0, BLOCK_P)
    for t in range(0, TILES):
        offs = t * BLOCK_P + lanes
        keep, x, y, gid = _load_features(feat_ptr + row, NPIX, keep_ptr + row, label_ptr + row, offs, offs < in_chunk,
                                         CLASS_GROUPS)
        gp = params_ptr + (b * GPI + gid) * 8
        u1x = tl.load(gp, mask=keep, other=1.0)
        u1y = tl.load(gp + 1, mask=keep, other=0.0)
        s1 = tl.load(gp + 2, mask=keep, other=0.0)
        s2 = tl.load(gp + 3, mask=keep, other=0.0)
        rank_one = tl.load(gp + 4, mask=keep, other=1.0) != 0
        # |V[n, 1]| > |V[n, 0]|  <=>  |u_2 . phi| * s_1 > |u_1 . phi| * s_2, u_2 = (-u1y, u1x): no division by s_2.
        proj0 = tl.abs(u1x * x + u1y * y)
        proj1 = tl.abs(-u1y * x + u1x * y)
        cluster = ((proj1 * s1 > proj0 * s2) & ~rank_one).to(tl.int32)
        for g0 in range(0, GPI, BLOCK_G):
            groups = g0 + gcols
            in_group = keep[:, None] & (gid[:, None] == groups[None, :])
            if tl.sum(in_group.to(tl.int32)) > 0:
                gmask = groups < GPI
                for cl in tl.static_range(2):
                    hit = in_group & (cluster[:, None] == cl)
                    n = tl.sum(hit.to(tl.float64), axis=0)
                    inv_n = 1.0 / tl.maximum(n, 1.0)
                    mx = tl.sum(tl.where(hit, x[:, None], 0.0), axis=0) * inv_n
                    my = tl.sum(tl.where(hit, y[:, None], 0.0), axis=0) * inv_n
                    dx = tl.where(hit, x[:, None] - mx[None, :], 0.0)
                    dy = tl.where(hit, y[:, None] - my[None, :], 0.0)
                    qx = tl.sum(dx * dx, axis=0)
                    qy = tl.sum(dy * dy, axis=0)
                    slot = part_ptr + (((b * GPI + groups) * 2 + cl) * 5) * NCH + chunk
                    tl.debug_barrier()  # this program's previous stores to its slots are visible to every thread
                    n0 = tl.load(slot, mask=gmask, other=0.0)
                    mx0 = tl.load(slot + NCH, mask=gmask, other=0.0)
                    my0 = tl.load(slot + 2 * NCH, mask=gmask, other=0.0)
                    qx0 = tl.load(slot + 3 * NCH, mask=gmask, other=0.0)
                    qy0 = tl.load(slot + 4 * NCH, mask=gmask, other=0.0)
                    n, mx, my, qx, qy = chan_merge(n0, mx0, my0, qx0, qy0, n, mx, my, qx, qy)
                    tl.store(slot, n, mask=gmask)
                    tl.store(slot + NCH, mx, mask=gmask)
                    tl.store(slot + 2 * NCH, my, mask=gmask)
                    tl.store(slot + 3 * NCH, qx, mask=gmask)
                    tl.store(slot + 4 * NCH, qy, mask=gmask)


@triton.jit
def _merge_chunks(base, gm, NCH, BLOCK_GRP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Chan-merge, per group, the NCH records (count, mean x, mean y, M2 x, M2 y) at ``base`` (a BLOCK_GRP column
    of pointers, stat-major records) in a fixed order."""
    ks = tl.arange(0, BLOCK_K)
    n = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    mx = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    my = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    qx = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    qy = tl.zeros([BLOCK_GRP, BLOCK_K], tl.float64)
    for k0 in range(0, NCH, BLOCK_K):
        k = (k0 + ks)[None, :]
        km = gm[:, None] & (k < NCH)
        n, mx, my, qx, qy = chan_merge(
            n, mx, my, qx, qy,
            tl.load(base + k, mask=km, other=0.0), tl.load(base + NCH + k, mask=km, other=0.0),
            tl.load(base + 2 * NCH + k, mask=km, other=0.0), tl.load(base + 3 * NCH + k, mask=km, other=0.0),
            tl.load(base + 4 * NCH + k, mask=km, other=0.0),
        )
    return tl.reduce((n, mx, my, qx, qy), 1, chan_merge)


@triton.jit
def _pcos_cluster_stats_kernel(scratch_ptr, mu_ptr, var_ptr, count_ptr, chosen_ptr, PART, WPARAMS, G, NCH,
                               BLOCK_GRP: tl.constexpr, BLOCK_K: tl.constexpr, RELEASED: tl.constexpr):
    part_ptr = scratch_ptr + PART
    wparams_ptr = scratch_ptr + WPARAMS
    g = tl.program_id(0) * BLOCK_GRP + tl.arange(0, BLOCK_GRP).to(tl.int64)
    gm = g < G
    base = part_ptr + (g * 10 * NCH)[:, None]
    n0, mx0, my0, qx0, qy0 = _merge_chunks(base, gm, NCH, BLOCK_GRP, BLOCK_K)
    n1, mx1, my1, qx1, qy1 = _merge_chunks(base + 5 * NCH, gm, NCH, BLOCK_GRP, BLOCK_K)
    mx0 = tl.where(n0 > 0, mx0, 0.0)
    my0 = tl.where(n0 > 0, my0, 0.0)
    mx1 = tl.where(n1 > 0, mx1, 0.0)
    my1 = tl.where(n1 > 0, my1, 0.0)
    vx0 = tl.where(n0 > 1, tl.maximum(qx0, 0.0) / tl.maximum(n0 - 1.0, 1.0), 0.0)
    vy0 = tl.where(n0 > 1, tl.maximum(qy0, 0.0) / tl.maximum(n0 - 1.0, 1.0), 0.0)
    vx1 = tl.where(n1 > 1, tl.maximum(qx1, 0.0) / tl.maximum(n1 - 1.0, 1.0), 0.0)
    vy1 = tl.where(n1 > 1, tl.maximum(qy1, 0.0) / tl.maximum(n1 - 1.0, 1.0), 0.0)
    tl.store(mu_ptr + g * 4, mx0, mask=gm)
    tl.store(mu_ptr + g * 4 + 1, my0, mask=gm)
    tl.store(mu_ptr + g * 4 + 2, mx1, mask=gm)
    tl.store(mu_ptr + g * 4 + 3, my1, mask=gm)
    tl.store(var_ptr + g * 4, vx0, mask=gm)
    tl.store(var_ptr + g * 4 + 1, vy0, mask=gm)
    tl.store(var_ptr + g * 4 + 2, vx1, mask=gm)
    tl.store(var_ptr + g * 4 + 3, vy1, mask=gm)
    tl.store(count_ptr + g * 2, n0.to(tl.int64), mask=gm)
    tl.store(count_ptr + g * 2 + 1, n1.to(tl.int64), mask=gm)
    # The reliable cluster has the higher mean confidence; an empty cluster is never chosen (ties: 0).
    pick = (n1 > 0) & ((n0 == 0) | (mx1 > mx0))
    tl.store(chosen_ptr + g, pick.to(tl.int64), mask=gm)
    out = wparams_ptr + g * 4
    tl.store(out, tl.where(pick, mx1, mx0), mask=gm)
    tl.store(out + 1, tl.where(pick, my1, my0), mask=gm)
    tl.store(out + 2, tl.sqrt(tl.where(pick, vx1, vx0) + 1e-8), mask=gm)
    # The sign of the dispersion's scale carries the rule (z_1^2 does not depend on it): > 0 keeps pixels above the
    # mean dispersion at weight 1 (paper), < 0 those below it (released code).
    sd_y = tl.sqrt(tl.where(pick, vy1, vy0) + 1e-8)
    if RELEASED:
        sd_y = -sd_y
    tl.store(out + 3, sd_y, mask=gm)


@triton.jit
def _pcos_weight_kernel(feat_ptr, keep_ptr, label_ptr, scratch_ptr, weight_ptr, reliable_ptr, NPIX, WPARAMS, HW, GPI,
                        alpha: tl.float64, CLASS_GROUPS: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    wparams_ptr = scratch_ptr + WPARAMS
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    if WIDE:  # an image of 2^31 pixels or more: int64 pixel indices
        pid = pid.to(tl.int64)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    pmask = p < HW
    i = b * HW + p
    keep, x, y, gid = _load_features(feat_ptr, NPIX, keep_ptr, label_ptr, i, pmask, CLASS_GROUPS)
    wp = wparams_ptr + (b * GPI + gid) * 4
    mux = tl.load(wp, mask=keep, other=0.0)
    muy = tl.load(wp + 1, mask=keep, other=0.0)
    sdx = tl.load(wp + 2, mask=keep, other=1.0)
    sdy = tl.load(wp + 3, mask=keep, other=1.0)
    z0 = (x - mux) / sdx
    z1 = (y - muy) / sdy
    w = tl.exp(-(z0 * z0 + z1 * z1) / alpha)
    w = tl.where((x > mux) | ((sdy > 0) & (y > muy)) | ((sdy < 0) & (y < muy)), 1.0, w)
    w = tl.where(keep, w, 0.0).to(tl.float32)
    tl.store(weight_ptr + i, w, mask=pmask)
    tl.store(reliable_ptr + i, keep & (w == 1.0), mask=pmask)


def cluster_block(chunk_len: int) -> int:
    """Pixels per tile of the image-group cluster pass: the largest power of two that divides a chunk of
    ``chunk_len`` pixels, at most CLUSTER_BLOCK."""
    return min(chunk_len & -chunk_len, CLUSTER_BLOCK)


def group_tile(n_groups: int, block_k: int) -> int:
    """Groups per program of the per-group reductions (B, D): one per program until there are MIN_GROUP_PROGRAMS
    programs, then more, up to GROUP_TILE // block_k. A program reduces its groups side by side: the 16 image groups
    of a B16 batch packed 8 to a program ran on 2 of the GPU's SMs (the cluster statistics took 25 us on the H200).
    The tile depends only on the shapes, so results stay bitwise reproducible."""
    return max(1, min(next_pow2(cdiv(n_groups, MIN_GROUP_PROGRAMS)), GROUP_TILE // block_k))


def features_wide(use_int64: bool, plan: LaunchPlan) -> bool:
    """Whether the feature pass computes its pixel indices in int64: the call's offsets do (``use_int64``, from
    :func:`wide`), or its pixel index does not fit in int32, which runs to the end of the last chunk's last tile
    (``chunks * tiles * block_p``, up to a chunk past ``hw``: class groups of broadcast logits reach 2^31 there with
    ``hw`` below it)."""
    return use_int64 or plan.chunks * plan.tiles * plan.block_p >= INT32_LIMIT


def chunk_pixels(batch: int, hw: int, groups_per_image: int) -> int:
    """Pixels per chunk: a multiple of MIN_CHUNK, more than MIN_CHUNK when the per-chunk records would exceed the
    budget. It does not depend on the launch configuration (every tile of pixels divides MIN_CHUNK)."""
    record_bytes = (GRAM_STATS + 2 * CLUSTER_STATS) * 8 * groups_per_image
    max_chunks = max(1, PARTIAL_BUDGET // record_bytes)
    return cdiv(max(MIN_CHUNK, cdiv(max(1, batch * hw), max_chunks)), MIN_CHUNK) * MIN_CHUNK


def chunk_tiles(batch: int, hw: int, groups_per_image: int, block_p: int) -> int:
    """Tiles of ``block_p`` pixels per chunk (an image smaller than a chunk is one chunk of just enough tiles)."""
    if MIN_CHUNK % block_p:
        raise ValueError(f"a tile of {block_p} pixels does not divide a chunk of {MIN_CHUNK}")
    return cdiv(min(chunk_pixels(batch, hw, groups_per_image), max(hw, 1)), block_p)


class LaunchPlan(NamedTuple):
    """The block sizes, grids and buffer sizes of one PCOS call: a function of the shape and launch configuration
    alone (:func:`launch_plan`), computed once per shape instead of on every call."""

    block_p: int  # pixels per tile of the feature pass
    block_c: int  # classes per tile of the feature pass
    block_g: int  # groups per one-hot tile (class groups)
    tiles: int  # feature tiles per chunk
    chunks: int  # chunks per image
    chunk_grid: tuple[int, int]  # (chunks, images): the feature and cluster passes
    block_k: int  # chunk records per step of the per-group reductions
    block_grp: int  # groups per program of the per-group reductions
    group_grid: tuple[int]
    cluster_p: int  # pixels per tile of the cluster pass
    cluster_tiles: int  # its tiles per chunk
    cluster_warps: int
    weight_grid: tuple[int, int]
    scratch: int  # float64 elements of the scratch buffer
    offsets: tuple[int, int, int, int]  # where its parts start: Gram records, cluster records, group and weight params


def launch_plan(bsz: int, ncls: int, hw: int, class_groups: bool, config: Config) -> LaunchPlan:
    """The plan of a call on ``bsz x ncls x (hw pixels)`` logits with ``config``, remembered per shape. The module's
    limits are part of the key: a plan is never reused after one of them changed."""
    limits = (MIN_CHUNK, PARTIAL_BUDGET, MIN_GROUP_PROGRAMS, GROUP_TILE, MAX_BLOCK_K, MAX_BLOCK_G, CLUSTER_BLOCK,
              CLUSTER_WARPS, CLASS_CLUSTER_BLOCK, BLOCK_W)
    return _launch_plan(bsz, ncls, hw, class_groups, config, limits)


@functools.lru_cache(maxsize=1024)
def _launch_plan(bsz: int, ncls: int, hw: int, class_groups: bool, config: Config, limits: tuple) -> LaunchPlan:
    gpi = ncls if class_groups else 1
    n_groups = bsz * gpi
    block_p, block_c = feature_blocks(ncls, config)
    block_p = min(block_p, MIN_CHUNK)
    tiles = chunk_tiles(bsz, hw, gpi, block_p)
    nch = cdiv(hw, tiles * block_p)
    block_k = min(next_pow2(nch), MAX_BLOCK_K)
    block_grp = group_tile(n_groups, block_k)
    # The cluster pass reads three values per pixel, not C: image groups take the largest tile that divides the
    # chunk (up to CLUSTER_BLOCK pixels), so a chunk is one or a few tiles and few merges. Class groups keep the
    # feature pass's tile up to CLASS_CLUSTER_BLOCK pixels: their one-hot tiles are BLOCK_G groups wide.
    cluster_p = min(block_p, CLASS_CLUSTER_BLOCK) if class_groups else cluster_block(tiles * block_p)
    # Each part of the scratch buffer starts on a 128-byte boundary, as a buffer of its own would.
    parts = tuple(cdiv(n, 16) * 16 for n in (n_groups * GRAM_STATS * nch, n_groups * 2 * CLUSTER_STATS * nch,
                                             n_groups * GROUP_PARAMS, n_groups * WEIGHT_PARAMS))
    return LaunchPlan(
        block_p=block_p, block_c=block_c, block_g=min(next_pow2(gpi), MAX_BLOCK_G), tiles=tiles, chunks=nch,
        chunk_grid=(nch, bsz), block_k=block_k, block_grp=block_grp, group_grid=(cdiv(n_groups, block_grp),),
        cluster_p=cluster_p, cluster_tiles=tiles * block_p // cluster_p,
        cluster_warps=config.num_warps if class_groups else CLUSTER_WARPS, weight_grid=(cdiv(hw, BLOCK_W), bsz),
        scratch=sum(parts), offsets=tuple(itertools.accumulate(parts[:-1], initial=0)),
    )


def pcos_weights_launch(
    logits: torch.Tensor, valid: torch.Tensor | None, alpha: float, log_confidence: bool, class_groups: bool,
    released: bool = False, packed: bool = False,
) -> PCOSOutputs:
    """The PCOS passes on ``logits``; ``packed``: statistics as views of shared buffers (eager calls only)."""
    bsz, ncls, h, w = logits.shape
    slices = batch_slices(bsz)
    if slices is not None:  # statistics are per image (image groups) or per image and class, image-major
        parts = [pcos_weights_launch(logits[s], rows(valid, s), alpha, log_confidence, class_groups, released)
                 for s in slices]
        return PCOSOutputs(*(torch.cat(outs) for outs in zip(*parts, strict=True)))
    hw = h * w
    gpi = ncls if class_groups else 1
    n_groups = bsz * gpi
    dev = logits.device
    out = pcos_outputs_like(logits, class_groups, packed)
    if bsz == 0 or hw == 0:  # the kernels write every statistic of every group; an empty input's are zeros
        for stat in (out.mu, out.var, out.count, out.eigenvalues, out.chosen, out.n_nonfinite):
            stat.zero_()
        return out
    sb, sh, sw, flat = pixel_strides(logits)
    # An image spans >= 2^31 elements (any layout, read in place), or holds that many pixels (broadcast logits span
    # little): int64 pixel indices and offsets.
    use_int64 = wide(logits, extra=(hw,))
    valid_c, has_valid, ignore_map = valid_pointer(valid, logits)
    dt = compute_dtype(logits)
    npix = bsz * hw
    feat = torch.empty((2 * npix,), dtype=dt, device=dev)  # confidence, then dispersion, of every pixel
    keep = torch.empty((npix,), dtype=torch.uint8, device=dev)

    def launch(config: Config) -> None:
        plan = launch_plan(bsz, ncls, hw, class_groups, config)
        # One float64 scratch buffer (one allocation, one fill; the kernels find their parts at plan.offsets): the
        # per-chunk Gram and cluster records, which programs fold tile after tile into (so they start from zero),
        # and the per-group parameters.
        scratch = torch.zeros((plan.scratch,), dtype=torch.float64, device=dev)
        _, part, params, wparams = plan.offsets
        bad = torch.empty((plan.chunk_grid[0] * bsz,), dtype=torch.int32, device=dev)
        _pcos_features_kernel[plan.chunk_grid](
            logits, valid_c, feat, keep, out.label, scratch, bad, npix, hw, w, ncls, sb, logits.stride(1), sh, sw,
            gpi, plan.chunks, plan.tiles, HAS_VALID=has_valid, IGNORE_MAP=ignore_map,
            LOG_CONFIDENCE=bool(log_confidence),
            CLASS_GROUPS=bool(class_groups), ACC=tl_dtype(dt), FLAT_HW=flat, BLOCK_P=plan.block_p,
            BLOCK_C=plan.block_c, BLOCK_G=plan.block_g, USE_LIBDEVICE=USE_LIBDEVICE, RELEASED=bool(released),
            WIDE=features_wide(use_int64, plan), num_warps=config.num_warps,
        )
        # Unfused products (as the reference and the C++ build): det = a c - b^2 of a one-pixel group is then exactly
        # 0 (rank one), where a fused multiply-add would leave the rounding of b^2 and let it decide the cluster.
        _pcos_group_params_kernel[plan.group_grid](scratch, bad, out.eigenvalues, out.n_nonfinite, params, n_groups,
                                                   gpi, plan.chunks, BLOCK_GRP=plan.block_grp, BLOCK_K=plan.block_k,
                                                   num_warps=4, **NO_FP_FUSION)
        _pcos_cluster_kernel[plan.chunk_grid](
            feat, keep, out.label, scratch, npix, part, params, hw, gpi, plan.chunks, plan.cluster_tiles,
            CLASS_GROUPS=bool(class_groups), BLOCK_P=plan.cluster_p, BLOCK_G=plan.block_g,
            num_warps=plan.cluster_warps,
        )
        _pcos_cluster_stats_kernel[plan.group_grid](scratch, out.mu, out.var, out.count, out.chosen, part, wparams,
                                                    n_groups, plan.chunks, BLOCK_GRP=plan.block_grp,
                                                    BLOCK_K=plan.block_k, RELEASED=bool(released), num_warps=4)
        _pcos_weight_kernel[plan.weight_grid](
            feat, keep, out.label, scratch, out.weight, out.reliable, npix, wparams, hw, gpi, float(alpha),
            CLASS_GROUPS=bool(class_groups), BLOCK=BLOCK_W, WIDE=use_int64, num_warps=4,
        )

    with device_guard(logits):
        tuned(TUNABLE, logits, launch, ",class_groups" if class_groups else "")
    return out


@torch.library.custom_op("csl_triton::pcos_weights", mutates_args=())
def pcos_weights_op(
    logits: torch.Tensor, valid: torch.Tensor | None, alpha: float, log_confidence: bool, class_groups: bool,
    released: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    return tuple(pcos_weights_launch(logits, valid, alpha, log_confidence, class_groups, released))


@pcos_weights_op.register_fake
def _(logits, valid, alpha, log_confidence, class_groups, released=False):
    return tuple(pcos_outputs_like(logits, class_groups))


@register("pcos_weights", "triton")
def pcos_weights_triton(
    logits: torch.Tensor, valid: torch.Tensor | None, alpha: float, log_confidence: bool, class_groups: bool,
    released: bool = False,
) -> PCOSOutputs:
    return PCOSOutputs(*op_or_launch(torch.ops.csl_triton.pcos_weights, _launch_packed, logits, valid, float(alpha),
                                     bool(log_confidence), bool(class_groups), bool(released)))


def _launch_packed(*args) -> PCOSOutputs:  # an eager call's statistics may share storage (not an op's outputs)
    return pcos_weights_launch(*args, packed=True)


register_not_differentiable(pcos_weights_op, "pcos_weights")
