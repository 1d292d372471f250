"""One CSL training step (UniMatch-style, DeepLabV3+) with the official selection vs csl_kernels.

    python -m bench.bench_train_step [--device cpu|cuda] [--smoke] [--steps N]

GPU: DeepLabV3+ ResNet-101, crop 321, 8 labeled + 8 unlabeled + 8 mix images, bf16 autocast, 21 classes.
CPU: ResNet-18, crop 129, 2 + 2 + 2 images, float32. ``--smoke``: ResNet-18, crop 33, 1 + 1 + 1, 5 classes.

The step (built here from ``csl.model.build_model``, with the selection pluggable so the official one can be swapped
in): the mix batch is predicted without gradients and selected; the labeled and weak unlabeled images go through the
model with the feature-perturbed decoder pass; the weak prediction is selected (weights, pseudo-labels, reliable
mask); Trusted Mask Perturbation hides reliable pixels of the mild view; the CutMix-ed strong view and the masked view
go through the model; the supervised CE plus the three weighted pseudo-label losses are back-propagated and SGD steps.

The CSL-specific work (selection + masking + weighted loss forward and its backward down to the logits) is timed
inside the step with CUDA events (perf_counter on CPU): the gradient of the unlabeled losses w.r.t. the logits is
taken with ``torch.autograd.grad`` (timed) and then pushed through the network with ``torch.autograd.backward``
(not timed), which is the same computation as one ``loss.backward()``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import csl_kernels
from csl.model import build_model
from csl_kernels import IGNORE_INDEX, unavailable_reason

from .common import FUSED, _quantiles, error_reason, synchronize
from .official import official_pcos, official_trusted_mask, unimatch_weighted_cross_entropy

CSL_OPS = ("pcos_weights", "trusted_mask", "weighted_cross_entropy")


@dataclass(frozen=True)
class StepConfig:
    backbone: str
    crop: int
    batch: int
    classes: int
    amp_dtype: torch.dtype | None

    @property
    def name(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return f"deeplabv3plus-{self.backbone} crop{self.crop} B{self.batch}+{self.batch}+{self.batch} {amp}"


CONFIGS = {
    "gpu": StepConfig("resnet101", 321, 8, 21, torch.bfloat16),
    "cpu": StepConfig("resnet18", 129, 2, 21, None),
    "smoke": StepConfig("resnet18", 33, 1, 5, None),
}


@dataclass
class Selection:
    """The pluggable CSL parts of the step."""

    name: str
    select: Callable  # (logits, ignore) -> (weight, label, reliable)
    mask: Callable  # (images, reliable, generator) -> masked images
    loss: Callable  # (logits, label, weight, ignore) -> scalar


def official_selection() -> Selection:
    return Selection(
        "official",
        select=lambda logits, ignore: official_pcos(logits, ignore),
        mask=lambda images, reliable, gen: official_trusted_mask(images, reliable, generator=gen)[0],
        loss=unimatch_weighted_cross_entropy,
    )


def kernel_selection(backend: str) -> Selection:
    def select(logits, ignore):
        result = csl_kernels.pcos_weights(logits, ignore, backend=backend)
        return result.weight, result.label, result.reliable

    return Selection(
        "eager" if backend == "reference" else backend,
        select=select,
        mask=lambda images, reliable, gen: csl_kernels.trusted_mask(images, reliable, generator=gen,
                                                                    backend=backend)[0],
        loss=lambda logits, label, weight, ignore: csl_kernels.weighted_cross_entropy(logits, label, weight, ignore,
                                                                                      backend=backend),
    )


class RegionTimer:
    """Sums the time of named regions within a step: CUDA events (no host sync inside the step) or perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spans: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
        else:
            begin = time.perf_counter()
            yield
            end = time.perf_counter()
        self.spans.append((name, begin, end))

    def totals_ms(self) -> dict[str, float]:
        """Call after the step was synchronised."""
        totals: dict[str, float] = {}
        for name, begin, end in self.spans:
            ms = begin.elapsed_time(end) if self.device.type == "cuda" else (end - begin) * 1e3
            totals[name] = totals.get(name, 0.0) + ms
        self.spans.clear()
        return totals


def make_batch(cfg: StepConfig, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.batch, cfg.crop

    def images():
        return torch.randn(b, 3, s, s, generator=g).to(device)

    ignore = torch.zeros(b, s, s, dtype=torch.int64)
    ignore[:, :, s - s // 8:] = IGNORE_INDEX  # padded border of the crop
    mask_x = torch.randint(0, cfg.classes, (b, s, s), generator=g)
    mask_x[:, s - s // 10:, :] = IGNORE_INDEX
    box = torch.zeros(b, s, s, dtype=torch.bool)
    box[:, s // 4: s // 4 + s // 2, s // 3: s // 3 + s // 2] = True  # CutMix box
    return {"x": images(), "y": mask_x.to(device), "u_w": images(), "u_s": images(), "u_m": images(),
            "ignore_u": ignore.to(device), "mix_w": images(), "mix_s": images(),
            "ignore_mix": ignore.flip(2).to(device),
            "box": box.to(device)}


def train_step(model, optimizer, batch: dict, sel: Selection, timer: RegionTimer, amp_dtype, generator) -> None:
    device = batch["x"].device
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    nb = batch["x"].shape[0]
    with torch.no_grad():
        model.eval()
        with autocast:
            pred_mix = model(batch["mix_w"])
        model.train()
    with timer("select"):
        w_mix, l_mix, _ = sel.select(pred_mix, batch["ignore_mix"])
    with autocast:
        preds, preds_fp = model(torch.cat((batch["x"], batch["u_w"])), need_fp=True)
    pred_x, pred_u_w = preds[:nb], preds[nb:]
    pred_fp = preds_fp[nb:]
    with timer("select"):
        w_u, l_u, reliable_u = sel.select(pred_u_w.detach(), batch["ignore_u"])
    with timer("mask"):
        masked = sel.mask(batch["u_m"], reliable_u, generator)
    box = batch["box"]
    mixed = torch.where(box.unsqueeze(1), batch["mix_s"], batch["u_s"])
    with autocast:
        pred_s, pred_m = model(torch.cat((mixed, masked))).chunk(2)
    label_s = torch.where(box, l_mix, l_u)
    weight_s = torch.where(box, w_mix, w_u)
    ignore_s = torch.where(box, batch["ignore_mix"], batch["ignore_u"])
    loss_x = F.cross_entropy(pred_x.float(), batch["y"], ignore_index=IGNORE_INDEX)
    with timer("loss"):
        loss_u = (0.5 * sel.loss(pred_s, label_s, weight_s, ignore_s)
                  + 0.25 * sel.loss(pred_fp, l_u, w_u, batch["ignore_u"])
                  + 0.25 * sel.loss(pred_m, l_u, w_u, batch["ignore_u"]))
        grads_u = torch.autograd.grad(loss_u / 2, (pred_s, pred_fp, pred_m))
    (grad_x,) = torch.autograd.grad(loss_x / 2, pred_x)
    torch.autograd.backward((pred_x, pred_s, pred_fp, pred_m), (grad_x, *grads_u))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def selection_or_reason(name: str, device: torch.device):
    if name == "official":
        return official_selection()
    backend = "reference" if name == "eager" else name
    reasons = [f"{op}: {why}" for op in CSL_OPS if (why := unavailable_reason(op, backend, device)) is not None]
    return "; ".join(reasons) if reasons else kernel_selection(backend)


def run(device: torch.device, suite: str, steps: int | None = None, warmup: int | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
    cfg = CONFIGS[suite]
    steps = steps or {"gpu": 10, "cpu": 3, "smoke": 1}[suite]
    warmup = warmup if warmup is not None else {"gpu": 3, "cpu": 1, "smoke": 1}[suite]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model({"backbone": cfg.backbone, "output_stride": 16, "dilations": [6, 12, 18]}, cfg.classes)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.param_groups(1e-3, 10.0), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    batch = make_batch(cfg, device)
    records = []
    names = ("official", "eager") + tuple(b for b in FUSED if (b == "cpu") == (device.type == "cpu"))
    if suite == "smoke" and device.type == "cpu":
        names += ("triton",)
    ready: dict[str, Selection] = {}
    by_name: dict[str, dict] = {}
    for name in names:
        record = {"op": "train_step", "config": cfg.name, "selection": name, "steps": steps, "warmup": warmup}
        by_name[name] = record
        records.append(record)
        sel = selection_or_reason(name, device)
        if name == "triton" and device.type == "cpu" and not isinstance(sel, str):
            sel = "the triton interpreter is not a performance path; the train step runs triton on CUDA only"
        if isinstance(sel, str):
            record.update(status="unavailable", reason=sel)
            log(f"train_step {name:8s} unavailable: {sel}")
            continue
        ready[name] = sel
    timer = RegionTimer(device)
    generator = torch.Generator(device=device).manual_seed(0)
    step_ms: dict[str, list[float]] = {name: [] for name in ready}
    csl_ms: dict[str, list[float]] = {name: [] for name in ready}
    parts: dict[str, dict[str, list[float]]] = {name: {} for name in ready}
    peak: dict[str, int] = {}

    def one_step(name: str, timed: bool) -> None:
        sel = ready[name]
        if not timed:
            train_step(model, optimizer, batch, sel, timer, cfg.amp_dtype, generator)
            synchronize(device)
            timer.totals_ms()
            return
        if device.type == "cuda":
            gc.collect()
            torch.cuda.reset_peak_memory_stats(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            train_step(model, optimizer, batch, sel, timer, cfg.amp_dtype, generator)
            end.record()
            torch.cuda.synchronize(device)
            step_ms[name].append(begin.elapsed_time(end))
            peak[name] = max(peak.get(name, 0), int(torch.cuda.max_memory_allocated(device)))
        else:
            t0 = time.perf_counter()
            train_step(model, optimizer, batch, sel, timer, cfg.amp_dtype, generator)
            step_ms[name].append((time.perf_counter() - t0) * 1e3)
        totals = timer.totals_ms()
        csl_ms[name].append(sum(totals.values()))
        for key, value in totals.items():
            parts[name].setdefault(key, []).append(value)

    # Warm-up of every selection, then the timed steps interleaved (one step of each selection per round), so a
    # change of load on a shared machine hits them all alike.
    for phase, count in (("warmup", warmup), ("timed", steps)):
        for _ in range(count):
            for name in list(ready):
                try:
                    one_step(name, timed=phase == "timed")
                except Exception as exc:  # noqa: BLE001 - reported, never dropped
                    by_name[name].update(status="error", reason=error_reason(exc))
                    log(f"train_step {name:8s} error: {by_name[name]['reason']}")
                    del ready[name]
    for name in ready:
        record = by_name[name]
        record.update(status="ok", step_ms=_quantiles(step_ms[name]), csl_ms=_quantiles(csl_ms[name]),
                      csl_parts_ms={k: _quantiles(v)["median"] for k, v in parts[name].items()})
        record["csl_share_pct"] = 100.0 * record["csl_ms"]["median"] / record["step_ms"]["median"]
        record["peak_bytes"] = peak.get(name)
        if device.type != "cuda":
            record["note"] = "peak memory measured on CUDA only"
        log(f"train_step {name:8s} step {record['step_ms']['median']:9.1f} ms, CSL-specific "
            f"{record['csl_ms']['median']:8.2f} ms ({record['csl_share_pct']:.2f}%)")
    official = next((r for r in records if r["selection"] == "official" and r["status"] == "ok"), None)
    for r in records:
        if official is not None and r["status"] == "ok":
            r["x_official"] = official["step_ms"]["median"] / r["step_ms"]["median"]
    return records


def main(argv=None) -> list[dict]:
    from .common import train_table

    parser = argparse.ArgumentParser(prog="python -m bench.bench_train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suite = "smoke" if args.smoke else ("gpu" if device.type == "cuda" else "cpu")
    records = run(device, suite, args.steps)
    print()
    print(train_table(records))
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
