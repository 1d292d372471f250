"""A non-editable install (``pip install .``, a wheel) ships every file the packages read: the bundled configs, the
split files, the extension's C++/CUDA sources; and the installed packages find them from any working folder."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

from csl_kernels.cpp.sources import source_hash

PACKAGES = ("csl", "csl_kernels", "csl_bench")
# Tracked files that stay in the repository: the benchmark records and the benchmark's README.
NOT_SHIPPED = ("csl_bench/results/", "csl_bench/README.md")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files a wheel must hold are unknown")
    listing = subprocess.run(["git", "ls-files", "-z", "setup.py", "pyproject.toml", "csrc", *PACKAGES], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
    return [name for name in listing.split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel_and_site(tmp_path_factory):
    """The working tree's tracked package files built into a wheel (in a copy: a build writes build/ and *.egg-info
    beside setup.py) and installed into a folder of its own."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    tracked = _tracked_files()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "CSL_BUILD_EXT"}  # the pure-Python wheel
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(source), "-w",
                    str(tmp / "dist")], check=True, env=env, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("csl-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   env=env, cwd=tmp)
    return tracked, wheel, site


def test_the_wheel_holds_every_tracked_package_file_and_the_extension_sources(wheel_and_site):
    tracked, wheel, _ = wheel_and_site
    expected = set()
    for name in tracked:
        if name.startswith("csrc/"):
            expected.add("csl_kernels/" + name)
        elif name.startswith(tuple(p + "/" for p in PACKAGES)) and not name.startswith(NOT_SHIPPED):
            expected.add(name)
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert any(n.startswith("csl/splits/") for n in expected) and any(n.startswith("csl_kernels/csrc/cuda/")
                                                                      for n in expected)
    assert sorted(expected - shipped) == []
    assert sorted(n for n in shipped - expected if not n.endswith(".pyc")) == []


def test_the_installed_packages_find_their_configs_splits_and_sources_from_another_folder(wheel_and_site, tmp_path):
    _, _, site = wheel_and_site
    probe = textwrap.dedent(f"""
        import json, os
        import csl, csl_kernels
        from csl.config import CONFIG_DIR, load_config
        from csl.data import SPLITS_DIR
        from csl_kernels.cpp.sources import csrc_dir, source_hash
        site = {str(site)!r}
        configs = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))
        for name in configs:
            load_config(name)
        splits = sorted(os.path.relpath(os.path.join(d, f), SPLITS_DIR) for d, _, fs in os.walk(SPLITS_DIR)
                        for f in fs)
        print(json.dumps({{"modules": [csl.__file__, csl_kernels.__file__], "configs": configs, "splits": splits,
                          "csrc": str(csrc_dir()), "csrc_hash": source_hash(csrc_dir())}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CSL_EXT_SOURCE_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(Path(m).is_relative_to(site) for m in found["modules"]), found["modules"]
    assert found["configs"] == sorted(p.stem for p in (ROOT / "csl" / "configs").glob("*.yaml"))
    assert found["splits"] == sorted(str(p.relative_to(ROOT / "csl" / "splits"))
                                     for p in (ROOT / "csl" / "splits").rglob("*") if p.is_file())
    assert Path(found["csrc"]) == site / "csl_kernels" / "csrc"
    assert found["csrc_hash"] == source_hash(ROOT / "csrc")


def test_the_extension_sources_keep_ruffs_line_length():
    """The C++ / CUDA sources keep the 120 columns that ruff holds the Python to (pyproject.toml)."""
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh")]
    assert sources
    long = [f"{p.relative_to(ROOT)}:{n}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert long == []
