"""Builds (on first use) and loads the C++/CUDA extension of ``csrc/`` that defines the ``torch.ops.csl`` ops.

The build uses ``torch.utils.cpp_extension.load`` with ninja and is cached in ``$TORCH_EXTENSIONS_DIR/<name>`` (or
``<$XDG_CACHE_HOME or ~/.cache>/torch_extensions/py<ver>_torch<ver>_cu<ver>/<name>``); the name carries a hash of every
file in ``csrc/`` and of the build configuration, so a changed source (or header) means a fresh build. The CUDA part is
compiled when torch is a CUDA build, ``nvcc`` is found (``CUDA_HOME``) and a GPU is visible — ``CSL_EXT_CUDA=1``
compiles it without a GPU (CI does, to prove the ``.cu`` files compile and link), ``CSL_EXT_CUDA=0`` never — for
``TORCH_CUDA_ARCH_LIST`` if set, else for the visible GPUs, else for sm_90. ``MAX_JOBS`` sets the parallel compile jobs,
``CSL_BUILD_VERBOSE=1`` shows the compiler output. The ``nvidia/*/include`` folders of pip-installed NVIDIA wheels are
added to the include path.

The CPU kernels hold their vectorised loops in three copies (x86-64 baseline, AVX2, AVX-512, see
``csrc/cpu/tile_kernels.cpp``) and use the widest one the CPU supports; all give bitwise the same results, so the
build needs no ``-march`` flag. ``CSL_CPU_ISA=baseline|avx2`` (read once per process) caps the choice, for tests.

A build happens at most once per process; a failure is remembered, written to ``build.log`` in the build folder and
raised by :func:`load` as :class:`ExtensionBuildError` (with the compiler's last lines): the backends' availability
check reports it, so ``backend="auto"`` falls back to the reference while a backend asked for by name raises. When
the CUDA part fails to build (a toolkit that does not fit the host compiler or torch), the CPU part is built alone:
the ``cpu`` backend works and ``cuda`` is unavailable with the compiler's message. A completed build leaves a stamp
beside the library (its size and checksum), and a library that matches its stamp is loaded directly (the builder
needs a writable lock file even for a cached build: a read-only cache still loads); one that does not is built
again. An ahead-of-time build (``CSL_BUILD_EXT=1 pip install``) is used only when it matches the sources, flags,
torch, Python and the visible GPUs' architectures.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .sources import CXX_FLAGS, LD_FLAGS, NVCC_FLAGS, csrc_dir, extension_sources, flags_hash, source_hash

DEFAULT_CUDA_ARCH = "9.0"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # csl_kernels/, where setup.py puts csl_kernels._C
_TAIL_LINES = 15


@dataclass(frozen=True)
class BuildInfo:
    """What was loaded: ``with_cuda`` tells whether the CUDA kernels are in the library."""

    library: str
    with_cuda: bool
    cuda_arch_list: str | None
    built: bool  # False when a cached or ahead-of-time build was loaded
    cuda_error: str | None = None  # why the CUDA part is missing when its build failed (the CPU part was built alone)


class ExtensionBuildError(RuntimeError):
    pass


_lock = threading.Lock()
_info: BuildInfo | None = None
_error: str | None = None


def _cuda_home() -> str | None:
    """The CUDA toolkit: ``$CUDA_HOME`` / ``$CUDA_PATH``, torch's guess, or /usr/local/cuda; it must hold nvcc and
    the runtime headers (torch's guess from a ``nvcc`` wrapper script in /usr/local/bin can be /usr/local)."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def visible_capabilities() -> list[tuple[int, int]]:
    """The distinct compute capabilities of the visible GPUs, sorted."""
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def cuda_build_plan() -> tuple[bool, str | None, str]:
    """``(with_cuda, arch_list, why)``: whether the CUDA part is built, for which archs, and a one-line reason."""
    wanted = os.environ.get("CSL_EXT_CUDA", "")
    if wanted not in ("", "0", "1"):  # a "yes" taken as unset would build without the CUDA part, without a word
        raise ValueError(f"CSL_EXT_CUDA must be 0, 1 or unset, got {wanted!r}")
    if wanted == "0":
        return False, None, "CSL_EXT_CUDA=0"
    if wanted != "1" and not torch.cuda.is_available():
        return False, None, "no GPU visible (CSL_EXT_CUDA=1 builds the CUDA part anyway)"
    if torch.version.cuda is None:
        return False, None, "torch is not a CUDA build"
    if _cuda_home() is None:
        return False, None, "nvcc not found (set CUDA_HOME)"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch:
        if torch.cuda.is_available():
            arch = ";".join(f"{major}.{minor}" for major, minor in visible_capabilities())
        else:
            arch = DEFAULT_CUDA_ARCH
    return True, arch, f"nvcc in {_cuda_home()}"


def _nvidia_wheel_includes() -> list[str]:
    paths = []
    for entry in sys.path:
        paths.extend(sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include"))))
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p)]


def build_name(root: Path, src_hash: str, with_cuda: bool, arch: str | None) -> str:
    """The build folder's name: a hash of everything the build depends on. The source folder's path is part of it:
    torch's builder writes absolute source paths into build.ninja, so two checkouts sharing one folder would
    rebuild each other's build at every switch."""
    flags = [CXX_FLAGS, LD_FLAGS, NVCC_FLAGS]
    config = json.dumps([src_hash, with_cuda, arch, flags, torch.__version__, sys.version_info[:2],
                         str(Path(root).resolve())])
    return "csl_ext_" + hashlib.sha256(config.encode()).hexdigest()[:12]


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    cuda = torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}_cu{cuda}"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")  # as torch's own builder
    return Path(cache) / "torch_extensions" / tag


def _arch_entries(arch_list: str | None) -> list[str]:
    return [e.strip() for e in (arch_list or "").replace(",", ";").replace(" ", ";").split(";") if e.strip()]


def arch_list_understood(arch_list: str | None) -> bool:
    """Whether every entry of ``arch_list`` is a version ``X.Y`` (``a`` / ``f`` / ``+PTX`` suffixes); torch also takes
    names (``Hopper``), which :func:`arch_covers` cannot judge."""
    entries = _arch_entries(arch_list)
    pattern = re.compile(r"^\d+\.\d+[af]?(\+PTX)?$")
    return bool(entries) and all(pattern.match(e) for e in entries)


def arch_covers(arch_list: str | None, capability: tuple[int, int]) -> bool:
    """Whether code built for ``TORCH_CUDA_ARCH_LIST`` ``arch_list`` (e.g. ``"8.0;9.0a;10.0f;9.0+PTX"``) runs on a
    GPU of ``capability``: a cubin of the same major version and a minor version up to the GPU's (``X.Yf``: the same
    family, likewise; ``X.Ya``: that exact GPU only), or PTX of a version up to the GPU's (compiled by the driver at
    load)."""
    major, minor = capability
    for entry in _arch_entries(arch_list):
        ptx = entry.endswith("+PTX")
        version = entry.removesuffix("+PTX")
        specific = version[-1:] if version[-1:] in ("a", "f") else ""
        try:
            e_major, e_minor = (int(x) for x in version.removesuffix(specific).split(".")[:2])
        except ValueError:
            continue
        if specific == "a":
            if (e_major, e_minor) == (major, minor):
                return True
            continue  # arch-specific code (and its PTX) runs on that GPU alone
        if (e_major == major and e_minor <= minor) or (ptx and (e_major, e_minor) <= (major, minor)):
            return True
    return False


def _aot_library(src_hash: str | None, with_cuda: bool, here: Path = PACKAGE_DIR) -> str | None:
    """The ahead-of-time build from ``CSL_BUILD_EXT=1 pip install`` (``csl_kernels._C`` and its ``_C_build.json``
    in ``here``), if it matches the current sources, flags, torch, Python and the visible GPUs; else None (the
    extension is then built on the fly)."""
    meta = here / "_C_build.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    suffix = info.get("ext_suffix")
    library = here / f"_C{suffix}" if suffix else None
    if library is None or suffix != sysconfig.get_config_var("EXT_SUFFIX") or not library.is_file():
        return None  # built for another Python (or recorded before the suffix was)
    if info.get("torch_version") != torch.__version__:
        return None  # another torch: its C++ ABI and op registry may differ
    if src_hash is not None and info.get("source_hash") != src_hash:
        return None  # sources changed since (editable checkout): build on the fly instead
    if info.get("flags_hash") != flags_hash():
        return None  # built with other compile flags
    if with_cuda:
        if not info.get("with_cuda"):
            return None
        if torch.cuda.is_available():
            if not all(arch_covers(info.get("cuda_arch_list"), cap) for cap in visible_capabilities()):
                return None  # no kernel image for a visible GPU
    return str(library)


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _build() -> BuildInfo:
    root = csrc_dir()
    if root is None or not root.is_dir():
        raise ExtensionBuildError(f"the extension sources (csrc/) were not found (looked for {root})")
    with_cuda, arch, why = cuda_build_plan()
    src_hash = source_hash(root)
    if os.environ.get("CSL_EXT_SOURCE_DIR") is None:
        aot = _aot_library(src_hash, with_cuda)
        if aot is not None:
            try:
                torch.ops.load_library(aot)
            except Exception as exc:  # noqa: BLE001 - a broken install: build on the fly instead
                _say(f"csl_kernels: the installed extension {aot} does not load ({exc}); building it instead")
            else:
                meta = json.loads((Path(aot).parent / "_C_build.json").read_text())
                return BuildInfo(aot, bool(meta.get("with_cuda")), meta.get("cuda_arch_list"), built=False)
    if with_cuda:
        try:
            return _build_in_cache(root, src_hash, True, arch, why)
        except ExtensionBuildError as exc:  # a broken toolkit must not take the CPU kernels with it
            _say(f"csl_kernels: {exc}\ncsl_kernels: building the CPU part alone")
            info = _build_in_cache(root, src_hash, False, None, "its CUDA part failed to build")
            return BuildInfo(info.library, False, None, info.built, cuda_error=str(exc))
    if os.environ.get("CSL_EXT_CUDA") == "1":
        _say(f"csl_kernels: CSL_EXT_CUDA=1 but the CUDA part is not built: {why}")
    return _build_in_cache(root, src_hash, False, None, why)


def _library_stamp(library: Path) -> dict:
    """What a completed build's stamp holds (as JSON): the library's size and SHA-256 (8 ms for 10 MB), so a library
    cut short or zero-filled (a crash before the file reached the disk, a partial copy of the cache) is rebuilt
    rather than passed to ``dlopen``, which can die of SIGBUS on such a file."""
    return {"size": library.stat().st_size, "sha256": hashlib.sha256(library.read_bytes()).hexdigest()}


def _stamp_matches(library: Path, stamp: Path) -> bool:
    try:
        return json.loads(stamp.read_text()) == _library_stamp(library)
    except (OSError, ValueError):
        return False


def _discard_build_outputs(build_dir: Path) -> None:
    """Remove a damaged build's library, objects and stamp, so the builder compiles and links anew (ninja would take
    a damaged file newer than its sources for up to date)."""
    for pattern in ("*.so", "*.o", "*.ok"):
        for path in build_dir.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


def _say(message: str) -> None:
    """A line on stderr about the build, through tqdm where it is installed: the first call of an op, inside a
    training loop, must not glue it onto a progress bar."""
    stream = sys.stderr
    if stream is None:  # pythonw, some daemons: nowhere to say it
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of csl, not of the kernels alone
        print(message, file=stream, flush=True)
    else:
        tqdm.write(message, file=stream)
        stream.flush()


def _build_in_cache(root: Path, src_hash: str, with_cuda: bool, arch: str | None, why: str) -> BuildInfo:
    """Build (or load the cached build of) the library in the extensions cache. A build that completed leaves a
    ``<name>.ok`` stamp (:func:`_library_stamp`): a library that matches it is loaded directly (no ninja run, no lock
    file: a read-only cache works); one that does not, or does not load, is built again."""
    name = build_name(root, src_hash, with_cuda, arch)
    build_dir = _build_root() / name
    library = build_dir / f"{name}.so"
    stamp = build_dir / f"{name}.ok"
    what = f"CPU + CUDA for arch {arch}" if with_cuda else f"CPU only ({why})"
    if library.is_file() and stamp.is_file():
        damage = None
        if not _stamp_matches(library, stamp):
            damage = "its size or checksum is not the completed build's"
        else:
            _say(f"csl_kernels: loading the C++ extension ({what}) from {build_dir}")
            try:
                torch.ops.load_library(str(library))
            except Exception as exc:  # noqa: BLE001 - a damaged cache entry: rebuilt below
                damage = f"it does not load ({exc})"
            else:
                return BuildInfo(str(library), with_cuda, arch if with_cuda else None, built=False)
        _say(f"csl_kernels: {library}: {damage}; building it again")
        _discard_build_outputs(build_dir)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExtensionBuildError(f"cannot create the build folder of the csl C++ extension ({exc}); set "
                                  f"TORCH_EXTENSIONS_DIR to a writable folder") from exc
    cached = library.is_file()
    _say(f"csl_kernels: {'loading' if cached else 'building'} the C++ extension ({what}) in {build_dir}"
         + ("" if cached else " (once per source and torch version; a minute or more, longer with CUDA)"))
    started = time.monotonic()
    verbose = os.environ.get("CSL_BUILD_VERBOSE") == "1"
    includes = [str(root)] + (_nvidia_wheel_includes() if with_cuda else [])
    from torch.utils import cpp_extension

    old_arch, old_home = os.environ.get("TORCH_CUDA_ARCH_LIST"), cpp_extension.CUDA_HOME
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        cpp_extension.CUDA_HOME = _cuda_home()
    log_path = build_dir / "build.log"
    try:
        path = cpp_extension.load(
            name=name,
            sources=extension_sources(root, with_cuda),
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS),
            extra_include_paths=includes,
            build_directory=str(build_dir),
            verbose=verbose,
            with_cuda=with_cuda,
            is_python_module=False,
        )
    except Exception as exc:  # noqa: BLE001 - turned into a build error with the log path
        try:
            log_path.write_text(f"{type(exc).__name__}: {exc}\n")
            where = f"full log: {log_path}"
        except OSError as log_exc:  # the folder is not writable: the compiler's message still comes through
            where = f"no log written ({log_exc}; set TORCH_EXTENSIONS_DIR to a writable folder)"
        raise ExtensionBuildError(
            f"building the csl C++ extension ({what}) failed; {where}\nlast lines:\n{_tail(str(exc))}"
        ) from exc
    finally:
        if with_cuda:
            cpp_extension.CUDA_HOME = old_home
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    try:
        built = Path(path or library)
        tmp = stamp.with_suffix(f".ok.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_library_stamp(built)))
        os.replace(tmp, stamp)
    except OSError:  # a read-only cache: loaded through the builder next time too
        pass
    if not cached:
        _say(f"csl_kernels: built the C++ extension in {time.monotonic() - started:.0f} s")
    return BuildInfo(str(path or library), with_cuda, arch if with_cuda else None, built=not cached)


def load() -> BuildInfo:
    """Build (once per process) and load the extension; raises :class:`ExtensionBuildError` with the reason."""
    global _info, _error
    with _lock:
        if _info is not None:
            return _info
        if _error is not None:
            raise ExtensionBuildError(_error)
        try:
            _info = _build()
        except Exception as exc:  # noqa: BLE001 - remembered so a failed build is not retried in this process
            # Not logged here: backend="auto" logs the reason once when it falls back, a named backend raises it.
            _error = str(exc)
            raise ExtensionBuildError(_error) from exc
        return _info

