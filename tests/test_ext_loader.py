"""The loader of the C++/CUDA extension (csl_kernels/cpp/build.py, sources.py, __init__.py) without a compiler: the
build plan, the build folder's name and place, the ahead-of-time build, the stamps of the cache, what the builder is
given, and the once-per-process state; also the environment and cache-folder helpers (_env.py, _paths.py) and the
setup.py commands that ship the sources and record an ahead-of-time build. tests/test_ext.py builds the extension."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torch.utils import cpp_extension

import csl_kernels.cpp
from csl_kernels.cpp import build, sources


@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    """The loader's once-per-process state reset (restored after the test), its cache in ``tmp_path/ext``."""
    monkeypatch.setattr(build, "_info", None)
    monkeypatch.setattr(build, "_error", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("CSL_EXT_SOURCE_DIR", raising=False)
    monkeypatch.setenv("CSL_EXT_CUDA", "0")
    return tmp_path


def _toolkit(monkeypatch, *, gpus=(), cuda="13.0", home="/fake/cuda"):
    """A CUDA build of torch (``cuda``), nvcc in ``home`` (None: none) and the visible GPUs' capabilities ``gpus``."""
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(build, "_cuda_home", lambda: home)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: gpus[i])


def test_cuda_build_plan_follows_the_environment_the_toolkit_and_the_gpus(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("CSL_EXT_CUDA", raising=False)
    _toolkit(monkeypatch)
    assert build.cuda_build_plan()[:2] == (False, None)  # no GPU visible
    monkeypatch.setenv("CSL_EXT_CUDA", "1")  # CI: the CUDA part without a GPU, for sm_90
    assert build.cuda_build_plan() == (True, "9.0", "nvcc in /fake/cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # set but empty: the default too
    assert build.cuda_build_plan()[:2] == (True, "9.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert build.cuda_build_plan()[:2] == (True, "8.0;9.0+PTX")
    _toolkit(monkeypatch, cuda=None)
    assert build.cuda_build_plan() == (False, None, "torch is not a CUDA build")
    _toolkit(monkeypatch, home=None)
    assert build.cuda_build_plan() == (False, None, "nvcc not found (set CUDA_HOME)")
    # unset: the visible GPUs, every distinct capability once, sorted, in the X.Y form TORCH_CUDA_ARCH_LIST takes
    monkeypatch.delenv("CSL_EXT_CUDA")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    _toolkit(monkeypatch, gpus=((9, 0), (8, 6), (9, 0)))
    assert build.visible_capabilities() == [(8, 6), (9, 0)]
    assert build.cuda_build_plan() == (True, "8.6;9.0", "nvcc in /fake/cuda")


def test_cuda_home_needs_nvcc_and_the_runtime_headers(tmp_path, monkeypatch):
    def toolkit(name, headers=True):
        home = tmp_path / name
        (home / "bin").mkdir(parents=True)
        (home / "bin" / "nvcc").write_text("")
        if headers:
            (home / "include").mkdir()
            (home / "include" / "cuda_runtime.h").write_text("")
        return str(home)

    wrapper, first, second = toolkit("wrapper", headers=False), toolkit("first"), toolkit("second")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setenv("CUDA_HOME", wrapper)  # nvcc without the headers (torch's guess from a wrapper script)
    monkeypatch.setenv("CUDA_PATH", first)
    assert build._cuda_home() == first
    monkeypatch.setenv("CUDA_HOME", second)  # CUDA_HOME before CUDA_PATH
    assert build._cuda_home() == second


def test_build_name_changes_with_everything_the_build_depends_on(monkeypatch):
    root = sources.csrc_dir()
    base = build.build_name(root, "abc", True, "9.0")
    assert base == build.build_name(root, "abc", True, "9.0") and re.fullmatch(r"csl_ext_[0-9a-f]{12}", base)
    names = {base, build.build_name(root, "abd", True, "9.0"), build.build_name(root, "abc", True, "8.0"),
             build.build_name(root, "abc", False, None)}
    monkeypatch.setattr(build, "CXX_FLAGS", [*build.CXX_FLAGS, "-DCSL_OTHER"])
    names.add(build.build_name(root, "abc", True, "9.0"))
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    names.add(build.build_name(root, "abc", True, "9.0"))
    monkeypatch.undo()
    monkeypatch.setattr(build, "sys", types.SimpleNamespace(version_info=(3, 99, 0)))
    names.add(build.build_name(root, "abc", True, "9.0"))
    assert len(names) == 7, names


def test_build_root_is_torch_extensions_dir_or_the_cache_folder_of_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert build._build_root() == tmp_path / "ext"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cuda = torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}_cu{cuda}"
    assert build._build_root() == tmp_path / "xdg" / "torch_extensions" / tag


def test_arch_lists_with_names_and_empty_ones():
    assert build.arch_covers("Hopper;9.0", (9, 0))  # a name it cannot judge does not hide the entries it can
    assert not build.arch_list_understood("") and not build.arch_list_understood(None)


def test_ahead_of_time_build_without_its_library_or_with_a_broken_record_is_not_used(tmp_path):
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    meta = {"source_hash": "abc", "flags_hash": sources.flags_hash(), "with_cuda": False,
            "torch_version": torch.__version__, "ext_suffix": suffix}
    assert build._aot_library("abc", False, tmp_path) is None  # no record
    (tmp_path / "_C_build.json").write_text(json.dumps(meta))
    assert build._aot_library("abc", False, tmp_path) is None  # a record, no library (removed since)
    (tmp_path / f"_C{suffix}").write_bytes(b"")
    assert build._aot_library("abc", False, tmp_path) == str(tmp_path / f"_C{suffix}")
    (tmp_path / "_C_build.json").write_text(json.dumps(meta)[:-5])  # cut short
    assert build._aot_library("abc", False, tmp_path) is None


def test_an_ahead_of_time_build_that_does_not_load_is_built_instead(fresh_loader, monkeypatch):
    aot = fresh_loader / "pkg" / "_C.so"
    aot.parent.mkdir()
    aot.write_bytes(b"")
    (aot.parent / "_C_build.json").write_text(json.dumps({"with_cuda": False, "cuda_arch_list": None}))
    monkeypatch.setattr(build, "_aot_library", lambda src_hash, with_cuda: str(aot))
    cache_info = build.BuildInfo("cache.so", False, None, built=True)
    monkeypatch.setattr(build, "_build_in_cache", lambda *args: cache_info)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    assert build._build() == build.BuildInfo(str(aot), False, None, built=False)  # loaded, not built

    def broken(path):
        raise OSError(f"{path}: undefined symbol: _ZN3c10")

    monkeypatch.setattr(torch.ops, "load_library", broken)
    assert build._build() is cache_info


def test_a_missing_source_folder_is_a_build_error(fresh_loader, monkeypatch):
    monkeypatch.setenv("CSL_EXT_SOURCE_DIR", str(fresh_loader / "no_such_csrc"))
    with pytest.raises(build.ExtensionBuildError, match="the extension sources .* were not found"):
        build._build()


def test_library_stamps_vouch_for_size_and_content(tmp_path):
    library, stamp = tmp_path / "x.so", tmp_path / "x.ok"
    library.write_bytes(b"\x7fELF complete")
    stamp.write_text(json.dumps(build._library_stamp(library)))
    assert build._stamp_matches(library, stamp)
    library.write_bytes(b"\x00" * len(b"\x7fELF complete"))  # zero-filled, same size (a crash before the write-back)
    assert not build._stamp_matches(library, stamp)
    stamp.write_text("{")  # a stamp cut short
    assert not build._stamp_matches(library, stamp)
    stamp.unlink()
    assert not build._stamp_matches(library, stamp)


@pytest.fixture
def cache_entry(fresh_loader, monkeypatch):
    """The real sources' build folder in a fresh cache, the builder faked: ``(library, stamp, calls)``, where the
    fake builder appends its keyword arguments (and the CUDA settings it saw) to ``calls`` and writes the library."""
    root = sources.csrc_dir()
    name = build.build_name(root, "abc", False, None)
    folder = fresh_loader / "ext" / name
    library, stamp = folder / f"{name}.so", folder / f"{name}.ok"
    calls = []

    def fake_load(**kwargs):
        calls.append({**kwargs, "arch_env": os.environ.get("TORCH_CUDA_ARCH_LIST"), "home": cpp_extension.CUDA_HOME})
        built = Path(kwargs["build_directory"]) / f"{kwargs['name']}.so"
        built.write_bytes(b"\x7fELF built " + str(len(calls)).encode())
        return str(built)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    return library, stamp, calls


def test_the_cache_rebuilds_a_library_that_does_not_load_and_hands_one_without_stamp_to_the_builder(cache_entry,
                                                                                                     monkeypatch):
    library, stamp, calls = cache_entry
    root = sources.csrc_dir()
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF from an older csl")  # no stamp: the builder (ninja) decides, nothing discarded
    (library.parent / "kernels.o").write_bytes(b"object")
    info = build._build_in_cache(root, "abc", False, None, "test")
    assert len(calls) == 1 and (library.parent / "kernels.o").exists() and not info.built  # loaded, not built
    assert build._stamp_matches(library, stamp)

    def broken(path):
        raise OSError(f"{path}: undefined symbol")

    monkeypatch.setattr(torch.ops, "load_library", broken)  # matches its stamp, but dlopen refuses it: rebuilt
    info = build._build_in_cache(root, "abc", False, None, "test")
    assert len(calls) == 2 and not (library.parent / "kernels.o").exists() and info.built


def test_a_build_leaves_the_flags_that_name_the_next_one_as_they_were(cache_entry, monkeypatch):
    """torch's builder appends its link libraries to the extra_ldflags list it is given (and may add compile flags):
    a build must hand it copies, or the flags hash changes inside the process, and with it the name of the next
    build (the CPU-only build after a failed CUDA part) and the check of an ahead-of-time build's record."""
    _, _, calls = cache_entry
    root = sources.csrc_dir()
    flags, name = sources.flags_hash(), build.build_name(root, "abc", False, None)

    def appending_load(**kwargs):
        for key in ("extra_cflags", "extra_ldflags", "extra_cuda_cflags"):
            kwargs[key].append("-ltorch_appended")  # what torch's _prepare_ldflags does to extra_ldflags
        built = Path(kwargs["build_directory"]) / f"{kwargs['name']}.so"
        built.write_bytes(b"\x7fELF built")
        calls.append(kwargs)
        return str(built)

    monkeypatch.setattr(cpp_extension, "load", appending_load)
    build._build_in_cache(root, "abc", False, None, "test")
    assert len(calls) == 1 and calls[0]["extra_ldflags"][-1] == "-ltorch_appended"
    assert sources.flags_hash() == flags and build.build_name(root, "abc", False, None) == name


def test_a_build_whose_stamp_cannot_be_written_still_loads(cache_entry, monkeypatch):
    library, stamp, calls = cache_entry
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):
        if ".ok." in self.name:
            raise OSError(30, "Read-only file system")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    info = build._build_in_cache(sources.csrc_dir(), "abc", False, None, "test")
    assert info.library == str(library) and info.built and not stamp.exists() and len(calls) == 1


def test_the_builder_gets_the_sources_flags_and_cuda_settings_and_the_environment_is_restored(cache_entry,
                                                                                             monkeypatch):
    _, _, calls = cache_entry
    root = sources.csrc_dir()
    monkeypatch.setattr(build, "_cuda_home", lambda: "/fake/cuda")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")
    monkeypatch.delenv("CSL_BUILD_VERBOSE", raising=False)
    for before, arch in (("7.5", "8.6;9.0"), (None, "8.0")):
        if before is None:
            monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
        else:
            monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", before)
        info = build._build_in_cache(root, "abc", True, arch, "test")
        assert info.with_cuda and info.cuda_arch_list == arch
        assert os.environ.get("TORCH_CUDA_ARCH_LIST") == before and cpp_extension.CUDA_HOME == "/usr/local"
        call = calls[-1]
        assert call["arch_env"] == arch and call["home"] == "/fake/cuda"  # what the build itself saw
        assert call["sources"] == sources.extension_sources(root, True)
        assert (call["extra_cflags"], call["extra_ldflags"], call["extra_cuda_cflags"]) == (
            list(sources.CXX_FLAGS), list(sources.LD_FLAGS), list(sources.NVCC_FLAGS))
        assert call["extra_include_paths"][0] == str(root) and call["with_cuda"] is True
        assert call["is_python_module"] is False and call["verbose"] is False
        assert call["build_directory"] == str(build._build_root() / build.build_name(root, "abc", True, arch))
    monkeypatch.setenv("CSL_BUILD_VERBOSE", "1")
    build._build_in_cache(root, "abc", False, None, "test")
    assert calls[-1]["verbose"] is True and calls[-1]["with_cuda"] is False
    assert calls[-1]["sources"] == sources.extension_sources(root, False)


def test_a_failed_build_says_the_compilers_last_lines(cache_entry, monkeypatch):
    def failing(**kwargs):
        raise RuntimeError("Error building extension:\n" + "\n".join(f"note {i}" for i in range(40))
                           + "\nerror: the real cause")

    monkeypatch.setattr(cpp_extension, "load", failing)
    with pytest.raises(build.ExtensionBuildError, match="the real cause") as err:
        build._build_in_cache(sources.csrc_dir(), "abc", False, None, "test")
    assert "note 39" in str(err.value) and "note 0\n" not in str(err.value)
    assert "full log: " in str(err.value) and "the real cause" in (cache_entry[0].parent / "build.log").read_text()


def test_an_unwritable_cache_folder_is_a_build_error_that_names_the_variable(fresh_loader, monkeypatch):
    (fresh_loader / "file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(fresh_loader / "file" / "ext"))  # a file where a folder must be
    with pytest.raises(build.ExtensionBuildError, match="cannot create the build folder.*set TORCH_EXTENSIONS_DIR"):
        build._build_in_cache(sources.csrc_dir(), "abc", False, None, "test")


def test_a_failed_build_is_not_retried_and_concurrent_first_calls_build_once(fresh_loader, monkeypatch):
    calls = []

    def failing():
        calls.append(1)
        raise build.ExtensionBuildError("csl forced failure")

    monkeypatch.setattr(build, "_build", failing)
    for _ in range(2):
        with pytest.raises(build.ExtensionBuildError, match="csl forced failure"):
            build.load()
    assert len(calls) == 1
    monkeypatch.setattr(build, "_error", None)
    calls.clear()

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return build.BuildInfo("x.so", False, None, built=True)

    monkeypatch.setattr(build, "_build", slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(build.load())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(info is got[0] for info in got)


def test_build_messages_need_no_stderr(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, some daemons
    build._say("csl_kernels: building")


def test_the_availability_checks_report_a_library_without_the_ops_and_a_failed_cpu_part(monkeypatch):
    from csl_kernels.cpp import _check_cpu, _check_cuda

    monkeypatch.setattr(build, "load", lambda: build.BuildInfo("x.so", True, "9.0", built=False))

    def no_ops():
        raise RuntimeError("csl::residual_features: operator not found")

    monkeypatch.setattr(csl_kernels.cpp.ops, "register_python_parts", no_ops)
    reason = _check_cpu(torch.device("cpu"))
    assert "x.so loaded but its ops could not be registered" in reason and "operator not found" in reason
    assert _check_cuda(torch.device("cuda")) == reason  # the CPU part's reason, not an exception


def test_extension_sources_and_source_hash_cover_every_file(tmp_path):
    root = tmp_path / "csrc"
    for rel in ("ops.cpp", "csl_math.h", "cpu/kernels.cpp", "cpu/simd.h", "cuda/kernels.cu", "cuda/common.cuh",
                "README.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"// {rel}\n")
    assert sources.extension_sources(root, False) == [str(root / "ops.cpp"), str(root / "cpu/kernels.cpp")]
    assert sources.extension_sources(root, True) == [str(root / "ops.cpp"), str(root / "cpu/kernels.cpp"),
                                                     str(root / "cuda/kernels.cu")]
    before = sources.source_hash(root)
    (root / "README.md").write_text("not a source")
    assert sources.source_hash(root) == before
    for rel in ("csl_math.h", "cpu/simd.h", "cuda/common.cuh", "cpu/kernels.cpp"):  # headers, sub-folders
        text = (root / rel).read_text()
        (root / rel).write_text(text + "// changed\n")
        assert sources.source_hash(root) != before, rel
        (root / rel).write_text(text)
    assert sources.source_hash(root) == before
    (root / "cpu/kernels.cpp").rename(root / "cpu/kernels2.cpp")  # renamed, same bytes: another build
    assert sources.source_hash(root) != before


def test_flags_hash_covers_every_flag_list(monkeypatch):
    before = sources.flags_hash()
    for name in ("CXX_FLAGS", "LD_FLAGS", "NVCC_FLAGS"):
        with monkeypatch.context() as m:
            m.setattr(sources, name, [*getattr(sources, name), "-DCSL_OTHER"])
            assert sources.flags_hash() != before, name


def test_csrc_is_found_in_the_package_before_the_repository(tmp_path, monkeypatch):
    """An installed package (csl_kernels/csrc, shipped by setup.py) uses its own copy, also where a csrc/ folder
    happens to sit beside it."""
    import importlib.util

    monkeypatch.delenv("CSL_EXT_SOURCE_DIR", raising=False)
    package = tmp_path / "site" / "csl_kernels"
    (package / "cpp").mkdir(parents=True)
    (package / "cpp" / "sources.py").write_text(Path(sources.__file__).read_text())
    spec = importlib.util.spec_from_file_location("_csl_sources_copy", package / "cpp" / "sources.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.csrc_dir() is None
    for where in (tmp_path / "site" / "csrc", package / "csrc"):
        where.mkdir()
        (where / "csl_math.h").write_text("")
        assert copy.csrc_dir() == where
    monkeypatch.setenv("CSL_EXT_SOURCE_DIR", str(tmp_path / "mine"))
    assert copy.csrc_dir() == tmp_path / "mine"


def test_env_value_is_the_variable_as_a_string(monkeypatch):
    from csl_kernels._env import EnvValue

    read = EnvValue("CSL_TEST_ENV_VALUE")
    monkeypatch.delenv("CSL_TEST_ENV_VALUE", raising=False)
    assert read() is None
    monkeypatch.setenv("CSL_TEST_ENV_VALUE", "cpu")
    assert read() == "cpu"
    monkeypatch.setenv("CSL_TEST_ENV_VALUE", "")
    assert read() == ""


def test_cache_dir_follows_xdg_cache_home_and_an_empty_one_means_the_default(monkeypatch, tmp_path):
    from csl_kernels._paths import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # the XDG rule: empty is unset
    assert cache_dir() == tmp_path / ".cache" / "csl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "csl"


_SETUP_RUNNER = """
import runpy, sys
from torch.utils import cpp_extension
cpp_extension.BuildExtension.run = lambda self: None  # no compiler: only what setup.py adds around the build
sys.argv = ["setup.py", "-q", *sys.argv[1:]]
runpy.run_path("setup.py", run_name="__main__")
"""


@pytest.fixture
def setup_copy(tmp_path):
    """A copy of what setup.py builds from (setup.py, csl_kernels/, csrc/) and a runner of its commands."""
    import shutil

    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "setup.py", copy)
    shutil.copytree(ROOT / "csrc", copy / "csrc")
    shutil.copytree(ROOT / "csl_kernels", copy / "csl_kernels", ignore=shutil.ignore_patterns("__pycache__", "_C*"))

    def run(*args, environ=None, **env):
        done = subprocess.run([sys.executable, "-c", _SETUP_RUNNER, *args], cwd=copy, capture_output=True, text=True,
                              env={**(os.environ if environ is None else environ), "PYTHONPATH": "", **env},
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]

    return copy, run


def test_setup_records_an_ahead_of_time_build_the_loader_accepts(setup_copy):
    """The record of ``CSL_BUILD_EXT=1 pip install`` (``_C_build.json``, the compile faked) is what _aot_library
    checks: the sources' and flags' hashes, torch, the extension suffix, the parts built."""
    copy, run = setup_copy
    run("build_ext", "--inplace", CSL_BUILD_EXT="1", CSL_EXT_CUDA="0", TORCH_CUDA_ARCH_LIST="9.0")
    package = copy / "csl_kernels"
    meta = json.loads((package / "_C_build.json").read_text())
    assert meta["with_cuda"] is False and meta["cuda_arch_list"] is None
    library = package / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    library.write_bytes(b"")  # the library the faked compile did not write
    src_hash = sources.source_hash(copy / "csrc")
    assert build._aot_library(src_hash, False, package) == str(library)
    assert build._aot_library(src_hash, True, package) is None  # no CUDA part


@pytest.mark.parametrize("arch_list", [None, ""])
def test_setup_builds_the_cuda_part_without_a_gpu_for_hopper_and_ptx(setup_copy, arch_list):
    """``CSL_BUILD_EXT=1`` on a machine with the CUDA toolkit but no visible GPU (CSL_EXT_CUDA unset,
    TORCH_CUDA_ARCH_LIST unset or empty): the CUDA part, for sm_90 and PTX that newer GPUs compile at load."""
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    copy, run = setup_copy
    env = {k: v for k, v in os.environ.items() if k not in ("CSL_EXT_CUDA", "TORCH_CUDA_ARCH_LIST")}
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    run("build_ext", "--inplace", environ=env, CSL_BUILD_EXT="1", CUDA_VISIBLE_DEVICES="")
    meta = json.loads((copy / "csl_kernels" / "_C_build.json").read_text())
    assert meta["with_cuda"] is True and meta["cuda_arch_list"] == "9.0+PTX"
