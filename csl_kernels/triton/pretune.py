"""Tune the Triton kernels for training shapes ahead of time: ``python -m csl_kernels.triton.pretune --shape B,C,H,W``.

Runs every tuned op once on random inputs of each shape on a CUDA device, so that the launch configurations are timed
and cached now (csl_kernels/triton/tuning.py) rather than during the first training step — e.g. once per node before
a multi-GPU job — and prints the choices with the default's and the chosen configuration's times.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

import csl_kernels as ck

from .tuning import ENV_MODE, TUNABLES, Config, autotune_enabled, cache_path, chosen


def pretune(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, channels_last: bool = False,
            groups: str = "image", image_channels: int = 3) -> None:
    """Run every tuned op once on random inputs of a training shape so that each is tuned and cached now: logits
    ``B x C x H x W`` of ``dtype`` (features, PCOS with ``groups``, weighted CE forward + backward) and float32
    ``B x image_channels x H x W`` images (trusted mask)."""
    bsz, classes, height, width = shape
    g = torch.Generator(device=device).manual_seed(0)
    logits = (3 * torch.randn(shape, generator=g, device=device)).to(dtype)
    images = torch.rand(bsz, image_channels, height, width, generator=g, device=device)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    ck.residual_features(logits, backend="triton")
    sel = ck.pcos_weights(logits, groups=groups, backend="triton")
    leaf = logits.detach().requires_grad_(True)
    ck.weighted_cross_entropy(leaf, sel.label, sel.weight, None, backend="triton").backward()
    ck.trusted_mask(images, sel.reliable, backend="triton")


def format_choices(choices: dict[str, dict[str, dict]]) -> str:
    """Markdown table of :func:`chosen`: one row per (device, op, key) with the default's and the choice's time."""
    default_names = {name: t.default.name for name, t in TUNABLES.items()}
    lines = ["| device | op | key | chosen | default ms | chosen ms | speed-up |", "|---|---|---|---|---:|---:|---:|"]
    for section, entries in choices.items():
        for op_key, entry in sorted(entries.items()):
            name, key = op_key.split("|", 1)
            chosen_name = Config(entry["tile"], entry["num_warps"]).name
            times = entry.get("times_ms", {})
            base, best = times.get(default_names.get(name, "")), times.get(chosen_name)
            ratio = f"{base / best:.2f}x" if base and best else ""
            lines.append(f"| {section} | {name} | {key} | {chosen_name} | {'' if base is None else f'{base:.4f}'} | "
                         f"{'' if best is None else f'{best:.4f}'} | {ratio} |")
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shape wants B,C,H,W (four positive integers), got {text!r}")
    return tuple(int(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    parser = argparse.ArgumentParser(
        prog="python -m csl_kernels.triton.pretune",
        description="Tune the Triton kernels for training shapes now (e.g. before a multi-GPU job) and print the "
                    "choices; they are cached per GPU model, so later processes start tuned.")
    parser.add_argument("--shape", nargs="+", required=True, help="logits B,C,H,W, e.g. 8,21,321,321")
    parser.add_argument("--dtype", nargs="+", choices=sorted(dtypes), default=["bf16"])
    parser.add_argument("--channels-last", action="store_true", help="channels_last logits and images")
    parser.add_argument("--groups", choices=("image", "class"), default="image", help="PCOS groups")
    parser.add_argument("--device", default="cuda", help="a CUDA device (default: the current one)")
    args = parser.parse_args(argv)
    try:
        shapes = [_parse_shape(s) for s in args.shape]
    except ValueError as exc:
        parser.error(str(exc))
    if not autotune_enabled():
        print(f"error: {ENV_MODE}=0 launches the defaults; nothing to tune", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"error: tuning times kernels on a CUDA device; {args.device!r} is not one here", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for shape in shapes:
        for name in args.dtype:
            pretune(shape, dtypes[name], device, args.channels_last, args.groups)
    print(format_choices(chosen()))
    print(f"\ncache: {cache_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
