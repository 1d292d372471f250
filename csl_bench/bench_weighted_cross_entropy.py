"""Weighted pseudo-label cross-entropy, forward + backward: UniMatch's eager loss vs the reference and fused ones.

    python -m csl_bench.bench_weighted_cross_entropy [--device cpu|cuda] [--shapes voc321 ...] [--dtypes fp32 bf16]

``official`` is what UniMatch-family trainers run: ``F.cross_entropy(reduction='none') * w``, summed, divided by the
number of valid pixels (low-precision logits upcast to float32 as autocast does). The goal "fused >= 3x eager with
<= 1/4 of its peak memory" (issue 14) is measured against it. Each call returns the loss and ``d loss / d logits``.
"""

from __future__ import annotations

import torch

import csl_kernels
from csl_kernels import IGNORE_INDEX
from csl_kernels.weighted_cross_entropy import weighted_cross_entropy_reference as reference

from .inputs import make_ignore, make_logits
from .official import unimatch_weighted_cross_entropy
from .runner import OpSpec, compile_provider, exit_status, fused_provider
from .settings import FUSED, Settings, Shape


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple:
    logits = make_logits(shape, dtype, device, seed=2).requires_grad_(True)
    target = make_logits(shape, torch.float32, device, seed=3)
    weight, label = torch.softmax(target, dim=1).max(dim=1)
    ignore = make_ignore(shape, device)
    weight = torch.where(ignore != IGNORE_INDEX, weight, 0.0)
    return logits, label, weight, ignore


def floor_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Logits read once and their gradient written once; label (int64), weight (float32), ignore (int64) read."""
    logits = shape.batch * shape.classes * shape.height * shape.width * torch.finfo(dtype).bits // 8
    return 2 * logits + shape.pixels * (8 + 4 + 8)


def _fwd_bwd(loss_fn):
    def call(logits, label, weight, ignore):
        loss = loss_fn(logits, label, weight, ignore)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss.detach(), grad
    return call


def providers(settings: Settings, shape: Shape) -> dict:
    def public(backend: str):
        return _fwd_bwd(lambda logits, label, weight, ignore: csl_kernels.weighted_cross_entropy(
            logits, label, weight, ignore, backend=backend))

    def build_compiled():
        compiled = torch.compile(lambda logits, label, weight, ignore: reference(
            logits, label, weight, ignore != IGNORE_INDEX), dynamic=False)
        return _fwd_bwd(compiled)

    out = {
        "official": _fwd_bwd(unimatch_weighted_cross_entropy),
        "eager": public("reference"),
        "compile": compile_provider(settings, build_compiled),
    }
    for backend in FUSED:
        out[backend] = fused_provider("weighted_cross_entropy", backend, settings, shape, public)
    return out


def compare(out: tuple, ref: tuple, inputs: tuple) -> dict:
    loss, grad = out
    ref_loss, ref_grad = ref
    scale = ref_grad.double().abs().max().clamp_min(1e-30)
    return {"rel_loss": float((loss.double() - ref_loss.double()).abs() / ref_loss.double().abs().clamp_min(1e-30)),
            "max_rel_grad": float((grad.double() - ref_grad.double()).abs().max() / scale)}


SPEC = OpSpec("weighted_cross_entropy", make_inputs, floor_bytes, providers, compare,
              description="weighted pseudo-label CE forward + backward, all providers on the same inputs")


if __name__ == "__main__":
    raise SystemExit(exit_status(SPEC.main()))
