"""Per-pixel CSL features (max confidence, residual dispersion, pseudo-label): every provider on the same inputs.

    python -m csl_bench.bench_residual_features [--device cpu|cuda] [--shapes voc321 ...] [--dtypes fp32 bf16] [--smoke]
"""

from __future__ import annotations

import torch

import csl_kernels
from csl_kernels import IGNORE_INDEX
from csl_kernels.residual_features import residual_features_reference as reference

from .inputs import make_ignore, make_logits
from .official import official_features
from .runner import OpSpec, compile_provider, exit_status, fused_provider
from .settings import FUSED, Settings, Shape


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple:
    return make_logits(shape, dtype, device), make_ignore(shape, device)


def floor_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Logits and ignore read once; f0, v (float32) and label (int64) written once."""
    logits = shape.batch * shape.classes * shape.height * shape.width * torch.finfo(dtype).bits // 8
    return logits + shape.pixels * (8 + 4 + 4 + 8)


def providers(settings: Settings, shape: Shape) -> dict:
    def batched_reference(logits, ignore):
        return reference(logits, ignore != IGNORE_INDEX, False)

    def public(backend: str):
        def call(logits, ignore):
            return tuple(csl_kernels.residual_features(logits, ignore, backend=backend))
        return call

    out = {
        "official": lambda logits, ignore: official_features(logits),
        "eager": public("reference"),
        "compile": compile_provider(settings, lambda: torch.compile(batched_reference, dynamic=False)),
    }
    for backend in FUSED:
        out[backend] = fused_provider("residual_features", backend, settings, shape, public)
    return out


def compare(out: tuple, ref: tuple, inputs: tuple) -> dict:
    """Deviation from the reference backend on valid pixels (the official features do not zero ignored ones)."""
    valid = inputs[1] != IGNORE_INDEX
    f0, v, label = (x[valid] for x in out)
    ref_f0, ref_v, ref_label = (x[valid] for x in ref)
    scale = ref_v.double().abs().max().clamp_min(1e-30)
    return {"max_abs_f0": float((f0.double() - ref_f0.double()).abs().max()),
            "max_rel_v": float((v.double() - ref_v.double()).abs().max() / scale),
            "label_mismatch": float((label != ref_label).float().mean())}


SPEC = OpSpec("residual_features", make_inputs, floor_bytes, providers, compare,
              description="per-pixel confidence / residual dispersion / pseudo-label, all providers")


if __name__ == "__main__":
    raise SystemExit(exit_status(SPEC.main()))
