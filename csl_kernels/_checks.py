"""The input contract shared by every op: validation with clear errors naming the argument and what was expected,
and the one rule for the dtype an op computes in."""

from __future__ import annotations

import torch

IGNORE_INDEX = 255
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype every backend computes in (and returns floating results in) for input ``t``: float64 stays float64,
    everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_logits(logits: torch.Tensor, name: str = "logits") -> tuple[int, int, int, int]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape B x C x H x W, got {type(logits).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"{name} must have shape B x C x H x W (4 dims), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    b, c, h, w = logits.shape
    if c < 2:
        raise ValueError(f"{name} must have at least 2 classes (dim 1), got C = {c}")
    return b, c, h, w


def valid_mask(ignore: torch.Tensor | None, logits: torch.Tensor, name: str = "ignore") -> torch.Tensor | None:
    """Turn ``ignore`` into a B x H x W bool tensor that is True where a pixel is valid (or None: all valid).

    Integer ``ignore``: valid where ``ignore != 255``. Bool ``ignore``: valid where True.
    """
    if ignore is None:
        return None
    if not isinstance(ignore, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape B x H x W or None, got {type(ignore).__name__}")
    expected = (logits.shape[0], logits.shape[2], logits.shape[3])
    if tuple(ignore.shape) != expected:
        raise ValueError(f"{name} must have shape B x H x W = {expected}, got {tuple(ignore.shape)}")
    if ignore.device != logits.device:
        raise ValueError(f"{name} is on {ignore.device} but logits are on {logits.device}")
    if ignore.dtype == torch.bool:
        return ignore
    if ignore.dtype.is_floating_point or ignore.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor (255 = ignored) or a bool tensor (True = valid), "
                        f"got {ignore.dtype}")
    return ignore != IGNORE_INDEX


def check_label(label: torch.Tensor, logits: torch.Tensor, name: str = "label") -> None:
    if not isinstance(label, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(label).__name__}")
    expected = (logits.shape[0], logits.shape[2], logits.shape[3])
    if tuple(label.shape) != expected:
        raise ValueError(f"{name} must have shape B x H x W = {expected}, got {tuple(label.shape)}")
    if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {label.dtype}")
    if label.device != logits.device:
        raise ValueError(f"{name} is on {label.device} but logits are on {logits.device}")


def check_weight(weight: torch.Tensor, logits: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    expected = (logits.shape[0], logits.shape[2], logits.shape[3])
    if tuple(weight.shape) != expected:
        raise ValueError(f"{name} must have shape B x H x W = {expected}, got {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {weight.dtype}")
    if weight.device != logits.device:
        raise ValueError(f"{name} is on {weight.device} but logits are on {logits.device}")


def check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
