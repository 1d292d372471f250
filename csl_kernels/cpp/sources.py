"""Where the C++/CUDA sources of the extension live, which files it compiles and with which flags.

Standard library only: ``setup.py`` loads this file by path (without importing torch or the package), so the
ahead-of-time build and the on-the-fly build (:mod:`csl_kernels.cpp.build`) compile the same files with the same flags.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SOURCE_DIR_ENV = "CSL_EXT_SOURCE_DIR"
_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
# -fopenmp: at::parallel_for is inlined into the extension and runs serially without it; -ffp-contract=off (C++) and
# --fmad=false (CUDA device code, where nvcc fuses a * b + c by default): the math of csl_math.h and the kernels'
# sums stay unfused, as in the reference (an even residual gives exactly v = 0), the same on CPU and GPU.
# Tuples: torch's builder appends its own flags to the lists it is given (its link libraries to extra_ldflags), so
# every build gets copies, and the flags that name a build and its record stay these.
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "--fmad=false")


def csrc_dir() -> Path | None:
    """The ``csrc`` folder: ``$CSL_EXT_SOURCE_DIR``, else the copy shipped in the package, else the repository's."""
    override = os.environ.get(SOURCE_DIR_ENV)
    if override:
        return Path(override)
    package = Path(__file__).resolve().parent.parent  # csl_kernels/
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "csl_math.h").is_file():
            return candidate
    return None


def extension_sources(root: Path, with_cuda: bool) -> list[str]:
    """Op schemas (``root/*.cpp``), CPU kernels (``root/cpu/*.cpp``) and, with CUDA, ``root/cuda/*.cu``."""
    files = sorted(root.glob("*.cpp")) + sorted(root.glob("cpu/*.cpp"))
    if with_cuda:
        files += sorted(root.glob("cuda/*.cu"))
    return [str(f) for f in files]


def source_hash(root: Path) -> str:
    """Hash of every source and header under ``root`` (a change in any of them means a rebuild)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def flags_hash() -> str:
    """Hash of the compile and link flags (a build made with other flags is stale)."""
    return hashlib.sha256(json.dumps([CXX_FLAGS, LD_FLAGS, NVCC_FLAGS]).encode()).hexdigest()
