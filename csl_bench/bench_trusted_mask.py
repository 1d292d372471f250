"""Trusted Mask Perturbation: the eager index-and-multiply version vs the reference and fused backends.

    python -m csl_bench.bench_trusted_mask [--device cpu|cuda] [--shapes voc321 ...] [--smoke]

The images are ``B x 3 x H x W`` float32 (the masked view); ``--dtypes`` only changes the name of the row. Every
provider draws its block grid from a generator seeded the same way, so their covers can be compared.
"""

from __future__ import annotations

import torch

import csl_kernels
from csl_kernels.trusted_mask import draw_cells
from csl_kernels.trusted_mask import trusted_mask_reference as reference

from .inputs import make_logits
from .official import official_trusted_mask
from .runner import OpSpec, compile_provider, exit_status, fused_provider
from .settings import FUSED, Settings, Shape

BLOCK, RATE, SEED = 32, 0.7, 0


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(shape.batch, 3, shape.height, shape.width, generator=g).to(device)
    logits = make_logits(shape, torch.float32, device)
    reliable = torch.softmax(logits, dim=1).amax(dim=1) > 0.9
    return images, reliable


def floor_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Images and reliable read once; masked images and the cover written once."""
    return shape.pixels * (2 * 3 * 4 + 1 + 1)


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SEED)


def providers(settings: Settings, shape: Shape) -> dict:
    device = settings.device
    compiled_apply = None

    def public(backend: str):
        def call(images, reliable):
            return tuple(csl_kernels.trusted_mask(images, reliable, block=BLOCK, rate=RATE,
                                                  generator=_generator(device), backend=backend))
        return call

    def build_compiled():
        nonlocal compiled_apply
        compiled_apply = torch.compile(lambda images, cells, reliable: reference(images, cells, reliable, 0.0),
                                       dynamic=False)

        def call(images, reliable):
            bsz, _, height, width = images.shape
            cells = draw_cells(bsz, height, width, block=BLOCK, rate=RATE, generator=_generator(device),
                               device=device)
            return tuple(compiled_apply(images, cells, reliable))
        return call

    out = {
        "official": lambda images, reliable: official_trusted_mask(images, reliable, block=BLOCK, rate=RATE,
                                                                   generator=_generator(device)),
        "eager": public("reference"),
        "compile": compile_provider(settings, build_compiled),
    }
    for backend in FUSED:
        out[backend] = fused_provider("trusted_mask", backend, settings, shape, public)
    return out


def compare(out: tuple, ref: tuple, inputs: tuple) -> dict:
    masked, cover = out
    ref_masked, ref_cover = ref
    return {"max_abs_image": float((masked - ref_masked).abs().max()),
            "cover_mismatch": float((cover != ref_cover).float().mean())}


SPEC = OpSpec("trusted_mask", make_inputs, floor_bytes, providers, compare,
              description="Trusted Mask Perturbation, all providers on the same inputs and grid")


if __name__ == "__main__":
    raise SystemExit(exit_status(SPEC.main()))
