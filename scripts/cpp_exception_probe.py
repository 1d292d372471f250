"""Does a C++ exception from a PyTorch extension reach Python on this machine?

    python scripts/cpp_exception_probe.py [--limit SECONDS] [--variants]

Builds a three-line extension (torch.utils.cpp_extension.load_inline, no csl code) whose op fails a ``TORCH_CHECK``,
calls it in a child process and prints one line: ``cpp-exceptions: ok`` (a RuntimeError came back, exit 0),
``cpp-exceptions: CRASH (<signal>)`` (exit 1), ``cpp-exceptions: probe failed`` (exit 2) or, when the build and call
take longer than ``--limit`` (default 420 s; a loaded 2-core machine has needed over 240 s),
``cpp-exceptions: not known (the probe ran past its N s limit)`` (exit 3, the child and its compilers killed).
``--limit`` bounds the whole probe, the variants included; SIGTERM stops it with every child's build.
On a machine where it crashes, every test of an extension's error path (csl's included) crashes its process too:
that is the machine's toolchain / torch build, not the code under test.

``--variants`` (GPU checks; a build each, in parallel) then prints one ``variant <name>: <outcome>`` line per case
that separates csl's extension from the machine. On the H200 of 2026-12-04 (GCC 13.3, torch 2.11) the minimal
extension raised while csl's extension crashed on its own error path (docs/results/gpu-check/2026-12-04-h200;
that toolchain rebuilt in a chroot on a CPU machine without an NVIDIA driver raised on every variant):
  csl-flags         the same op built with csl's compiler and linker flags (sources.CXX_FLAGS / LD_FLAGS)
  parallel-for      the check thrown inside an ``at::parallel_for`` region (csl's flags), as csl's kernels do
  message-args      the check's message built from several arguments (sizes, dtype, device), as csl's checks are
  csl-loaded        the minimal op's error in a process that has csl's extension library loaded
  csl-error-path    csl's own error path (``weighted_cross_entropy``, cpu backend, a label out of range)
  csl-cpu-only      the same error path with csl's extension built without its CUDA part (its own build folder)
Every child loads a small crash reporter first (a C file built with the system's C compiler): where a child dies
of a signal, its outcome names the faulting address and the native stack, each frame as library + offset and,
where ``addr2line`` knows it, the function and source line, so one GPU check names where the crash happens.
The exit status stays that of the minimal probe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The crash reporter every child loads first (ctypes): on SIGSEGV / SIGBUS / SIGILL / SIGFPE / SIGABRT it writes the
# faulting address and the native stack to stderr ("native frame <i>: <file> +0x<offset> <symbol>", or
# "? +0x<address> ?" for a frame in no loaded file), then hands the signal on to the handler it replaced (Python's
# faulthandler where enabled, else the default action).
REPORTER_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
static struct sigaction previous[NSIG];

static void put(const char* text) { (void)!write(2, text, strlen(text)); }

static void report(int sig, siginfo_t* info, void* context) {
  (void)context;
  sigaction(sig, &previous[sig], NULL); /* a second fault inside this handler goes to the previous handler */
  char line[1024];
  snprintf(line, sizeof line, "native crash: signal %d at address %p\n", sig, info ? info->si_addr : NULL);
  put(line);
  void* frames[48];
  int n = backtrace(frames, 48);
  for (int i = 0; i < n; ++i) {
    Dl_info where;
    if (dladdr(frames[i], &where) && where.dli_fname) {
      snprintf(line, sizeof line, "native frame %d: %s +0x%lx %s\n", i, where.dli_fname,
               (unsigned long)((char*)frames[i] - (char*)where.dli_fbase), where.dli_sname ? where.dli_sname : "?");
    } else {
      snprintf(line, sizeof line, "native frame %d: ? +0x%lx ?\n", i, (unsigned long)frames[i]); /* the address */
    }
    put(line);
  }
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  void* warm[2];
  backtrace(warm, 2); /* loads the unwinder now, not inside the handler */
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = report;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  for (size_t i = 0; i < sizeof kSignals / sizeof kSignals[0]; ++i) {
    sigaction(kSignals[i], &action, &previous[kSignals[i]]);
  }
}
"""

# Loads the crash reporter named by CSL_PROBE_REPORTER (none where it could not be built).
PRELUDE = """
import ctypes, os
if os.environ.get("CSL_PROBE_REPORTER"):
    ctypes.CDLL(os.environ["CSL_PROBE_REPORTER"])
"""

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

MESSAGE_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor probe(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "probe: expected failure with arguments, got ", x.sizes(), " of ", x.scalar_type(),
              " on ", x.device());
  return x;
}
TORCH_LIBRARY(csl_cpp_exception_probe, m) {
  m.def("probe(Tensor x) -> Tensor");
  m.impl("probe", c10::DispatchKey::CPU, &probe);
}
"""

# The end of every child: the call must raise a RuntimeError (exit 0, its first line printed); no exception: exit 3,
# said on stderr, where outcome() reads why a child failed.
RAISES = """
try:
    {call}
except RuntimeError as exc:
    print("raised:", str(exc).splitlines()[0])
    sys.exit(0)
print("no exception: the call returned", file=sys.stderr)
sys.exit(3)
"""

# argv: source, build folder, extra cflags (JSON), extra ldflags (JSON), library to load first ("" for none)
CHILD = PRELUDE + """
import json, os, sys, torch
from torch.utils.cpp_extension import load_inline
os.makedirs(sys.argv[2], exist_ok=True)
if sys.argv[5]:
    torch.ops.load_library(sys.argv[5])
load_inline("csl_cpp_exception_probe", [sys.argv[1]], is_python_module=False, build_directory=sys.argv[2],
            extra_cflags=json.loads(sys.argv[3]), extra_ldflags=json.loads(sys.argv[4]))
""" + RAISES.format(call="torch.ops.csl_cpp_exception_probe.probe(torch.zeros(1))")

CSL_CHILD = PRELUDE + """
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


STARTED: list[subprocess.Popen] = []  # every child, for stop_children()


def start(code: str, args: list[str], cuda_hidden: bool, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env or {})}
    if cuda_hidden:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # Its own process group, so that a time-out also stops the compilers the build started.
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    STARTED.append(child)
    return child


def kill_group(child: subprocess.Popen) -> None:
    """Kill ``child`` with its process group (its build's compilers)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has ended already
        pass


def stop_children() -> None:
    """Kill every child still running, with its process group."""
    for child in STARTED:
        if child.poll() is None:
            kill_group(child)


def seconds_left(deadline: float) -> float:
    """What is left until ``deadline`` (``time.monotonic()``), at least 0.1 s (a wait of 0 would not poll)."""
    return max(deadline - time.monotonic(), 0.1)


def build_reporter(work: str) -> tuple[str | None, str]:
    """``(path of the crash reporter library, why not)``: built with ``$CC``, ``cc`` or ``gcc``."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found"
    source, library = Path(work) / "crash_reporter.c", Path(work) / "crash_reporter.so"
    source.write_text(REPORTER_SOURCE)
    try:
        proc = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-g", str(source), "-o", str(library), "-ldl"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{compiler} did not run: {exc}"
    if proc.returncode != 0:
        return None, f"{compiler} failed: {proc.stderr.strip()[-300:]}"
    return str(library), ""


FRAME = re.compile(r"^native frame (\d+): (\S+) \+0x([0-9a-f]+) (\S+)$")


def symbolize(frames: list[tuple[str, int, str]]) -> list[str]:
    """One line per native frame: library name, offset, and what ``addr2line`` knows of it (function, file:line)
    where it runs; else the dynamic symbol the reporter found."""
    known: dict[tuple[str, int], str] = {}
    addr2line = shutil.which("addr2line")
    by_file: dict[str, list[int]] = {}
    for path, offset, _ in frames:
        if path != "?":
            by_file.setdefault(path, []).append(offset)
    for path, offsets in by_file.items() if addr2line else ():
        # A return address points after its call: look up the byte before it.
        lookups = [max(0, off - 1) for off in offsets]
        try:
            proc = subprocess.run([addr2line, "-f", "-C", "-e", path, *map(hex, lookups)], capture_output=True,
                                  text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        answer = proc.stdout.splitlines()
        if proc.returncode != 0 or len(answer) != 2 * len(offsets):
            continue
        for i, off in enumerate(offsets):
            function, place = answer[2 * i], answer[2 * i + 1]
            if function != "??":
                known[(path, off)] = function + ("" if place.startswith("??") else f" at {place}")
    lines = []
    for path, offset, symbol in frames:
        what = known.get((path, offset)) or (symbol if symbol != "?" else "")
        lines.append(f"{Path(path).name} +{offset:#x} {what}".rstrip())
    return lines


def crash_details(stderr: str, max_frames: int = 40) -> str:
    """What a crashed child left on stderr, as indented lines to follow its outcome: the crash reporter's faulting
    address and native stack, then the Python stack of faulthandler's report where one was written (its list of
    extension modules left out)."""
    lines = stderr.splitlines()
    address = next((line.split(" at address ")[-1] for line in lines if line.startswith("native crash:")), None)
    frames = []
    for line in lines:
        match = FRAME.match(line)
        if match:
            frames.append((match.group(2), int(match.group(3), 16), match.group(4)))
    text = ""
    if frames:
        text = f" at address {address}; native stack:\n" + "\n".join(
            f"    #{i} {frame}" for i, frame in enumerate(symbolize(frames[:max_frames])))
    start = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    if start is not None:
        report = [line for line in lines[start:start + 25] if line.strip() and not line.startswith("Extension modules")]
        text += ("\n" if text else ":\n") + "\n".join(f"    {line}" for line in report)
    return text


def outcome(child: subprocess.Popen, limit: float, deadline: float | None = None) -> tuple[str, int]:
    """``(what happened, exit status of the probe)``; a child still running ``limit`` seconds from now, or at
    ``deadline`` (``time.monotonic()``) where one is given, is killed with its group. A crash's outcome goes on with
    its native stack (or faulthandler's report) on indented lines."""
    try:
        stdout, stderr = child.communicate(timeout=limit if deadline is None else seconds_left(deadline))
    except subprocess.TimeoutExpired:
        kill_group(child)
        child.communicate()
        return f"not known (the probe ran past its {limit:g} s limit)", 3
    if child.returncode == 0:
        return f"ok ({stdout.strip()})", 0
    if child.returncode < 0:
        return f"CRASH ({signal.Signals(-child.returncode).name}){crash_details(stderr)}", 1
    return f"probe failed (exit {child.returncode}): {stderr.strip()[-800:]}", 2


def csl_library(deadline: float) -> str:
    """The path of csl's extension library (built here when not cached), or raises with the reason; a build still
    running at ``deadline`` (``time.monotonic()``) is stopped with its compilers."""
    child = start(LIBRARY_OF_CSL, [str(ROOT)], cuda_hidden=False)
    try:
        stdout, stderr = child.communicate(timeout=seconds_left(deadline))
    except subprocess.TimeoutExpired:
        kill_group(child)
        child.communicate()
        raise RuntimeError("csl's extension did not build or load within the probe's limit") from None
    if child.returncode != 0:
        raise RuntimeError(f"csl's extension did not build or load: {stderr.strip()[-400:]}")
    return stdout.strip().splitlines()[-1]


VARIANTS = ["csl-flags", "parallel-for", "message-args", "csl-loaded", "csl-error-path", "csl-cpu-only"]


def variants(limit: float, deadline: float, work: str) -> list[str]:
    """One line per variant; every child is done or killed by ``deadline`` (``time.monotonic()``), the end of the
    probe's ``limit``."""
    sys.path.insert(0, str(ROOT))
    from csl_kernels.cpp.sources import CXX_FLAGS, LD_FLAGS

    flags = [json.dumps(CXX_FLAGS), json.dumps(LD_FLAGS)]
    children = {
        "csl-flags": start(CHILD, [SOURCE, f"{work}/flags", *flags, ""], cuda_hidden=True),
        "parallel-for": start(CHILD, [PARALLEL_SOURCE, f"{work}/parallel", *flags, ""], cuda_hidden=True),
        "message-args": start(CHILD, [MESSAGE_SOURCE, f"{work}/message", "[]", "[]", ""], cuda_hidden=True),
        # A CPU-only build of csl in a folder of its own (the cached build may have the CUDA part).
        "csl-cpu-only": start(CSL_CHILD, [str(ROOT)], cuda_hidden=True,
                              env={"CSL_EXT_CUDA": "0", "TORCH_EXTENSIONS_DIR": f"{work}/csl_cpu_only"}),
    }
    try:
        library = csl_library(deadline)
    except RuntimeError as exc:
        lines = [f"variant csl-loaded: not run ({exc})", f"variant csl-error-path: not run ({exc})"]
    else:
        children["csl-loaded"] = start(CHILD, [SOURCE, f"{work}/loaded", "[]", "[]", library], cuda_hidden=False)
        children["csl-error-path"] = start(CSL_CHILD, [str(ROOT)], cuda_hidden=False)
        lines = []
    for name, child in children.items():
        lines.append(f"variant {name}: {outcome(child, limit, deadline)[0]}")
    return sorted(lines, key=lambda line: VARIANTS.index(line.split()[1].rstrip(":")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=420.0, help="seconds for the whole probe (420)")
    parser.add_argument("--variants", action="store_true", help="also the cases that separate csl from the machine")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.limit

    def stop(signum, frame):  # stopped from outside: every child's group (builds, compilers) goes too
        stop_children()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory() as work:
        reporter, why_not = build_reporter(work)
        if reporter:
            os.environ["CSL_PROBE_REPORTER"] = reporter  # every child loads it (PRELUDE)
        else:
            print(f"cpp-exceptions: no crash reporter ({why_not}); a crash is reported without its native stack",
                  file=sys.stderr, flush=True)
        # The minimal probe builds for the CPU alone: it needs no nvcc.
        child = start(CHILD, [SOURCE, f"{work}/minimal", "[]", "[]", ""], cuda_hidden=True)
        what, status = outcome(child, args.limit, deadline)
        if status == 1:
            what += (": a TORCH_CHECK failure in a minimal extension kills the process; tests of C++ error paths "
                     "will crash here")
        print(f"cpp-exceptions: {what}", flush=True)
        if args.variants:
            for line in variants(args.limit, deadline, work):
                print(line, flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
