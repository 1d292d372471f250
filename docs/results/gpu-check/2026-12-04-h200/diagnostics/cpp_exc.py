"""Which condition makes a TORCH_CHECK failure in an extension crash the process on this machine?"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

SRC = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor probe(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "probe: expected failure"); return x; }
TORCH_LIBRARY(csl_cpp_exception_probe, m) {
  m.def("probe(Tensor x) -> Tensor");
  m.impl("probe", c10::DispatchKey::CPU, &probe);
}
"""
build = tempfile.mkdtemp()
t = time.time()
r = subprocess.run([sys.executable, "-c", "import sys\nfrom torch.utils.cpp_extension import load_inline\n"
                    "load_inline('csl_cpp_exception_probe', [sys.argv[1]], is_python_module=False, "
                    "build_directory=sys.argv[2])",
                    SRC, build], capture_output=True, text=True)
lib = (glob.glob(build + "/*.so") or [""])[0]
print(f"probe build rc={r.returncode} in {time.time() - t:.1f}s lib={lib}", r.stderr[-500:] if r.returncode else "")

MAPS = ("import re\nlibs=sorted({l.split()[-1] for l in open('/proc/self/maps') if re.search("
        "r'libstdc|libgcc_s|libunwind|libgomp|libc\\+\\+|libcuda\\.so', l)})\nprint('maps:', ' '.join(libs))\n")
HEAD = "import faulthandler, sys, torch\nfaulthandler.enable()\n"
LOAD = "torch.ops.load_library(sys.argv[1])\n"
PROBE = ("try:\n    torch.ops.csl_cpp_exception_probe.probe(torch.zeros(1))\n"
         "except RuntimeError as e:\n    print('raised'); sys.exit(0)\n")
TORCH_ERR = "try:\n    torch.zeros(2) + torch.zeros(3)\nexcept RuntimeError as e:\n    print('raised'); sys.exit(0)\n"
CSL = ("import csl_kernels as ck\nlogits = torch.randn(1, 3, 4, 5)\nlabel = torch.full((1, 4, 5), 7)\n"
       "w = torch.ones(1, 4, 5)\ntry:\n    ck.weighted_cross_entropy(logits, label, w, backend='cpu')\n"
       "except (RuntimeError, ValueError) as e:\n    print('raised', type(e).__name__, str(e)[:120]); sys.exit(0)\n")
CUDA = "torch.zeros(1, device='cuda'); torch.cuda.synchronize()\n"
variants = [
    ("probe, CUDA hidden", {"CUDA_VISIBLE_DEVICES": ""}, HEAD + LOAD + MAPS + PROBE),
    ("probe, CUDA visible", {}, HEAD + LOAD + MAPS + PROBE),
    ("probe, after is_available", {}, HEAD + "torch.cuda.is_available()\n" + LOAD + MAPS + PROBE),
    ("probe, after CUDA init", {}, HEAD + CUDA + LOAD + MAPS + PROBE),
    ("probe, loaded then CUDA init", {}, HEAD + LOAD + CUDA + MAPS + PROBE),
    ("probe, after import triton", {}, HEAD + "import triton\n" + LOAD + MAPS + PROBE),
    ("probe, after setuptools+Cython", {}, HEAD + "import setuptools\ntry:\n    import Cython.Compiler.Code\n"
     "except ImportError as e:\n    print('no Cython', e)\n" + LOAD + MAPS + PROBE),
    ("torch's own error, after CUDA init", {}, HEAD + CUDA + MAPS + TORCH_ERR),
    ("csl cpu op, CUDA visible", {}, HEAD + MAPS + CSL),
    ("csl cpu op, after CUDA init", {}, HEAD + CUDA + CSL + MAPS),
]
crashed = None
for name, env, code in variants:
    if not lib and "probe" in name:
        continue
    p = subprocess.run([sys.executable, "-c", code, lib], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=120)
    out = (p.stdout.strip().splitlines() or [""])
    print(f"== {name}: rc={p.returncode} {' | '.join(out)[:900]}")
    if p.returncode < 0 or p.returncode >= 128:
        print("   stderr:", p.stderr.strip()[-300:].replace("\n", " / "))
        crashed = crashed or (env, code)
gdb = shutil.which("gdb")
print("gdb:", gdb, "gcc:", subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.split("\n")[0])
if gdb and crashed:
    env, code = crashed
    p = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c", code, lib],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=150)
    print(p.stdout[-6000:], p.stderr[-1500:])
