"""Does a C++ exception from a PyTorch extension reach Python on this machine?

    python scripts/cpp_exception_probe.py [--limit SECONDS]

Builds a three-line extension (torch.utils.cpp_extension.load_inline, no csl code) whose op fails a ``TORCH_CHECK``,
calls it in a child process and prints one line: ``cpp-exceptions: ok`` (a RuntimeError came back, exit 0),
``cpp-exceptions: CRASH (<signal>)`` (exit 1), ``cpp-exceptions: probe failed`` (exit 2) or, when the build and call
take longer than ``--limit`` (default 420 s; a loaded 2-core machine has needed over 240 s),
``cpp-exceptions: not known (the probe ran past its N s limit)`` (exit 3, the child and its compilers killed).
On a machine where it crashes, every test of an extension's error path (csl's included) crashes its process too:
that is the machine's toolchain / torch build, not the code under test.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=420.0, help="seconds for the build and the call (420)")
    limit = parser.parse_args(argv).limit
    with tempfile.TemporaryDirectory() as build_dir:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU-only build: the probe needs no nvcc
        # Its own process group, so that a time-out also stops the compilers the build started.
        child = subprocess.Popen([sys.executable, "-c", CHILD, SOURCE, build_dir], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)

        def stop(signum, frame):  # stopped from outside: the child's group (build, compilers) goes too
            os.killpg(child.pid, signal.SIGKILL)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        try:
            stdout, stderr = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            print(f"cpp-exceptions: not known (the probe ran past its {limit:g} s limit)")
            return 3
    if child.returncode == 0:
        print("cpp-exceptions: ok (" + stdout.strip() + ")")
        return 0
    if child.returncode < 0:
        print(f"cpp-exceptions: CRASH ({signal.Signals(-child.returncode).name}): a TORCH_CHECK failure in a "
              "minimal extension kills the process; tests of C++ error paths will crash here")
        return 1
    print(f"cpp-exceptions: probe failed (exit {child.returncode}): {stderr.strip()[-800:]}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
