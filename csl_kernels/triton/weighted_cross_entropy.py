"""Triton weighted pseudo-label cross-entropy (spec Sec. 5): ``sum_n w_n CE(z_n, y_n) / N_valid``, fused fwd/bwd.

Forward: one read of the logits. Each program takes ``BLOCK_P`` pixels of one image and walks the classes in ``BLOCK_C``
tiles with an online log-sum-exp (running max and the rescaled rest of the sum, ``sum exp(z - max) - 1``, so that
``log1p(rest)`` keeps a confident pixel's small CE exact), so no ``B x C x H x W`` intermediate exists and C is
unbounded. It writes the per-pixel log-sum-exp in two parts for the backward pass (``B x H x W x 2``: the max logit and
``log1p(rest)``, kept apart as PyTorch's ``(z - max) - log(sum)`` keeps them: one float holding their sum would round
the CE to an ulp of the max, csrc/csl_ce.h), one partial loss sum and one valid-pixel count per program; a one-program
kernel adds the partials in a fixed order (float64 accumulator), so the loss is bitwise reproducible without float
atomics.

Backward: ``grad = grad_loss * w * (exp((z - max) - log1p(rest)) - onehot(y)) / N_valid``, recomputed from the saved
log-sum-exp parts in one read of the logits and one write of the gradient. Computing the gradient during the forward
pass instead would need a ``B x C x H x W`` buffer written in the forward and read + rewritten in the backward to apply
``grad_loss`` (two more full passes); the buffer would be alive exactly as long as the saved logits are here, so
recomputation costs no more memory and moves strictly fewer bytes, and the forward stays a pure read when no gradient is
needed.

Pixels that are invalid or have weight 0 are never loaded: they contribute exactly 0 and get exactly 0 gradient,
whatever their logits or labels. A used pixel whose label lies outside ``[0, C)`` makes the loss (and its gradient row)
NaN; checking it on the host would cost a device synchronisation on every call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._backends import register
from .._checks import compute_dtype, register_cross_entropy_autograd, register_not_differentiable
from .._eager import fused_cross_entropy, refuse_dual, under_torch_func
from ..weighted_cross_entropy import weighted_cross_entropy_outputs_like
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
    validity_flags,
    wide,
)
from .residual_features import _log1p
from .tuning import Config, Tunable, tuned

MAX_BLOCK_C = 64  # class tile; larger C loops over tiles with the online log-sum-exp
MAX_BLOCK_P = 1024
# BLOCK_P * BLOCK_C per program and warps per program. Default: 8 values per thread, 60-130 registers and no spills on
# sm_90 (4096 at 4 warps would spill; see csl_kernels/triton/residual_features.py). The others (4-16 values per
# thread; the backward at 1024 / 8 warps spills 4 B, the rest nothing: tests/test_triton_compile.py; 16 warps would
# spill more) are timed on the user's GPU, forward and backward separately (csl_kernels/triton/tuning.py).
DEFAULT_CONFIG = Config(tile=2048, num_warps=8)
CANDIDATES = (DEFAULT_CONFIG, Config(1024, 4), Config(2048, 4), Config(4096, 8), Config(1024, 8))
FORWARD = Tunable("weighted_cross_entropy_forward", DEFAULT_CONFIG, CANDIDATES)
BACKWARD = Tunable("weighted_cross_entropy_backward", DEFAULT_CONFIG, CANDIDATES)
REDUCE_BLOCK = 1024


def _blocks(num_classes: int, config: Config) -> tuple[int, int]:
    block_c = min(next_pow2(num_classes), MAX_BLOCK_C)
    block_p = max(32, min(MAX_BLOCK_P, config.tile // block_c))
    return block_p, block_c


@triton.jit
def _finite_or_zero(m):
    # The online log-sum-exp shifts by a finite value: a tile (or a row so far) of -inf logits must not give
    # -inf - -inf = NaN, and a +inf logit must give lse = +inf as torch.logsumexp does.
    return tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)


@triton.jit
def _used_pixels(label_ptr, weight_ptr, valid_ptr, i, pm, C, HAS_VALID: tl.constexpr, IGNORE_MAP: tl.constexpr,
                 ACC: tl.constexpr):
    """(used, valid, weight, label, bad label) of the pixels ``i`` (flat B x H x W indices)."""
    w = tl.load(weight_ptr + i, mask=pm, other=0).to(ACC)
    valid = pm
    if HAS_VALID:
        valid = valid & valid_at(valid_ptr, i, pm, IGNORE_MAP)
    used = valid & (w != 0)
    y = tl.where(used, tl.load(label_ptr + i, mask=used, other=0).to(tl.int64), -1)  # -1: matches no class
    bad = used & ((y < 0) | (y >= C))
    return used, valid, w, y, bad


@triton.jit
def _bf16_bits(x):
    # float32 -> bfloat16 bit pattern, rounded to nearest even as torch rounds (NaN stays NaN). The Triton
    # interpreter's own float32 -> bfloat16 cast truncates, so the rounding is spelled out (a few integer ops).
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _ce_forward_kernel(
    z_ptr, label_ptr, weight_ptr, valid_ptr, lse_ptr, part_ptr,
    NPARTS, C, HW, W, s_b, s_c, s_h, s_w,
    HAS_VALID: tl.constexpr, IGNORE_MAP: tl.constexpr, FLAT_HW: tl.constexpr, ACC: tl.constexpr,
    WIDE: tl.constexpr, USE_LIBDEVICE: tl.constexpr, SPLIT_MAX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    if WIDE:  # one image spans >= 2^31 elements: int64 offsets (from the block start on)
        pid_p = pid_p.to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    i = b * HW + p
    used, valid, w, y, bad = _used_pixels(label_ptr, weight_ptr, valid_ptr, i, pm, C, HAS_VALID, IGNORE_MAP, ACC)
    base = b * s_b + pixel_offsets(p, W, s_h, s_w, FLAT_HW)

    m = tl.full((BLOCK_P,), float("-inf"), ACC)
    # SPLIT_MAX (float32): sum exp(z - m) - 1 over the classes so far, the max's own 1 taken out once. Float64 sums
    # the whole sum exp(z - m) (its rest, s - 1, is exact to 1e-16 of 1) and keeps the registers of the split.
    rest = tl.zeros((BLOCK_P,), ACC)
    z_y = tl.zeros((BLOCK_P,), ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        if WIDE:
            cols = cols.to(tl.int64)
        mask = used[:, None] & (cols < C)[None, :]
        z = tl.load(z_ptr + base[:, None] + cols[None, :] * s_c, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = _finite_or_zero(m_new)
        if SPLIT_MAX:
            tie = z == m_new[:, None]  # a logit equal to the max counts 1, also an infinite one (not exp(inf - inf))
            ties = tl.sum(tie.to(ACC), axis=1)
            others = tl.sum(tl.where(tie, 0.0, tl.exp(z - shift[:, None])), axis=1)
            # A new max rescales the terms so far (their 1 included), brings its own 1, taken out: (rest+1) e - 1 + ties
            rest = tl.where(m_new > m, (rest + 1.0) * tl.exp(m - shift) + (ties - 1.0), rest + ties) + others
        else:
            rest = rest * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    if not SPLIT_MAX:
        rest = tl.where(used, rest - 1.0, 0.0)  # unused rows hold s = 0
    # The log-sum-exp in its two parts (csrc/csl_ce.h): CE = (max - z_y) + log1p(rest), the difference in float64.
    # Unused rows (m = -inf) hold 0, also in the weighted term (0 * -inf would be NaN before the masked sum).
    m = tl.where(used, m, 0.0)
    log_sum = tl.where(used, _log1p(rest, USE_LIBDEVICE), 0.0)
    ce_parts = (m.to(tl.float64) - z_y.to(tl.float64)) + log_sum.to(tl.float64)
    ce = tl.where(bad, float("nan"), w * ce_parts.to(ACC))
    tl.store(lse_ptr + 2 * i, m, mask=pm)
    tl.store(lse_ptr + 2 * i + 1, log_sum, mask=pm)

    # Each pixel's term in ACC, their sum in float64 (as the C++ kernels add them): large weights of both signs that
    # cancel leave the other pixels' terms intact.
    part = pid_p + b * tl.num_programs(0)
    tl.store(part_ptr + part, tl.sum(tl.where(used, ce, 0.0).to(tl.float64), axis=0))
    tl.store(part_ptr + NPARTS + part, tl.sum(valid.to(tl.int32), axis=0).to(tl.float64))  # <= BLOCK_P: exact


@triton.jit
def _ce_reduce_kernel(part_ptr, loss_ptr, count_ptr, n, BLOCK: tl.constexpr):
    # part_ptr: n per-program loss sums, then their n valid-pixel counts
    acc = tl.zeros((BLOCK,), tl.float64)
    cnt = tl.zeros((BLOCK,), tl.int64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0)
        cnt += tl.load(part_ptr + n + offs, mask=offs < n, other=0).to(tl.int64)
    total = tl.sum(acc, axis=0)
    count = tl.sum(cnt, axis=0)
    tl.store(loss_ptr, (total / tl.maximum(count, 1).to(tl.float64)).to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr, count)


@triton.jit
def _ce_backward_kernel(
    grad_loss_ptr, count_ptr, z_ptr, label_ptr, weight_ptr, valid_ptr, lse_ptr, g_ptr,
    C, HW, W, s_b, s_c, s_h, s_w, g_b, g_c, g_h, g_w,
    HAS_VALID: tl.constexpr, IGNORE_MAP: tl.constexpr, FLAT_HW: tl.constexpr, G_FLAT_HW: tl.constexpr,
    ACC: tl.constexpr,
    BF16_BITS: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    if WIDE:
        pid_p = pid_p.to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    i = b * HW + p
    used, valid, w, y, bad = _used_pixels(label_ptr, weight_ptr, valid_ptr, i, pm, C, HAS_VALID, IGNORE_MAP, ACC)
    scale = tl.load(grad_loss_ptr).to(ACC) / tl.maximum(tl.load(count_ptr), 1).to(ACC)
    coef = tl.where(bad, float("nan"), scale * w)
    lse_hi = tl.load(lse_ptr + 2 * i, mask=used, other=0).to(ACC)  # the max logit and log1p(rest) (csrc/csl_ce.h)
    lse_lo = tl.load(lse_ptr + 2 * i + 1, mask=used, other=0).to(ACC)
    base = b * s_b + pixel_offsets(p, W, s_h, s_w, FLAT_HW)
    g_base = b * g_b + pixel_offsets(p, W, g_h, g_w, G_FLAT_HW)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        if WIDE:
            cols = cols.to(tl.int64)
        cm = (cols < C)[None, :]
        z = tl.load(z_ptr + base[:, None] + cols[None, :] * s_c, mask=used[:, None] & cm, other=0).to(ACC)
        soft = tl.exp((z - lse_hi[:, None]) - lse_lo[:, None])
        grad = coef[:, None] * tl.where(cols[None, :] == y[:, None], soft - 1.0, soft)
        grad = tl.where(used[:, None], grad, 0.0)
        if BF16_BITS:  # g_ptr is an int16 view of a bfloat16 gradient
            grad = _bf16_bits(grad.to(tl.float32))
        tl.store(g_ptr + g_base[:, None] + cols[None, :] * g_c, grad.to(g_ptr.dtype.element_ty),
                 mask=pm[:, None] & cm)


class _Plan(NamedTuple):
    """What a launch needs beyond the tensors, fixed by the call's shape, layout, dtype and configuration: built once
    per such call (:func:`_plan`), so a repeated call's host side is a dict lookup, the allocations and the launch."""

    grid: tuple[int, int]
    n_parts: int  # forward programs: one partial loss sum and one valid-pixel count each
    constexprs: dict  # the kernel's keyword arguments (constexprs and num_warps)
    strides: tuple[int, ...]  # the logits' (s_b, s_c, s_h, s_w), then the gradient's (backward)


_PLANS: dict[tuple, _Plan] = {}
MAX_PLANS = 4096


def _plan(kind: str, config: Config, logits: torch.Tensor, valid: torch.Tensor | None,
          grad: torch.Tensor | None = None) -> _Plan:
    has_valid, ignore_map = validity_flags(valid)
    key = (kind, config, logits.shape, logits.stride(), logits.dtype, has_valid, ignore_map,
           None if grad is None else grad.stride())
    plan = _PLANS.get(key)
    if plan is None:
        bsz, num_classes, height, width = logits.shape
        hw = height * width
        block_p, block_c = _blocks(num_classes, config)
        sb, sh, sw, flat = pixel_strides(logits)
        constexprs = dict(HAS_VALID=has_valid, IGNORE_MAP=ignore_map, FLAT_HW=flat, ACC=tl_dtype(compute_dtype(logits)),
                          BLOCK_P=block_p, BLOCK_C=block_c, num_warps=config.num_warps)
        strides = (sb, logits.stride(1), sh, sw)
        if grad is None:
            constexprs.update(WIDE=wide(logits, extra=(hw,)), USE_LIBDEVICE=USE_LIBDEVICE,
                              SPLIT_MAX=compute_dtype(logits) != torch.float64)
        else:
            g_sb, g_sh, g_sw, g_flat = pixel_strides(grad)
            strides += (g_sb, grad.stride(1), g_sh, g_sw)
            constexprs.update(G_FLAT_HW=g_flat, BF16_BITS=grad.dtype == torch.bfloat16,
                              WIDE=wide(logits, grad, extra=(hw,)))
        grid = (cdiv(hw, block_p), bsz)
        plan = _Plan(grid, grid[0] * bsz, constexprs, strides)
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def weighted_cross_entropy_launch(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor,
                                  valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass: ``(loss, lse, count)``, :class:`~csl_kernels.weighted_cross_entropy.CrossEntropyOutputs`
    (``count``: the valid pixels, what the backward pass divides by). ``label``, ``weight`` and ``valid`` are
    contiguous (:func:`_contiguous_maps`)."""
    bsz, num_classes, height, width = logits.shape
    slices = batch_slices(bsz)
    if slices is not None:
        return _forward_in_slices(logits, label, weight, valid, slices)
    dev = logits.device
    loss, lse, count = weighted_cross_entropy_outputs_like(logits)
    hw = height * width

    def launch(config: Config) -> None:
        plan = _plan("forward", config, logits, valid)
        parts = torch.empty(max(2 * plan.n_parts, 1), dtype=torch.float64, device=dev)  # loss sums, then counts
        if plan.n_parts > 0:
            _ce_forward_kernel[plan.grid](logits, label, weight, valid, lse, parts, plan.n_parts, num_classes, hw,
                                          width, *plan.strides, **plan.constexprs)
        _ce_reduce_kernel[(1,)](parts, loss, count, plan.n_parts, BLOCK=REDUCE_BLOCK, num_warps=4)

    with device_guard(logits):
        if hw * bsz > 0:
            tuned(FORWARD, logits, launch)
        else:
            launch(DEFAULT_CONFIG)
    return loss, lse, count


def _forward_in_slices(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None,
                       slices: list[slice]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass of a batch above one launch's images, slice by slice: each slice's loss is its weighted sum
    over its own count, so the sums are recovered (in float64) and divided by the batch's count."""
    parts = [weighted_cross_entropy_launch(logits[s], label[s], weight[s], rows(valid, s)) for s in slices]
    counts = torch.stack([count for _, _, count in parts])
    sums = torch.stack([loss.double() * count.clamp_min(1) for loss, _, count in parts])
    count = counts.sum()
    loss = (sums.sum() / count.clamp_min(1)).to(parts[0][0].dtype)
    return loss, torch.cat([lse for _, lse, _ in parts]), count


def _contiguous_maps(label: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None):
    """The B x H x W maps as the launchers read them: contiguous copies (no-ops when already so; the maps are C times
    smaller than the logits), made once per call where a call enters (the registered implementation, the ops)."""
    return label.contiguous(), weight.contiguous(), None if valid is None else valid.contiguous()


@torch.library.custom_op("csl_triton::weighted_cross_entropy", mutates_args=())
def _wce_forward(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return weighted_cross_entropy_launch(logits, *_contiguous_maps(label, weight, valid))


@_wce_forward.register_fake
def _(logits, label, weight, valid):
    return tuple(weighted_cross_entropy_outputs_like(logits))


def weighted_cross_entropy_backward_launch(grad_loss: torch.Tensor, logits: torch.Tensor, label: torch.Tensor,
                                           weight: torch.Tensor, valid: torch.Tensor | None, lse: torch.Tensor,
                                           count: torch.Tensor) -> torch.Tensor:
    """grad_logits = grad_loss * w * (softmax - onehot) / max(count, 1) on used pixels, exactly 0 elsewhere (the
    forward inputs, then the forward's saved outputs: the arguments of the autograd.Function's backward). The maps
    and ``lse`` are contiguous, as the forward pass took and gave them."""
    bsz, num_classes, height, width = logits.shape
    slices = batch_slices(bsz)
    if slices is not None:  # every slice divides by the whole batch's count
        return torch.cat([weighted_cross_entropy_backward_launch(grad_loss, logits[s], label[s], weight[s],
                                                                 rows(valid, s), lse[s], count) for s in slices])
    grad = torch.empty_like(logits)
    if grad.numel() == 0:
        return grad
    dt = compute_dtype(logits)
    if grad_loss.dim() != 0 or grad_loss.dtype != dt:  # autograd gives a 0-dim tensor of the loss's dtype
        grad_loss = grad_loss.reshape(()).to(dt)
    grad_out = grad.view(torch.int16) if grad.dtype == torch.bfloat16 else grad  # BF16_BITS: stored as int16 bits

    def launch(config: Config) -> None:
        plan = _plan("backward", config, logits, valid, grad)
        _ce_backward_kernel[plan.grid](grad_loss, count, logits, label, weight, valid, lse, grad_out, num_classes,
                                       height * width, width, *plan.strides, **plan.constexprs)

    with device_guard(logits):
        tuned(BACKWARD, logits, launch)
    return grad


@torch.library.custom_op("csl_triton::weighted_cross_entropy_backward", mutates_args=())
def _wce_backward(grad_loss: torch.Tensor, logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor,
                  valid: torch.Tensor | None, lse: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return weighted_cross_entropy_backward_launch(grad_loss, logits, *_contiguous_maps(label, weight, valid),
                                                  lse.contiguous(), count)


@_wce_backward.register_fake
def _(grad_loss, logits, label, weight, valid, lse, count):
    return torch.empty_like(logits)


register_cross_entropy_autograd(_wce_forward, _wce_backward)


@register("weighted_cross_entropy", "triton")
def weighted_cross_entropy_triton(
    logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """0-dim loss (float32; float64 for float64 logits), differentiable w.r.t. ``logits`` (weights are constants)."""
    if torch.compiler.is_compiling() or (under_torch_func() and not logits.requires_grad):  # traced, or vmap
        refuse_dual(logits, weight)  # torch.func.jvp: the op would drop the tangent
        return _wce_forward(logits, label, weight, valid)[0]
    return _cross_entropy(logits, *_contiguous_maps(label, weight, valid))  # what the Function saves, contiguous


_cross_entropy = fused_cross_entropy("triton", weighted_cross_entropy_launch, weighted_cross_entropy_backward_launch,
                                     _wce_backward)
register_not_differentiable(_wce_backward, "weighted_cross_entropy_backward")
