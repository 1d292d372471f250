"""Where csl keeps what it learns about a machine: ``$XDG_CACHE_HOME/csl`` (default ``~/.cache/csl``): the Triton
launch tuning, ``backend="auto"``'s measured choices, the stamps of checked label files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "csl"
