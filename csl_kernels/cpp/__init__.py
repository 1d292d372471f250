"""The ``"cpu"`` and ``"cuda"`` backends: the ``torch.ops.csl`` ops of the C++/CUDA extension in ``csrc/``.

- :mod:`.sources`: where ``csrc/`` is, which files and flags the extension compiles (standard library only: setup.py
  loads it by path);
- :mod:`.build`: builds (on first use) and loads the library;
- :mod:`.ops`: one implementation per op, the fake kernels and the autograd formula of the ``torch.ops.csl`` ops.

Importing this package registers the implementations and the availability checks with
:mod:`csl_kernels._backends`; the extension itself is built and loaded the first time a check runs.
"""

from __future__ import annotations

import torch

from .._backends import register_availability
from . import build, ops


def load() -> build.BuildInfo:
    """Build/load the extension and register its Python parts; raises ``ExtensionBuildError`` on failure."""
    info = build.load()
    try:
        ops.register_python_parts()
    except Exception as exc:  # noqa: BLE001 - a library without the expected ops: unavailable, with the reason
        raise build.ExtensionBuildError(f"the csl C++ extension {info.library} loaded but its ops could not be "
                                        f"registered: {exc}") from exc
    return info


def _check_cpu(device: torch.device) -> str | None:
    try:
        load()
    except build.ExtensionBuildError as exc:
        return str(exc)
    return None


def _check_cuda(device: torch.device) -> str | None:
    reason = _check_cpu(device)
    if reason is not None:
        return reason
    info = build.load()
    if not info.with_cuda:
        if info.cuda_error:
            return f"the CUDA part of the C++ extension failed to build: {info.cuda_error}"
        return f"the C++ extension was built without its CUDA part ({build.cuda_build_plan()[2]})"
    if build.arch_list_understood(info.cuda_arch_list) and device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if not build.arch_covers(info.cuda_arch_list, capability):
            return (f"the C++ extension's CUDA part was built for TORCH_CUDA_ARCH_LIST={info.cuda_arch_list!r}, "
                    f"which has no kernel image for {torch.cuda.get_device_name(device)} (sm_{capability[0]}"
                    f"{capability[1]}): unset TORCH_CUDA_ARCH_LIST or add {capability[0]}.{capability[1]}")
    return None


register_availability("cpu", _check_cpu)
register_availability("cuda", _check_cuda)
