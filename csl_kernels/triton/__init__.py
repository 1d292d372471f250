"""The ``"triton"`` backend: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package registers every op it implements with :mod:`csl_kernels._backends`. ``TRITON_INTERPRET``
is read by Triton when a kernel is defined, so it must be set before this package is first imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .._backends import register_availability

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with Linux torch wheels
    raise ImportError(f"triton is not installed ({exc}); install it or use another backend") from exc

OP_MODULES = ("residual_features", "pcos_weights", "trusted_mask", "weighted_cross_entropy", "confusion_matrix")


def _check(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


register_availability("triton", _check)

for _name in OP_MODULES:
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")
