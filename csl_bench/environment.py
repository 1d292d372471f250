"""Where a benchmark ran: device, versions, git state, and how the kernels chose backends and launch settings."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*cmd: str) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def device_slug(device: torch.device, name: str | None = None) -> str:
    """``cpu``, or the GPU's name (``name`` where it was recorded elsewhere, e.g. in a merged run) as a file name
    part: ``NVIDIA H200`` -> ``nvidia-h200``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", (name or device_name(device)).lower()).strip("-")


def environment(device: torch.device) -> dict:
    dirty = _git("status", "--porcelain", "--", "csl_kernels", "csrc", "csl_bench", "csl")
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_runtime": torch.version.cuda,
        "cuda_driver_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_name": cpu_name(),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        # the extension's CUDA kernels hold a pixel's C <= 32 logits in registers unless this is "0"
        # (csrc/cuda/cuda_utils.cuh; C > 32 always reads them class by class)
        "cuda_register_classes": "0" if os.environ.get("CSL_CUDA_REGISTER_CLASSES") == "0" else "1",
    }


def show_kernel_log() -> None:
    """Print the kernels' log lines (backend choices, fallbacks, launch-configuration tuning) while benchmarks run."""
    logger = logging.getLogger("csl_kernels")
    if not any(getattr(h, "_bench_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  [%(name)s] %(message)s"))
        handler._bench_handler = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def triton_tuning() -> dict:
    """How the Triton kernels were launched in this process: autotune mode, cache file and every configuration
    chosen (with each candidate's time where this process timed them; csl_kernels/triton/tuning.py)."""
    try:
        from csl_kernels.triton import tuning
    except ImportError as exc:
        return {"error": str(exc)}
    return {"autotune": os.environ.get(tuning.ENV_MODE, "1"), "cache": str(tuning.cache_path()),
            "chosen": tuning.chosen()}


__all__ = ["REPO_ROOT", "cpu_name", "device_name", "device_slug", "environment", "show_kernel_log", "triton_tuning"]
