"""csl: CSL (Confidence Separable Learning) pseudo-label selection kernels and trainer.

``pip install .`` installs the pure-Python package; the C++/CUDA extension is built on first use.
``CSL_BUILD_EXT=1 pip install --no-build-isolation .`` also builds it ahead of time (as ``csl_kernels._C``, from the
same source list and flags as the on-the-fly build; ``TORCH_CUDA_ARCH_LIST`` defaults to 9.0+PTX when no GPU is
visible).
"""

import importlib.util
import json
import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _ext_sources_module():
    """csl_kernels/cpp/sources.py, loaded by path: no torch and no package import."""
    spec = importlib.util.spec_from_file_location("_csl_ext_sources", ROOT / "csl_kernels" / "cpp" / "sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (csl_kernels/csrc) so an installed package can build the extension."""

    def run(self):
        super().run()
        shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "csl_kernels" / "csrc", dirs_exist_ok=True)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("CSL_BUILD_EXT") == "1":
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch may guess /usr/local from an nvcc wrapper script
    import torch
    from torch.utils import cpp_extension

    sources_module = _ext_sources_module()
    with_cuda = (os.environ.get("CSL_EXT_CUDA", "1") != "0" and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():  # what torch's builder compiles for: the visible GPUs
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:  # Hopper, and PTX that newer GPUs compile at load; the loader rebuilds for GPUs this does not cover
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
    csrc = ROOT / "csrc"
    sources = [os.path.relpath(s, ROOT) for s in sources_module.extension_sources(csrc, with_cuda)]
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext_modules.append(extension(
        "csl_kernels._C",
        sources,
        include_dirs=[str(csrc)],
        extra_compile_args={"cxx": list(sources_module.CXX_FLAGS), "nvcc": list(sources_module.NVCC_FLAGS)},
        extra_link_args=list(sources_module.LD_FLAGS),
    ))

    class BuildExtWithMeta(cpp_extension.BuildExtension):
        """Records the sources, flags and parts that were built, so the loader can tell a stale build from a current
        one."""

        def run(self):
            super().run()
            meta = {"source_hash": sources_module.source_hash(csrc), "flags_hash": sources_module.flags_hash(),
                    "with_cuda": with_cuda,
                    "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
                    "torch_version": torch.__version__, "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX")}
            target = ROOT / "csl_kernels" if self.inplace else Path(self.build_lib) / "csl_kernels"
            target.mkdir(parents=True, exist_ok=True)
            (target / "_C_build.json").write_text(json.dumps(meta))

    cmdclass["build_ext"] = BuildExtWithMeta

setup(
    name="csl",
    version="0.1.0",
    description="Fast, exact CSL pseudo-label selection kernels and a semi-supervised segmentation trainer",
    python_requires=">=3.10",
    packages=find_packages(include=["csl_kernels", "csl_kernels.*", "csl", "csl.*", "csl_bench", "csl_bench.*"]),
    package_data={"csl_kernels": ["csrc/**/*"], "csl": ["configs/*.yaml", "splits/*", "splits/*/*", "splits/*/*/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",  # torch.serialization.safe_globals with (object, name) pairs (csl/checkpoint.py)
        "torchvision",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "matplotlib",
        "ninja",  # torch's on-the-fly build of the C++/CUDA extension (first use of the cpu / cuda backends)
    ],
    extras_require={"test": ["pytest", "ninja"], "dev": ["pytest", "ninja", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["csl=csl.cli:main"]},
)
