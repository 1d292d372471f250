"""PCOS weights: the official per-image SVD loop vs the batched reference, torch.compile and the fused backends.

    python -m csl_bench.bench_pcos_weights [--device cpu|cuda] [--shapes voc321 ...] [--dtypes fp32 bf16] [--smoke]
"""

from __future__ import annotations

import torch

import csl_kernels
from csl_kernels import IGNORE_INDEX
from csl_kernels.pcos_weights import pcos_weights_reference as reference

from .inputs import make_ignore, make_logits
from .official import official_pcos
from .runner import OpSpec, compile_provider, exit_status, fused_provider
from .settings import FUSED, Settings, Shape

ALPHA = 8.0


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple:
    return make_logits(shape, dtype, device), make_ignore(shape, device)


def floor_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Logits and ignore read once; weight (float32), label (int64) and reliable (bool) written once."""
    logits = shape.batch * shape.classes * shape.height * shape.width * torch.finfo(dtype).bits // 8
    return logits + shape.pixels * (8 + 4 + 8 + 1)


def providers(settings: Settings, shape: Shape) -> dict:
    def batched_reference(logits, ignore):
        return reference(logits, ignore != IGNORE_INDEX, ALPHA, False, False)[:3]

    def public(backend: str):
        def call(logits, ignore):
            return tuple(csl_kernels.pcos_weights(logits, ignore, alpha=ALPHA, backend=backend)[:3])
        return call

    out = {
        "official": lambda logits, ignore: official_pcos(logits, ignore, ALPHA),
        "eager": public("reference"),
        "compile": compile_provider(settings, lambda: torch.compile(batched_reference, dynamic=False)),
    }
    for backend in FUSED:
        out[backend] = fused_provider("pcos_weights", backend, settings, shape, public)
    return out


def compare(out: tuple, ref: tuple, inputs: tuple) -> dict:
    """Deviation from the reference backend; labels are compared on valid pixels (the API zeroes the others)."""
    weight, label, reliable = out
    ref_weight, ref_label, ref_reliable = ref
    valid = inputs[1] != IGNORE_INDEX
    return {"max_abs_weight": float((weight.float() - ref_weight.float()).abs().max()),
            "label_mismatch": float((label != ref_label)[valid].float().mean()),
            "reliable_mismatch": float((reliable != ref_reliable).float().mean())}


SPEC = OpSpec("pcos_weights", make_inputs, floor_bytes, providers, compare,
              description="PCOS selection weights, all providers on the same inputs")


if __name__ == "__main__":
    raise SystemExit(exit_status(SPEC.main()))
