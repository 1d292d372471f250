"""The ``"triton"`` backend: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package registers every op it implements with :mod:`csl_kernels._backends`. ``TRITON_INTERPRET``
is read by Triton when a kernel is defined, so it must be set before this package is first imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import threading

import torch

from .._backends import register_availability

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with Linux torch wheels
    raise ImportError(f"triton is not installed ({exc}); install it or use another backend") from exc

OP_MODULES = ("residual_features", "pcos_weights", "trusted_mask", "weighted_cross_entropy", "confusion_matrix")


_PROBE_LOCK = threading.Lock()  # Triton's interpreter is not thread-safe: threads that ask at once probe once


def _interpreter_problem() -> str | None:
    with _PROBE_LOCK:
        return _probe_interpreter()


@functools.cache
def _probe_interpreter() -> str | None:
    """Why this Triton's interpreter cannot run the kernels, or None: a one-line kernel with a loop over a runtime
    bound (as every kernel here has: ``range(0, C, BLOCK_C)``) is run once. Some Triton versions' interpreters turn
    such a bound into an int with ``int(array)`` on a 1-element array, which newer NumPy versions refuse ("only
    0-dimensional arrays can be converted to Python scalars"); Triton 3.8's interpreter does not."""
    import numpy as np
    import triton.language as tl

    @triton.jit
    def _loop(out_ptr, n):
        acc = 0
        for i in range(0, n, 1):
            acc += i
        tl.store(out_ptr, acc)

    try:
        # Outside any torch.func transform or dispatch mode (fake tensors) of the first call that asks: the probe
        # tests the interpreter, not the caller's context.
        with torch._C._DisableFuncTorch(), torch.utils._python_dispatch._disable_current_modes():
            out = torch.zeros(1, dtype=torch.int32)
            _loop[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any failure here means the kernels cannot run either
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound with NumPy "
                f"{np.__version__} ({type(exc).__name__}: {str(exc).strip()[:200]}); use another Triton or NumPy "
                "version (Triton 3.8 works) to run the triton backend on CPU tensors")
    return None if int(out) == 3 else f"Triton {triton.__version__}'s interpreter computed a loop wrongly"


# The oldest GPUs the kernels compile for: below compute capability 7.0 ptxas refuses the confusion matrix kernel's
# relaxed atomics ("Feature '.relaxed' requires .target sm_70 or higher", Triton 3.8), a crash at the first launch.
# python -m csl_kernels.triton.compile_check --arch 75 / 80 / 86 / 89 / 90 / 100 / 120 compiles every variant.
MIN_CAPABILITY = (7, 0)


def _gpu_problem(device: torch.device) -> str | None:
    """Why the kernels cannot run on the GPU ``device`` (its compute capability), or None."""
    if not torch.cuda.is_available():  # no GPU to ask; CUDA tensors cannot exist here either
        return None
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"the Triton kernels need a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
            f"(the confusion matrix kernel's atomics do not compile for older ones), got "
            f"{torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]})")


def _check(device: torch.device) -> str | None:
    from ._common import INTERPRET  # what the kernels were defined under

    if (os.environ.get("TRITON_INTERPRET") == "1") != INTERPRET:
        now = "1" if not INTERPRET else "unset"
        return (f"TRITON_INTERPRET is {now} now but was {'1' if INTERPRET else 'unset'} when csl_kernels.triton was "
                f"imported, and Triton fixes it when the kernels are defined: set it before the first import of "
                f"csl_kernels' Triton kernels (or restart the process)")
    if device.type == "cuda":
        return _gpu_problem(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return _interpreter_problem()
    return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


register_availability("triton", _check)

for _name in OP_MODULES:
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")
