"""The trainer's CSL training step (``csl.step.train_step``) with the official selection vs csl_kernels.

    python -m csl_bench.bench_train_step [--device cpu|cuda] [--smoke | --suite coco] [--steps N]

GPU: DeepLabV3+ ResNet-101, crop 321, 8 labeled + 8 unlabeled + 8 mix images, bf16 autocast, 21 classes.
CPU: ResNet-18, crop 129, 2 + 2 + 2 images, float32. ``--smoke``: ResNet-18, crop 33, 1 + 1 + 1, 5 classes.
``--suite coco``: UniMatch's COCO step per GPU, Xception-65, crop 513, 2 + 2 + 2 images, bf16 autocast, 81 classes.

The step is the one ``csl train`` runs (mix batch predicted without gradients and selected; labeled + weak unlabeled
images with the feature-perturbed decoder pass; selection; CutMix-ed strong view; TMP on the mild view; supervised
CE plus the three weighted pseudo-label losses; SGD and the poly schedule). Only its CSL parts change between the
compared selections: ``official`` swaps in csl_bench/official.py (per-image SVD loop, eager TMP, UniMatch's loss),
the others are ``csl.selection.Selector`` + ``csl.step.KernelOps`` on one backend.

The CSL-specific work (selection + masking + the weighted losses, forward and backward) is timed inside the step
with CUDA events (perf_counter on CPU): the forward through ``train_step``'s ``region`` hook, the backward of each
weighted loss between two identity autograd nodes placed around it (on the loss and on the logits), whose backward
calls mark where the loss's own backward begins and ends within ``loss.backward()``.
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

from csl.losses import CrossEntropy
from csl.model import build_model
from csl.selection import Selector
from csl.step import KernelOps, StepConfig, train_step
from csl.trainer import build_scheduler
from csl_kernels import IGNORE_INDEX, PCOSResult, unavailable_reason

from .official import official_pcos, official_trusted_mask, unimatch_weighted_cross_entropy
from .runner import error_reason, exit_status
from .settings import FUSED, resolve_device
from .timing import quantiles, synchronize

CSL_OPS = ("pcos_weights", "trusted_mask", "weighted_cross_entropy")


@dataclass(frozen=True)
class BenchShape:
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
    "gpu": BenchShape("resnet101", 321, 8, 21, torch.bfloat16),
    "cpu": BenchShape("resnet18", 129, 2, 21, None),
    "smoke": BenchShape("resnet18", 33, 1, 5, None),
    "coco": BenchShape("xception", 513, 2, 81, torch.bfloat16),
}
STEPS = {"gpu": (10, 3), "cpu": (3, 1), "smoke": (1, 1), "coco": (10, 3)}  # suite -> (timed steps, warm-up steps)


class OfficialSelector:
    """``official_pcos`` behind the trainer's selector interface."""

    mode = "official"

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, ignore: torch.Tensor | None, truth: torch.Tensor | None = None
                 ) -> PCOSResult:
        return PCOSResult(*official_pcos(logits.detach(), ignore))


class OfficialOps:
    """Eager TMP and UniMatch's weighted loss behind the trainer's ``KernelOps`` interface."""

    def mask(self, images, reliable, *, block, rate, generator):
        return official_trusted_mask(images, reliable, block=block, rate=rate, generator=generator)[0]

    def loss(self, logits, label, weight, ignore):
        return unimatch_weighted_cross_entropy(logits, label, weight, ignore)


@dataclass
class Selection:
    """The pluggable CSL parts of the step."""

    name: str
    selector: Callable  # (logits, ignore) -> PCOSResult
    ops: object  # .mask(images, reliable, block=, rate=, generator=) and .loss(logits, label, weight, ignore)


def official_selection() -> Selection:
    return Selection("official", OfficialSelector(), OfficialOps())


def kernel_selection(backend: str) -> Selection:
    return Selection("eager" if backend == "reference" else backend, Selector(mode="csl", backend=backend),
                     KernelOps(backend))


class RegionTimer:
    """Sums the time of named regions within a step: CUDA events (no host sync inside the step) or perf_counter.

    ``timer(name)`` is a context manager (forward regions); ``open(key)`` / ``close(key, name)`` bracket a region
    whose two ends are seen at different places (the backward of a loss).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.spans: list[tuple[str, object, object]] = []
        self._open: dict[int, object] = {}

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        begin = self._now()
        yield
        self.spans.append((name, begin, self._now()))

    def open(self, key: int) -> None:
        self._open[key] = self._now()

    def close(self, key: int, name: str) -> None:
        self.spans.append((name, self._open.pop(key), self._now()))

    def reset(self) -> None:
        self.spans.clear()
        self._open.clear()

    def totals_ms(self) -> dict[str, float]:
        """Call after the step was synchronised."""
        totals: dict[str, float] = {}
        for name, begin, end in self.spans:
            ms = begin.elapsed_time(end) if self.device.type == "cuda" else (end - begin) * 1e3
            totals[name] = totals.get(name, 0.0) + ms
        self.spans.clear()
        if self._open:
            raise RuntimeError(f"{len(self._open)} backward region(s) never closed")
        return totals


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward calls ``hook`` (an autograd node placed only to observe the backward order)."""

    @staticmethod
    def forward(ctx, x, hook):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook()
        return grad, None


class TimedOps:
    """Wraps ``ops`` so that the backward of each weighted loss is timed as region ``name``: the mark on the loss
    runs first in the backward pass (it opens the region), the mark on the logits right after the loss's own
    backward nodes (it closes it)."""

    def __init__(self, ops, timer: RegionTimer, name: str = "loss_backward"):
        self.ops, self.timer, self.name = ops, timer, name
        self._count = 0

    def mask(self, *args, **kwargs):
        return self.ops.mask(*args, **kwargs)

    def loss(self, logits, label, weight, ignore):
        self._count += 1
        key = self._count
        logits = _BackwardMark.apply(logits, lambda: self.timer.close(key, self.name))
        loss = self.ops.loss(logits, label, weight, ignore)
        return _BackwardMark.apply(loss, lambda: self.timer.open(key))


def make_batches(cfg: BenchShape, device: torch.device, seed: int = 0) -> tuple[dict, dict, dict]:
    """Labeled, unlabeled and mix batches in the trainer's format (random images, padded unlabeled borders)."""
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.batch, cfg.crop

    def images():
        return torch.randn(b, 3, s, s, generator=g).to(device)

    ignore = torch.zeros(b, s, s, dtype=torch.int64)
    ignore[:, :, s - s // 8:] = IGNORE_INDEX  # padded border of the crop
    mask_x = torch.randint(0, cfg.classes, (b, s, s), generator=g)
    mask_x[:, s - s // 10:, :] = IGNORE_INDEX
    no_gt = torch.full((b, s, s), IGNORE_INDEX, dtype=torch.int64, device=device)

    def unlabeled(pad):
        return {"image_w": images(), "image_s": images(), "image_s2": images(), "image_m": images(),
                "ignore": pad.to(device), "mask": no_gt}

    return {"image": images(), "mask": mask_x.to(device)}, unlabeled(ignore), unlabeled(ignore.flip(2))


def selection_or_reason(name: str, device: torch.device):
    if name == "official":
        return official_selection()
    backend = "reference" if name == "eager" else name
    reasons = [f"{op}: {why}" for op in CSL_OPS if (why := unavailable_reason(op, backend, device)) is not None]
    return "; ".join(reasons) if reasons else kernel_selection(backend)


def run(device: torch.device, suite: str, steps: int | None = None, warmup: int | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
    cfg = CONFIGS[suite]
    steps = steps or STEPS[suite][0]
    warmup = warmup if warmup is not None else STEPS[suite][1]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model({"backbone": cfg.backbone, "output_stride": 16, "dilations": [6, 12, 18]}, cfg.classes)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.param_groups(1e-3, 10.0), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, 10**9)  # the poly schedule, kept near lr_0
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp_dtype == torch.float16)
    criterion = CrossEntropy(IGNORE_INDEX)
    batches = make_batches(cfg, device)
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

    def step(sel: Selection) -> None:
        train_step(model, optimizer, scheduler, scaler, *batches, selector=sel.selector, criterion=criterion,
                   cfg=StepConfig(amp_dtype=cfg.amp_dtype), generator=generator,
                   ops=TimedOps(sel.ops, timer), region=timer)

    def one_step(name: str, timed: bool) -> None:
        sel = ready[name]
        if not timed:
            step(sel)
            synchronize(device)
            timer.totals_ms()
            return
        if device.type == "cuda":
            gc.collect()
            torch.cuda.reset_peak_memory_stats(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step(sel)
            end.record()
            torch.cuda.synchronize(device)
            step_ms[name].append(begin.elapsed_time(end))
            peak[name] = max(peak.get(name, 0), int(torch.cuda.max_memory_allocated(device)))
        else:
            t0 = time.perf_counter()
            step(sel)
            step_ms[name].append((time.perf_counter() - t0) * 1e3)
        totals = timer.totals_ms()
        csl_ms[name].append(sum(totals.values()))
        for key, value in totals.items():
            parts[name].setdefault(key, []).append(value)

    # Warm-up of every selection, then the timed steps interleaved (one step of each selection per round), so a
    # change of load on a shared machine hits them all alike.
    for phase, count in (("warmup", warmup), ("timed", steps)):
        said = time.perf_counter()
        for round_ in range(count):
            if time.perf_counter() - said > 10:  # long rounds (a CPU, a large config): how far, every 10 s
                log(f"train_step {phase} round {round_ + 1} of {count} ({len(ready)} selections)")
                said = time.perf_counter()
            for name in list(ready):
                try:
                    one_step(name, timed=phase == "timed")
                except Exception as exc:  # noqa: BLE001 - reported, never dropped
                    timer.reset()
                    by_name[name].update(status="error", reason=error_reason(exc))
                    log(f"train_step {name:8s} error: {by_name[name]['reason']}")
                    del ready[name]
    for name in ready:
        record = by_name[name]
        record.update(status="ok", step_ms=quantiles(step_ms[name]), csl_ms=quantiles(csl_ms[name]),
                      csl_parts_ms={k: quantiles(v)["median"] for k, v in parts[name].items()})
        record["csl_share_pct"] = 100.0 * record["csl_ms"]["median"] / record["step_ms"]["median"]
        record["peak_bytes"] = peak.get(name)
        if device.type != "cuda":
            record["note"] = "peak memory measured on CUDA only"
        log(f"train_step {name:8s} step {record['step_ms']['median']:9.1f} ms, CSL-specific "
            f"{record['csl_ms']['median']:8.2f} ms ({record['csl_share_pct']:.2f}%)")
    add_step_speedups(records)
    return records


def add_step_speedups(records: list[dict]) -> None:
    """``x_official``: the step with the official selection's median time over each selection's, per config."""
    for config in {r["config"] for r in records}:
        rows = [r for r in records if r["config"] == config]
        official = next((r for r in rows if r["selection"] == "official" and r["status"] == "ok"), None)
        for r in rows:
            if official is not None and r["status"] == "ok":
                r["x_official"] = official["step_ms"]["median"] / r["step_ms"]["median"]


def main(argv=None) -> list[dict]:
    from .report import train_table

    parser = argparse.ArgumentParser(prog="python -m csl_bench.bench_train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true")
    which.add_argument("--suite", choices=sorted(CONFIGS), default=None,
                       help="the model and batch (default: gpu on cuda, cpu on cpu; coco: UniMatch's COCO step, "
                            "Xception-65 crop 513, 2 + 2 + 2 images, 81 classes, bf16)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    suite = args.suite or ("smoke" if args.smoke else ("gpu" if device.type == "cuda" else "cpu"))
    records = run(device, suite, args.steps)
    print()
    print(train_table(records))
    return records


if __name__ == "__main__":
    raise SystemExit(exit_status({"train_step": main(sys.argv[1:])}))
