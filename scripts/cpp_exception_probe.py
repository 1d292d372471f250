"""Does a C++ exception from a PyTorch extension reach Python on this machine?

    python scripts/cpp_exception_probe.py [--limit SECONDS] [--variants]

Builds a three-line extension (torch.utils.cpp_extension.load_inline, no csl code) whose op fails a ``TORCH_CHECK``,
calls it in a child process and prints one line: ``cpp-exceptions: ok`` (a RuntimeError came back, exit 0),
``cpp-exceptions: CRASH (<signal>)`` (exit 1), ``cpp-exceptions: probe failed`` (exit 2) or, when the build and call
take longer than ``--limit`` (default 420 s; a loaded 2-core machine has needed over 240 s),
``cpp-exceptions: not known (the probe ran past its N s limit)`` (exit 3, the child and its compilers killed).
On a machine where it crashes, every test of an extension's error path (csl's included) crashes its process too:
that is the machine's toolchain / torch build, not the code under test.

``--variants`` (GPU checks; a build each, in parallel) then prints one ``variant <name>: <outcome>`` line per case
that separates csl's extension from the machine. On the H200 of 2026-12-04 (GCC 13.3, torch 2.11) the minimal
extension raised while csl's extension crashed on its own error path (docs/results/gpu-check/2026-12-04-h200):
  csl-flags         the same op built with csl's compiler and linker flags (sources.CXX_FLAGS / LD_FLAGS)
  parallel-for      the check thrown inside an ``at::parallel_for`` region (csl's flags), as csl's kernels do
  csl-loaded        the minimal op's error in a process that has csl's extension library loaded
  csl-error-path    csl's own error path (``weighted_cross_entropy``, cpu backend, a label out of range)
The exit status stays that of the minimal probe.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor probe(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "probe: expected failure"); return x; }
TORCH_LIBRARY(csl_cpp_exception_probe, m) {
  m.def("probe(Tensor x) -> Tensor");
  m.impl("probe", c10::DispatchKey::CPU, &probe);
}
"""

PARALLEL_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
at::Tensor probe(const at::Tensor& x) {
  at::parallel_for(0, 1 << 16, 1, [&](int64_t begin, int64_t end) {
    TORCH_CHECK(x.dim() == 99, "probe: expected failure in a parallel region");
  });
  return x;
}
TORCH_LIBRARY(csl_cpp_exception_probe, m) {
  m.def("probe(Tensor x) -> Tensor");
  m.impl("probe", c10::DispatchKey::CPU, &probe);
}
"""

# The end of every child: the call must raise a RuntimeError (exit 0, its first line printed); no exception: exit 3.
RAISES = """
try:
    {call}
except RuntimeError as exc:
    print("raised:", str(exc).splitlines()[0])
    sys.exit(0)
print("no exception")
sys.exit(3)
"""

# argv: source, build folder, extra cflags (JSON), extra ldflags (JSON), library to load first ("" for none)
CHILD = """
import json, os, sys, torch
from torch.utils.cpp_extension import load_inline
os.makedirs(sys.argv[2], exist_ok=True)
if sys.argv[5]:
    torch.ops.load_library(sys.argv[5])
load_inline("csl_cpp_exception_probe", [sys.argv[1]], is_python_module=False, build_directory=sys.argv[2],
            extra_cflags=json.loads(sys.argv[3]), extra_ldflags=json.loads(sys.argv[4]))
""" + RAISES.format(call="torch.ops.csl_cpp_exception_probe.probe(torch.zeros(1))")

CSL_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import csl_kernels
logits, label, weight = torch.randn(1, 3, 4, 5), torch.full((1, 4, 5), 7), torch.ones(1, 4, 5)
""" + RAISES.format(call='csl_kernels.weighted_cross_entropy(logits, label, weight, backend="cpu")')

LIBRARY_OF_CSL = """
import sys
sys.path.insert(0, sys.argv[1])
from csl_kernels.cpp.build import load
print(load().library)
"""


def start(code: str, args: list[str], cuda_hidden: bool) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cuda_hidden else dict(os.environ)
    # Its own process group, so that a time-out also stops the compilers the build started.
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def outcome(child: subprocess.Popen, limit: float) -> tuple[str, int]:
    """``(what happened, exit status of the probe)``; a child past ``limit`` is killed with its group."""
    try:
        stdout, stderr = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return f"not known (the probe ran past its {limit:g} s limit)", 3
    if child.returncode == 0:
        return f"ok ({stdout.strip()})", 0
    if child.returncode < 0:
        return f"CRASH ({signal.Signals(-child.returncode).name})", 1
    return f"probe failed (exit {child.returncode}): {stderr.strip()[-800:]}", 2


def csl_library(limit: float) -> str:
    """The path of csl's extension library (built here when not cached), or raises with the reason."""
    proc = subprocess.run([sys.executable, "-c", LIBRARY_OF_CSL, str(ROOT)], capture_output=True, text=True,
                          timeout=limit)
    if proc.returncode != 0:
        raise RuntimeError(f"csl's extension did not build or load: {proc.stderr.strip()[-400:]}")
    return proc.stdout.strip().splitlines()[-1]


def variants(limit: float, work: str) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from csl_kernels.cpp.sources import CXX_FLAGS, LD_FLAGS

    flags = [json.dumps(CXX_FLAGS), json.dumps(LD_FLAGS)]
    children = {
        "csl-flags": start(CHILD, [SOURCE, f"{work}/flags", *flags, ""], cuda_hidden=True),
        "parallel-for": start(CHILD, [PARALLEL_SOURCE, f"{work}/parallel", *flags, ""], cuda_hidden=True),
    }
    try:
        library = csl_library(limit)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        lines = [f"variant csl-loaded: not run ({exc})", f"variant csl-error-path: not run ({exc})"]
    else:
        children["csl-loaded"] = start(CHILD, [SOURCE, f"{work}/loaded", "[]", "[]", library], cuda_hidden=False)
        children["csl-error-path"] = start(CSL_CHILD, [str(ROOT)], cuda_hidden=False)
        lines = []
    for name, child in children.items():
        lines.append(f"variant {name}: {outcome(child, limit)[0]}")
    order = ["csl-flags", "parallel-for", "csl-loaded", "csl-error-path"]
    return sorted(lines, key=lambda line: order.index(line.split()[1].rstrip(":")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=420.0, help="seconds for the build and the call (420)")
    parser.add_argument("--variants", action="store_true", help="also the cases that separate csl from the machine")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        # The minimal probe builds for the CPU alone: it needs no nvcc.
        child = start(CHILD, [SOURCE, f"{work}/minimal", "[]", "[]", ""], cuda_hidden=True)

        def stop(signum, frame):  # stopped from outside: the child's group (build, compilers) goes too
            os.killpg(child.pid, signal.SIGKILL)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        what, status = outcome(child, args.limit)
        if status == 1:
            what += (": a TORCH_CHECK failure in a minimal extension kills the process; tests of C++ error paths "
                     "will crash here")
        print(f"cpp-exceptions: {what}", flush=True)
        if args.variants:
            for line in variants(args.limit, work):
                print(line, flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
