"""One semi-supervised CSL training step, on its own: UniMatch + CSL selection + Trusted Mask Perturbation.

:func:`train_step` is one iteration of the paper's method (:func:`supervised_step` the supervised-only baseline);
:class:`StepConfig` holds the numbers it needs and :class:`KernelOps` the CSL operations besides the selection.
:mod:`csl.trainer` runs it in a loop; the benchmarks time it directly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import csl_kernels
from csl_kernels import IGNORE_INDEX
from csl_kernels._checks import check_choice, check_fraction, check_positive_int
from csl_kernels.metrics import scored_pixels

from .config import CHOICES
from .selection import Selector

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

log = logging.getLogger("csl")


@dataclass(frozen=True)
class StepConfig:
    """The numbers one semi-supervised step needs (from the config's ``train``, ``tmp`` and ``kernels`` sections)."""

    lambda_s: float = 0.25
    lambda_m: float = 0.25
    lambda_fp: float = 0.5
    cutmix_p: float = 0.5
    tmp_enabled: bool = True
    tmp_block: int = 32
    tmp_rate: float = 0.7
    tmp_fraction: float = 0.5
    tmp_other_view: str = "strong_cutmix"  # the samples without TMP: strong view CutMix-ed (or "strong": not)
    amp_dtype: torch.dtype | None = None
    backend: str = "auto"
    num_classes: int = 0  # > 0: also count pseudo-label quality against the unlabeled ground truth
    ignore_index: int = IGNORE_INDEX  # the datasets map every file convention to it

    def __post_init__(self):
        check_choice(self.tmp_other_view, "tmp_other_view", CHOICES["tmp.other_view"])
        for name in ("cutmix_p", "tmp_rate", "tmp_fraction"):
            check_fraction(getattr(self, name), name)
        check_positive_int(self.tmp_block, "tmp_block")

    @classmethod
    def from_config(cls, cfg: dict, amp_dtype: torch.dtype | None, num_classes: int = 0) -> StepConfig:
        t, m = cfg["train"], cfg["tmp"]
        return cls(lambda_s=t["lambda_s"], lambda_m=t["lambda_m"], lambda_fp=t["lambda_fp"], cutmix_p=t["cutmix_p"],
                   tmp_enabled=m["enabled"], tmp_block=m["block"], tmp_rate=m["rate"], tmp_fraction=m["fraction"],
                   tmp_other_view=m["other_view"],
                   amp_dtype=amp_dtype, backend=cfg["kernels"]["backend"], num_classes=num_classes)


class KernelOps:
    """The CSL operations of a step besides the selection: Trusted Mask Perturbation and the weighted pseudo-label
    loss, from :mod:`csl_kernels` on ``backend``. :func:`train_step` takes any object with these two methods (the
    benchmarks swap in the official implementations, or wrap these to time them)."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def mask(self, images: torch.Tensor, reliable: torch.Tensor, *, block: int, rate: float,
             generator: torch.Generator) -> torch.Tensor:
        """Trusted Mask Perturbation: ``images`` with the reliable pixels under a random block grid hidden, fused by
        :func:`csl_kernels.trusted_mask`."""
        return csl_kernels.trusted_mask(images, reliable, block=block, rate=rate, generator=generator,
                                        backend=self.backend)[0]

    def loss(self, logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, ignore: torch.Tensor
             ) -> torch.Tensor:
        """The weighted pseudo-label CE of spec Sec. 5: ``sum_n w_n CE(z_n, y_n) / N_valid`` (``N_valid`` = pixels
        with ``ignore != 255``), fused by :func:`csl_kernels.weighted_cross_entropy`."""
        return csl_kernels.weighted_cross_entropy(logits, label, weight, ignore, backend=self.backend)


def _no_region(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def native_bfloat16(device: torch.device) -> bool:
    """Whether the GPU computes bfloat16 natively: NVIDIA from compute capability 8.0 (A100, H100, RTX 30xx on), and
    ROCm's. Older ones (V100, T4, RTX 20xx) emulate its convolutions and matrix products, far slower than float16."""
    return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """``auto``: bf16 autocast on a GPU with native bfloat16, fp16 (the trainer scales its loss) on an older GPU, fp32
    on CPU; the fp16 choice is said at INFO. ``bf16`` on an older GPU and ``fp16`` on a CPU are allowed and said in a
    warning naming the config ``key``: both run far slower there."""
    if amp not in ("auto", *AMP_DTYPES):
        raise ValueError(f"amp must be one of {['auto', *AMP_DTYPES]}, got {amp!r}")
    if device.type == "cuda" and amp in ("auto", "bf16") and not native_bfloat16(device):
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        if amp == "auto":
            log.info("%s=auto: float16 autocast on %s, which has no native bfloat16", key, gpu)
            return torch.float16
        log.warning("%s=bf16 on %s: this GPU has no native bfloat16, its bf16 convolutions and matrix products run "
                    "emulated, far slower; %s=auto or fp16 uses float16 (with loss scaling in training)", key, gpu,
                    key)
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type == "cpu":
        log.warning("%s=fp16 on a CPU: float16 autocast runs the convolutions there far slower than fp32 (most CPUs "
                    "have no fast float16 kernels); %s=fp32 or bf16 is the usual choice on a CPU", key, key)
    return AMP_DTYPES[amp]


# Candidate (ratio, position) draws per box: UniMatch redraws until the box fits in the crop; the first fitting one of
# these is that draw. A box none of them fits is clamped to the crop: at crop 321, 7.3 % of the boxes with 16
# candidates (23 % of those above 0.3 of the crop), 0.12 % with 64 (0.45 %); tests/test_unimatch_recipe.py computes it.
CUTMIX_CANDIDATES = 64


def cutmix_boxes(batch: int, height: int, width: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """UniMatch's CutMix boxes (``obtain_cutmix_box``) as a ``B x H x W`` bool mask, drawn on the generator's device
    without host syncs.

    With probability ``p`` a sample gets one box of area ``U(0.02, 0.4) * H * W``; its aspect ratio ``U(0.3, 1/0.3)``
    and top-left corner (uniform over the crop) are drawn again until the box fits inside the crop, as UniMatch does.
    The draws are float32, so the boxes depend on the generator's state and the sizes only (not on
    ``torch.get_default_dtype()``).
    """
    dev, k = generator.device, CUTMIX_CANDIDATES
    u = torch.rand(2 + 3 * k, batch, generator=generator, dtype=torch.float32, device=dev)
    apply = u[0] < p
    area = (0.02 + 0.38 * u[1]) * height * width
    ratio = 0.3 + (1 / 0.3 - 0.3) * u[2:2 + k]  # k x B
    box_w = (area / ratio).sqrt().floor()
    box_h = (area * ratio).sqrt().floor()
    x0 = (u[2 + k:2 + 2 * k] * width).floor()
    y0 = (u[2 + 2 * k:] * height).floor()
    fits = (x0 + box_w <= width) & (y0 + box_h <= height)
    first = fits.to(torch.uint8).argmax(0, keepdim=True)  # the first fitting candidate (0 when none fits)
    box_w, box_h, x0, y0 = (t.gather(0, first)[0] for t in (box_w, box_h, x0, y0))
    box_w, box_h = box_w.clamp(1, width), box_h.clamp(1, height)
    x0, y0 = torch.minimum(x0, width - box_w), torch.minimum(y0, height - box_h)
    cols = torch.arange(width, device=dev)
    rows = torch.arange(height, device=dev)
    in_x = (cols >= x0[:, None]) & (cols < (x0 + box_w)[:, None])
    in_y = (rows >= y0[:, None]) & (rows < (y0 + box_h)[:, None])
    return in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None]


def paste(box: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """``inside`` where ``box`` (``B x H x W``) holds, else ``outside``; images (``B x 3 x H x W``) or maps."""
    if inside.dim() == box.dim() + 1:
        box = box.unsqueeze(1)
    return torch.where(box, inside, outside)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, batch_x: dict, batch_u: dict,
               batch_mix: dict, *, selector: Selector, criterion: nn.Module, cfg: StepConfig,
               generator: torch.Generator, ops: KernelOps | None = None,
               region: Callable[[str], contextlib.AbstractContextManager] = _no_region) -> dict[str, torch.Tensor]:
    """One CSL iteration (UniMatch + CSL selection + Trusted Mask Perturbation); returns detached scalars.

    ``batch_x``: labeled ``image``, ``mask``; ``batch_u`` / ``batch_mix``: unlabeled ``image_w`` (weak),
    ``image_s`` and ``image_s2`` (the strong views of the two streams, colour-augmented independently), ``image_m``
    (mild), ``ignore`` (255 = padding) and ``mask`` (ground truth: pseudo-label metrics, and the pseudo-labels of the
    diagnostic ``selection.mode=oracle`` only).
    ``generator`` (on the model's device) draws the CutMix boxes, the masking-view choice and the TMP block grid.
    ``ops``: TMP and the weighted loss (default ``KernelOps(cfg.backend)``); ``region(name)`` wraps the CSL-specific
    work ("select", "mask", "loss") so a benchmark can time it.
    """
    ops = ops or KernelOps(cfg.backend)
    amp = autocast(batch_x["image"].device, cfg.amp_dtype)
    x, y = batch_x["image"], batch_x["mask"]
    u_w, u_s, u_m, ignore_u = batch_u["image_w"], batch_u["image_s"], batch_u["image_m"], batch_u["ignore"]
    n_x, (n_u, _, h, w) = x.shape[0], u_w.shape

    # 1. Pseudo-labels and weights of the CutMix source batch (the model in eval mode, no gradient).
    with torch.no_grad():
        model.eval()
        with amp:
            pred_mix = model(batch_mix["image_w"])
        model.train()
    with region("select"):
        sel_mix = selector(pred_mix, batch_mix["ignore"], truth=batch_mix["mask"])

    # 2. Labeled + weak unlabeled views together, with the feature-perturbed decoder pass; select from pred_w.
    with amp:
        preds, preds_fp = model(torch.cat((x, u_w)), need_fp=True)
    pred_x, pred_w = preds.split([n_x, n_u])
    pred_fp = preds_fp[n_x:]
    with region("select"):
        sel = selector(pred_w.detach(), ignore_u, truth=batch_u["mask"])

    # 3. Strong view, CutMix-ed with the mix batch: images, pseudo-labels, weights and padding inside the box.
    box = cutmix_boxes(n_u, h, w, cfg.cutmix_p, generator)
    img_s = paste(box, batch_mix["image_s"], u_s)
    label_s, weight_s = paste(box, sel_mix.label, sel.label), paste(box, sel_mix.weight, sel.weight)
    ignore_s = paste(box, batch_mix["ignore"], ignore_u)

    # 4. Masking view (TMP): a random share of the samples gets the mild view with reliable pixels hidden under the
    #    block grid; the others get the second strong view with its own CutMix box (tmp.other_view=strong_cutmix) or,
    #    as the authors' released code does, the strong view without CutMix and the weak view's own labels (strong).
    fraction = cfg.tmp_fraction if cfg.tmp_enabled else 0.0
    use_tmp = torch.rand(n_u, generator=generator, dtype=torch.float32, device=generator.device) < fraction
    box2 = cutmix_boxes(n_u, h, w, cfg.cutmix_p, generator) & ~use_tmp[:, None, None]
    if cfg.tmp_other_view == "strong":
        box2 = torch.zeros_like(box2)
    img_m = paste(box2, batch_mix["image_s2"], batch_u["image_s2"])
    if cfg.tmp_enabled:
        with region("mask"):
            masked = ops.mask(u_m, sel.reliable, block=cfg.tmp_block, rate=cfg.tmp_rate, generator=generator)
        img_m = torch.where(use_tmp[:, None, None, None], masked, img_m)
    label_m, weight_m = paste(box2, sel_mix.label, sel.label), paste(box2, sel_mix.weight, sel.weight)
    ignore_m = paste(box2, batch_mix["ignore"], ignore_u)

    with amp:
        pred_s, pred_m = model(torch.cat((img_s, img_m))).chunk(2)

    # 5. Loss = (L_x + lambda_s L_s + lambda_m L_m + lambda_fp L_fp) / 2; unlabeled terms are the CSL-weighted CE
    #    normalised by the valid (non-padded) pixels.
    loss_x = criterion(pred_x, y)
    with region("loss"):
        loss_s = ops.loss(pred_s, label_s, weight_s, ignore_s)
        loss_m = ops.loss(pred_m, label_m, weight_m, ignore_m)
        loss_fp = ops.loss(pred_fp, sel.label, sel.weight, ignore_u)
    loss = (loss_x + cfg.lambda_s * loss_s + cfg.lambda_m * loss_m + cfg.lambda_fp * loss_fp) / 2

    # 6. SGD step (gradient scaling only for fp16) and the poly schedule.
    optimizer_step(loss, optimizer, scheduler, scaler)

    valid = ignore_u != cfg.ignore_index
    out = {"loss": loss, "loss_x": loss_x, "loss_s": loss_s, "loss_m": loss_m, "loss_fp": loss_fp,
           "weight_sum": (sel.weight * valid).sum(dtype=torch.float64), "valid": valid.sum(dtype=torch.float64)}
    if cfg.num_classes:
        target = batch_u["mask"]
        out["pl_counts"] = csl_kernels.pseudo_label_counts(sel.label, sel.reliable, target, cfg.num_classes,
                                                           cfg.ignore_index)
        # The soft weights against the ground truth (what the weighted losses train on): their sum and the sum on
        # correct pseudo-labels, over the pixels the counts above cover.
        scored = scored_pixels(sel.label, target, cfg.num_classes, cfg.ignore_index)
        w = torch.where(scored, sel.weight.double(), 0.0)
        out["pl_weighted"] = torch.stack([w.sum(), torch.where(sel.label == target, w, 0.0).sum()])
    return {k: v.detach() for k, v in out.items()}


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, batch_x: dict, *,
                    criterion: nn.Module, amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The supervised-only baseline: CE (or OHEM) on the labeled batch."""
    with autocast(batch_x["image"].device, amp_dtype):
        pred_x = model(batch_x["image"])
    loss_x = criterion(pred_x, batch_x["mask"])
    optimizer_step(loss_x, optimizer, scheduler, scaler)
    return {"loss": loss_x.detach(), "loss_x": loss_x.detach()}


__all__ = ["AMP_DTYPES", "KernelOps", "StepConfig", "autocast", "cutmix_boxes", "optimizer_step", "paste",
           "resolve_amp", "supervised_step", "train_step"]
