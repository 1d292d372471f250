"""The input contract shared by every op, checked once at its public entry (the backends below trust it): validation
with clear errors naming the argument and what was expected, and the one rule for the dtype an op computes in."""

from __future__ import annotations

import sys

import torch

IGNORE_INDEX = 255
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype every backend computes in (and returns floating results in) for input ``t``: float64 stays float64,
    everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_dense(t: torch.Tensor, name: str) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense()")


def check_logits(logits: torch.Tensor, name: str = "logits") -> tuple[int, int, int, int]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape B x C x H x W, got {type(logits).__name__}")
    check_dense(logits, name)
    if logits.dim() != 4:
        raise ValueError(f"{name} must have shape B x C x H x W (4 dims), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    b, c, h, w = logits.shape
    if c < 2:
        raise ValueError(f"{name} must have at least 2 classes (dim 1), got C = {c}")
    return b, c, h, w


def check_images(images: torch.Tensor, name: str = "images") -> tuple[int, int, int, int]:
    if (not isinstance(images, torch.Tensor) or images.layout != torch.strided or images.dim() != 4
            or images.dtype not in LOGIT_DTYPES):
        what = f" {images.dtype} {images.layout}" if isinstance(images, torch.Tensor) else ""
        raise ValueError(f"{name} must be a dense float16 / bfloat16 / float32 / float64 B x K x H x W tensor, got "
                         f"{_shape(images)}{what}")
    b, k, h, w = images.shape
    return b, k, h, w


def check_pixel_map(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str = "logits") -> None:
    """``t`` is a ``B x H x W`` tensor on the device of ``ref`` (``B x C x H x W`` logits or ``B x K x H x W``
    images)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape B x H x W, got {type(t).__name__}")
    check_dense(t, name)
    shape, ref_shape = t.shape, ref.shape  # compared element by element: no tuples built on the per-call path
    if len(shape) != 3 or shape[0] != ref_shape[0] or shape[1] != ref_shape[2] or shape[2] != ref_shape[3]:
        expected = (ref_shape[0], ref_shape[2], ref_shape[3])
        raise ValueError(f"{name} must have shape B x H x W = {expected}, got {tuple(shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} are on {ref.device}")


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def pixel_validity(logits: torch.Tensor, ignore: torch.Tensor | None = None, valid: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """Which pixels are valid, checked, in the form a backend takes (the ``valid`` argument of every
    implementation of an op that has ``ignore=`` / ``valid=``): None (every pixel is valid), the ``B x H x W`` bool
    mask ``valid`` (True = valid) or the integer map ``ignore`` itself (255 = ignored), from at most one of them.

    The map is not compared here: the Triton kernels and those of the C++/CUDA extension compare it in place, which
    saves a ``B x H x W`` pass, a launch and an allocation per call; the reference turns it into the mask with
    :func:`as_valid`. A bool ``ignore``
    raises TypeError: it reads as "True = ignored" to some callers and "True = valid" to others.
    """
    if ignore is not None and valid is not None:
        raise ValueError("pass ignore= (an integer map, 255 = ignored) or valid= (a bool mask, True = valid), not both")
    if valid is not None:
        check_pixel_map(valid, logits, "valid")
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor (True = valid), got {valid.dtype}; pass an integer map "
                            f"with 255 = ignored as ignore=")
        return valid
    if ignore is None:
        return None
    check_pixel_map(ignore, logits, "ignore")
    if ignore.dtype == torch.bool:
        raise TypeError("ignore is a bool tensor, which is ambiguous: pass a bool mask with True = valid as valid= "
                        "(e.g. valid=ignore_mask != 255), or the integer map itself as ignore= (255 = ignored)")
    if not _is_integer(ignore):
        raise TypeError(f"ignore must be an integer tensor (255 = ignored), got {ignore.dtype}; pass a bool mask "
                        f"(True = valid) as valid=")
    check_int8_holds(ignore, IGNORE_INDEX, "ignore", "the ignore value 255",
                     " (255 = ignored), or pass a bool mask (True = valid) as valid=")
    return ignore


def check_int8_holds(t: torch.Tensor, value: int, name: str, what: str, hint: str = "") -> None:
    """An int8 map cannot hold ``value`` (255 would wrap to -1 in a comparison): refused, naming ``what`` it is."""
    if t.dtype == torch.int8 and not -128 <= value <= 127:
        raise TypeError(f"{name} is int8, which cannot hold {what}; use uint8 / int16 / int32 / int64{hint}")


def as_valid(pixels: torch.Tensor | None) -> torch.Tensor | None:
    """The bool mask (True = valid) of what :func:`pixel_validity` returned: a mask or None as it is, an ignore map
    compared with ``IGNORE_INDEX``."""
    if pixels is None or pixels.dtype == torch.bool:
        return pixels
    return pixels != IGNORE_INDEX


def valid_mask(logits: torch.Tensor, ignore: torch.Tensor | None = None, valid: torch.Tensor | None = None
               ) -> torch.Tensor | None:
    """The ``B x H x W`` bool mask that is True where a pixel is valid (None: every pixel is), from at most one of
    ``ignore`` (an integer map, 255 = ignored, as segmentation datasets code it) and ``valid`` (a bool mask), checked
    as :func:`pixel_validity` checks them."""
    return as_valid(pixel_validity(logits, ignore, valid))


def check_label(label: torch.Tensor, logits: torch.Tensor, name: str = "label") -> None:
    check_pixel_map(label, logits, name)
    if not _is_integer(label):
        raise TypeError(f"{name} must be an integer tensor, got {label.dtype}")


def check_weight(weight: torch.Tensor, logits: torch.Tensor, name: str = "weight") -> None:
    check_pixel_map(weight, logits, name)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {weight.dtype}")


def check_bool(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")


def check_bool_map(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str = "logits") -> None:
    """``t`` is a bool ``B x H x W`` tensor on the device of ``ref``."""
    check_bool(t, name)
    check_pixel_map(t, ref, name, ref_name)


def check_integer_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or not _is_integer(t):
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    check_dense(t, name)


def check_same_shape(**tensors: torch.Tensor) -> None:
    """The tensors (named by the keywords) share one shape and one device."""
    names = list(tensors)
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    shapes = [tuple(t.shape) for t in tensors.values()]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{listed} must have the same shape, got {', '.join(map(str, shapes))}")
    devices = [t.device for t in tensors.values()]
    if any(d != devices[0] for d in devices):
        raise ValueError(f"{listed} must be on the same device, got {', '.join(map(str, devices))}")


INT64_RANGE = (-(2**63), 2**63 - 1)


def check_int(value: int, name: str) -> None:
    """A plain int in the int64 range the kernels take (a bool or a float is refused: a float ``ignore_index`` would
    be truncated by some backends and compared exactly by others)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"{name} must fit in int64 [{INT64_RANGE[0]}, {INT64_RANGE[1]}], got {value}")


def _described(value) -> str:
    """``value`` for an error message, with its type where its repr hides it (``32`` of a numpy.int64, ``True``)."""
    plain = type(value) in (int, float, str, type(None))
    return repr(value) if plain else f"{value!r} ({type(value).__module__}.{type(value).__qualname__})"


def _is_number(value) -> bool:
    """A Python int or float (a bool is refused: ``alpha=True`` is a mistake, not 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _not_a_number_hint(value) -> str:
    """What to pass instead of a value that is no Python int or float (an empty string where it is one)."""
    if _is_number(value):
        return ""
    if isinstance(value, torch.Tensor):
        return ": a Python float is needed (float(t), which waits for the tensor's device)"
    return ": a Python int or float is needed"


def check_positive(value: float, name: str) -> None:
    """A finite number > 0 (compared, not ``math.isfinite``: a symbolic float under ``torch.compile(dynamic=True)``
    traces through comparisons; an int beyond the largest float is refused here, not by ``float()`` later)."""
    if not (_is_number(value) and 0 < value <= sys.float_info.max):
        raise ValueError(f"{name} must be a positive finite number, got {_described(value)}{_not_a_number_hint(value)}")


def check_positive_int(value: int, name: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be a positive int, got {_described(value)}")


def check_fraction(value: float, name: str, *, zero_allowed: bool = True) -> None:
    """``value`` lies in ``[0, 1]`` (``(0, 1]`` without ``zero_allowed``)."""
    low_ok = _is_number(value) and (value >= 0 if zero_allowed else value > 0)
    if not (low_ok and value <= 1):
        raise ValueError(f"{name} must be in {'[' if zero_allowed else '('}0, 1], got {_described(value)}"
                         f"{_not_a_number_hint(value)}")


def check_flag(value: bool, name: str) -> None:
    """``True`` or ``False`` (a string such as ``"no"`` would read as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_described(value)}")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


NOT_DIFFERENTIABLE = {
    "residual_features": "the CSL features are constants of the loss",
    "pcos_weights": "the CSL weights and pseudo-labels are constants of the loss",
    "trusted_mask": "the masked view is an input, not a function to differentiate",
    "weighted_cross_entropy_backward": "the weighted cross-entropy has no second derivative (double backward)",
}


WEIGHT_IS_CONSTANT = ("weighted_cross_entropy: weight requires grad, but the loss treats the weights as constants (no "
                      "backend returns their gradient): pass weight.detach(), or select from logits.detach() as "
                      "pcos_weights(pred.detach(), ...) does")


def _register_autograd(op, backward, setup_context) -> None:
    """``op``: a custom op (``torch.library.custom_op``) or the qualified name of one defined in C++."""
    if isinstance(op, str):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
    else:
        op.register_autograd(backward, setup_context=setup_context)


def register_cross_entropy_autograd(op, backward_op) -> None:
    """The autograd formula of a fused backend's weighted cross-entropy op (``op``: the custom op or its qualified
    name; outputs loss, lse, count): the logits' gradient by ``backward_op(grad_loss, logits, label, weight, valid,
    lse, count)``. A weight that requires grad raises :data:`WEIGHT_IS_CONSTANT` (the public call refuses it before
    the op; a direct caller of the op gets the same error, not a silent None gradient)."""

    def setup_context(ctx, inputs, output):
        logits, label, weight, valid = inputs
        _, lse, count = output
        ctx.save_for_backward(logits, label, weight, valid, lse, count)

    def backward(ctx, grad_loss, grad_lse, grad_count):
        # lse and count are auxiliary outputs for the backward pass; gradients flowing into them are not propagated
        if ctx.needs_input_grad[2]:
            raise RuntimeError(WEIGHT_IS_CONSTANT)
        grad = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            grad = backward_op(grad_loss, *ctx.saved_tensors)
        return grad, None, None, None

    _register_autograd(op, backward, setup_context)


def not_differentiable_error(name: str) -> RuntimeError:
    """The error of a gradient asked of the fused op ``name`` (a key of :data:`NOT_DIFFERENTIABLE`)."""
    return RuntimeError(f"csl_kernels.{name} is not differentiable: {NOT_DIFFERENTIABLE[name]}; call it on detached "
                        f"inputs (x.detach()) or under torch.no_grad() (backend 'reference' computes plain PyTorch "
                        f"gradients where a formula exists)")


def register_not_differentiable(op, name: str) -> None:
    """Register an autograd formula for a fused op (``op``: a custom op or a qualified name) whose backward raises
    a clear error, as the reference cannot and a silent None / zero gradient must not."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise not_differentiable_error(name)

    _register_autograd(op, backward, setup_context)
