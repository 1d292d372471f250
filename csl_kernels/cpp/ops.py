"""The ``torch.ops.csl`` ops of the extension as the ``"cpu"`` and ``"cuda"`` implementations of every op.

Fake (meta) kernels and the autograd formula of the weighted cross-entropy are registered in Python once the library
is loaded (:func:`register_python_parts`, called by :func:`csl_kernels.cpp.load`), so the ops work under
``torch.compile`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import threading

import torch

from .._backends import register
from .._checks import NOT_DIFFERENTIABLE, register_cross_entropy_autograd, register_not_differentiable
from .._eager import below_autograd_call, fused_cross_entropy, op_or_launch
from ..confusion_matrix import confusion_matrix_outputs_like
from ..pcos_weights import PCOSOutputs, pcos_outputs_like
from ..residual_features import ResidualFeatures, residual_features_outputs_like
from ..trusted_mask import TrustedMask, trusted_mask_outputs_like
from ..weighted_cross_entropy import weighted_cross_entropy_outputs_like

_registered = False
_register_lock = threading.Lock()


def register_python_parts() -> None:
    """Fake kernels and autograd of the C++ ops (once, after the library is loaded)."""
    global _registered
    with _register_lock:
        if _registered:
            return

        @torch.library.register_fake("csl::residual_features")
        def _(logits, valid, log_confidence, released=False):
            return tuple(residual_features_outputs_like(logits))

        @torch.library.register_fake("csl::pcos_weights")
        def _(logits, valid, alpha, log_confidence, class_groups, released=False):
            return tuple(pcos_outputs_like(logits, class_groups))

        @torch.library.register_fake("csl::trusted_mask")
        def _(images, cells, reliable, fill):
            return tuple(trusted_mask_outputs_like(images))

        @torch.library.register_fake("csl::weighted_cross_entropy")
        def _(logits, label, weight, valid):
            return tuple(weighted_cross_entropy_outputs_like(logits))

        @torch.library.register_fake("csl::weighted_cross_entropy_backward")
        def _(grad_loss, logits, label, weight, valid, lse, count):
            return torch.empty_like(logits)

        @torch.library.register_fake("csl::confusion_matrix")
        def _(pred, target, num_classes, ignore_index):
            return confusion_matrix_outputs_like(pred, num_classes)

        register_cross_entropy_autograd("csl::weighted_cross_entropy", torch.ops.csl.weighted_cross_entropy_backward)
        for name in NOT_DIFFERENTIABLE:
            register_not_differentiable(f"csl::{name}", name)
        _registered = True


def _call(op, *args):
    """An op of the extension: through the op where it must be (:func:`op_or_launch`), else its C++ kernel directly."""
    return op_or_launch(op, lambda *a: below_autograd_call(op, *a), *args)


@register("residual_features", "cpu")
@register("residual_features", "cuda")
def residual_features_cpp(logits: torch.Tensor, valid: torch.Tensor | None, log_confidence: bool,
                          released: bool = False) -> ResidualFeatures:
    return ResidualFeatures(*_call(torch.ops.csl.residual_features, logits, valid, log_confidence, released))


@register("pcos_weights", "cpu")
@register("pcos_weights", "cuda")
def pcos_weights_cpp(
    logits: torch.Tensor, valid: torch.Tensor | None, alpha: float, log_confidence: bool, class_groups: bool,
    released: bool = False,
) -> PCOSOutputs:
    return PCOSOutputs(*_call(torch.ops.csl.pcos_weights, logits, valid, float(alpha), bool(log_confidence),
                              bool(class_groups), bool(released)))


@register("trusted_mask", "cpu")
@register("trusted_mask", "cuda")
def trusted_mask_cpp(images: torch.Tensor, cells: torch.Tensor, reliable: torch.Tensor, fill: float) -> TrustedMask:
    return TrustedMask(*_call(torch.ops.csl.trusted_mask, images, cells, reliable, float(fill)))


@register("weighted_cross_entropy", "cpu")
@register("weighted_cross_entropy", "cuda")
def weighted_cross_entropy_cpp(
    logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """The 0-dim loss, differentiable w.r.t. ``logits``."""
    if torch.compiler.is_compiling():
        return torch.ops.csl.weighted_cross_entropy(logits, label, weight, valid)[0]
    return _cross_entropy(logits, label, weight, valid)


def _cross_entropy_forward(logits, label, weight, valid):
    return below_autograd_call(torch.ops.csl.weighted_cross_entropy, logits, label, weight, valid)


def _cross_entropy_backward(grad_loss, logits, label, weight, valid, lse, count):
    return below_autograd_call(torch.ops.csl.weighted_cross_entropy_backward, grad_loss, logits, label, weight, valid,
                               lse, count)


def _cross_entropy_backward_op(grad_loss, logits, label, weight, valid, lse, count):
    return torch.ops.csl.weighted_cross_entropy_backward(grad_loss, logits, label, weight, valid, lse, count)


# The op is looked up at the call: the library loads (and may be built) at the backend's first use, after import.
_cross_entropy = fused_cross_entropy("cpp", _cross_entropy_forward, _cross_entropy_backward, _cross_entropy_backward_op)


@register("confusion_matrix", "cpu")
@register("confusion_matrix", "cuda")
def confusion_matrix_cpp(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
                         ) -> torch.Tensor:
    return torch.ops.csl.confusion_matrix.default(pred, target, int(num_classes), int(ignore_index))
