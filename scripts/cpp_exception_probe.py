"""Does a C++ exception from a PyTorch extension reach Python on this machine? ``python scripts/cpp_exception_probe.py``

Builds a three-line extension (torch.utils.cpp_extension.load_inline, no csl code) whose op fails a ``TORCH_CHECK``,
calls it in a child process and prints one line: ``cpp-exceptions: ok`` (a RuntimeError came back) or
``cpp-exceptions: CRASH (<signal>)``. On a machine where it crashes, every test of an extension's error path (csl's
included) crashes its process too: that is the machine's toolchain / torch build, not the code under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor probe(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "probe: expected failure"); return x; }
TORCH_LIBRARY(csl_cpp_exception_probe, m) {
  m.def("probe(Tensor x) -> Tensor");
  m.impl("probe", c10::DispatchKey::CPU, &probe);
}
"""

CHILD = """
import sys, torch
from torch.utils.cpp_extension import load_inline
load_inline("csl_cpp_exception_probe", [sys.argv[1]], is_python_module=False, build_directory=sys.argv[2])
try:
    torch.ops.csl_cpp_exception_probe.probe(torch.zeros(1))
except RuntimeError as exc:
    print("raised:", str(exc).splitlines()[0])
    sys.exit(0)
print("no exception")
sys.exit(3)
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as build_dir:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU-only build: the probe needs no nvcc
        proc = subprocess.run([sys.executable, "-c", CHILD, SOURCE, build_dir], env=env, capture_output=True,
                              text=True, check=False)
    if proc.returncode == 0:
        print("cpp-exceptions: ok (" + proc.stdout.strip() + ")")
        return 0
    if proc.returncode < 0:
        print(f"cpp-exceptions: CRASH ({signal.Signals(-proc.returncode).name}): a TORCH_CHECK failure in a "
              "minimal extension kills the process; tests of C++ error paths will crash here")
        return 1
    print(f"cpp-exceptions: probe failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
