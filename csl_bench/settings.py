"""What a benchmark run measures: the providers, shapes and dtypes of each suite, :class:`Settings` and the
command-line options every benchmark entry point shares."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Every provider is reported for every op, in this order; one that cannot run is listed with its reason.
PROVIDERS = ("official", "eager", "compile", "triton", "cuda", "cpu")
FUSED = ("triton", "cuda", "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    classes: int
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.batch * self.height * self.width

    def dims(self) -> dict:
        return {"B": self.batch, "C": self.classes, "H": self.height, "W": self.width}


SHAPES = {
    "gpu": (Shape("voc321", 16, 21, 321, 321), Shape("voc513", 8, 21, 513, 513),
            Shape("city801", 4, 19, 801, 801), Shape("coco513", 8, 81, 513, 513)),
    # The CPU goal shape of issue 3 and a smaller one.
    "cpu": (Shape("cpu321", 4, 21, 321, 321), Shape("cpu161", 2, 21, 161, 161)),
    "smoke": (Shape("smoke", 2, 5, 17, 19),),
}
SUITE_DTYPES = {"gpu": ("fp32", "bf16"), "cpu": ("fp32", "bf16"), "smoke": ("fp32",)}


@dataclass
class Settings:
    """What one run measures: the device, the suite (gpu | cpu | smoke), shapes, dtypes, timing budget."""

    device: torch.device
    suite: str
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    providers: tuple[str, ...] = PROVIDERS
    use_compile: bool = True
    warmup_s: float = 0.1
    rep_s: float = 0.5
    min_reps: int = 3
    max_reps: int = 200
    copy_gbps: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="shape names (gpu: voc321 voc513 city801 coco513; cpu: cpu321 cpu161; smoke) or "
                             "custom BxCxHxW, e.g. 4x21x321x321")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                        help="restrict the providers that run (the others are listed as not selected)")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, short timing (CI)")
    parser.add_argument("--no-compile", action="store_true", help="list the compile provider as skipped")
    parser.add_argument("--rep-s", type=float, default=None, help="timing budget per provider in seconds")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (missing folders are created)")
    parser.add_argument("--overwrite", action="store_true", help="replace the JSON file where it exists")


def parse_shape(text: str) -> Shape:
    for suite in SHAPES.values():
        for shape in suite:
            if shape.name == text:
                return shape
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", text)
    if not match:
        known = sorted({s.name for suite in SHAPES.values() for s in suite})
        raise SystemExit(f"--shapes: unknown shape {text!r}; expected one of {known} or BxCxHxW")
    b, c, h, w = (int(g) for g in match.groups())
    return Shape(text, b, c, h, w)


def resolve_device(name: str | None) -> torch.device:
    """``--device``: ``cpu``, ``cuda`` (an error where no CUDA device is available) or None (CUDA when available)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device)
    suite = "smoke" if args.smoke else ("gpu" if device.type == "cuda" else "cpu")
    shapes = tuple(parse_shape(s) for s in args.shapes) if args.shapes else SHAPES[suite]
    dtypes = tuple(args.dtypes) if args.dtypes else SUITE_DTYPES[suite]
    rep_s = args.rep_s if args.rep_s is not None else {"gpu": 1.0, "cpu": 1.0, "smoke": 0.0}[suite]
    settings = Settings(
        device=device, suite=suite, shapes=shapes, dtypes=dtypes,
        providers=tuple(args.providers) if args.providers else PROVIDERS,
        use_compile=not args.no_compile and not args.smoke,
        warmup_s=0.0 if suite == "smoke" else 0.1, rep_s=rep_s,
        min_reps=1 if suite == "smoke" else (10 if device.type == "cuda" else 3),
        max_reps=1 if suite == "smoke" else 200,
    )
    return settings


def settings_dict(settings: Settings) -> dict:
    return {"suite": settings.suite, "shapes": [dict(name=s.name, **s.dims()) for s in settings.shapes],
            "dtypes": list(settings.dtypes), "providers": list(settings.providers),
            "use_compile": settings.use_compile, "warmup_s": settings.warmup_s, "rep_s": settings.rep_s,
            "min_reps": settings.min_reps, "max_reps": settings.max_reps}


__all__ = ["DTYPES", "FUSED", "PROVIDERS", "SHAPES", "SUITE_DTYPES", "Settings", "Shape", "add_common_args",
           "parse_shape", "settings_dict", "settings_from_args"]
