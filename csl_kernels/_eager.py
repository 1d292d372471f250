"""Eager calls of the fused backends: the launchers are called directly, without the custom-op layers.

Every fused op is also a custom op (``csl::<op>`` of the extension, ``csl_triton::<op>``): that is what
``torch.compile`` traces, what ``torch.library.opcheck`` tests and what autograd records where it must. An eager
call needs none of their layers (the dispatcher's Python autograd kernel, the re-dispatch below autograd, the wrapper
that keeps Dynamo out), which took more host time per call than the kernels take on a GPU at training sizes
(``python -m csl_bench.bench_host_overhead``). So a fused backend's implementation is::

    op_or_launch(op, launcher, *args)   # the op while compile traces or autograd must record, else the launcher

and the weighted cross-entropy, whose gradient is wanted, is a :class:`torch.autograd.Function` per backend around
its forward and backward launchers (:func:`fused_cross_entropy`), which uses the backward op only where a
gradient of the gradient would be recorded (the op raises the clear "not differentiable" error when it is used).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import forward_ad

from ._checks import not_differentiable_error

# Where the extension's ops are called below autograd: their autograd kernels (Python) are skipped, the C++ kernel
# runs. The same guard torch.library's own autograd layer uses to reach the kernel.
below_autograd = torch._C._AutoDispatchBelowAutograd


def under_torch_func() -> bool:
    """A ``torch.func`` transform (vmap, grad, ...) is active: its wrapped tensors have no storage a launcher could
    read, so calls go through the custom op (batched by PyTorch's fallback)."""
    return torch._C._are_functorch_transforms_active()


def goes_through_op(t: torch.Tensor) -> bool:
    """True where a call on ``t`` must use the custom op: while ``torch.compile`` traces, under a ``torch.func``
    transform (``vmap`` batches through the op; the launchers read plain storage), or when autograd records the call
    (grad mode on and ``t`` requires grad: the op's autograd formula then raises a clear error on backward)."""
    return torch.compiler.is_compiling() or under_torch_func() or (torch.is_grad_enabled() and t.requires_grad)


def refuse_dual(*tensors: torch.Tensor | None) -> None:
    """A RuntimeError when one of ``tensors`` carries a forward-mode tangent (``torch.autograd.forward_ad``): the
    fused kernels have no forward derivative, and the custom ops would drop the tangent without a word."""
    if forward_ad._current_level >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError("csl_kernels: the fused backends (cpu, triton, cuda) have no forward-mode derivative, and "
                           "an input is a dual tensor of torch.autograd.forward_ad; use backend='reference', which "
                           "differentiates through PyTorch")


def op_or_launch(op: torch._ops.OpOverloadPacket, launch: Callable, *args):
    """``op(*args)`` where the call must go through the custom op (:func:`goes_through_op` on the first argument,
    the op's main tensor), else ``launch(*args)``. A dual first argument is refused (:func:`refuse_dual`), and so is
    a call that a ``torch.func`` gradient transform differentiates: PyTorch cannot record the op's autograd formula
    there, and its own error asks for an autograd.Function's ``setup_context``; the op's "not differentiable" error
    is raised instead."""
    refuse_dual(args[0])
    if not goes_through_op(args[0]):
        return launch(*args)
    try:
        return op(*args)
    except RuntimeError as e:
        if under_torch_func() and "setup_context" in str(e):
            raise not_differentiable_error(op._qualified_op_name.split("::")[-1]) from e
        raise


def below_autograd_call(op, *args):
    """The extension's op ``op`` (a ``torch.ops.csl`` packet) run by its C++ kernel, its autograd kernel skipped."""
    with below_autograd():
        return op.default(*args)


def fused_cross_entropy(backend: str, forward: Callable, backward: Callable,
                        backward_op: Callable) -> Callable[..., torch.Tensor]:
    """The eager weighted cross-entropy of one backend, ``loss(logits, label, weight, valid)``: 0-dim, differentiable
    w.r.t. ``logits`` through a :class:`torch.autograd.Function` of its own where autograd records, else the forward
    launcher's loss alone. ``forward(logits, label, weight, valid) -> (loss, *saved)``, ``backward(grad_loss,
    logits, label, weight, valid, *saved) -> grad_logits``, and ``backward_op`` (same arguments as ``backward``) where
    the gradient itself is recorded (``create_graph=True``). The launchers are the Function's own: ``apply`` takes
    the four tensors only."""

    class FusedCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, label, weight, valid):
            loss, *saved = forward(logits, label, weight, valid)
            ctx.save_for_backward(logits, label, weight, valid, *saved)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            if not ctx.needs_input_grad[0]:
                return None, None, None, None
            # Grad mode is on inside backward only under create_graph=True: the op records its (raising) formula.
            run = backward_op if torch.is_grad_enabled() else backward
            return run(grad_loss, *ctx.saved_tensors), None, None, None

    FusedCrossEntropy.__name__ = FusedCrossEntropy.__qualname__ = f"FusedCrossEntropy_{backend}"

    def loss(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None
             ) -> torch.Tensor:
        refuse_dual(logits, weight)
        if logits.requires_grad and torch.is_grad_enabled():
            if under_torch_func():
                raise RuntimeError("csl_kernels.weighted_cross_entropy: the fused backends (cpu, triton, cuda) have no "
                                   "torch.func gradient (grad, vjp, jacrev); use torch.autograd, or "
                                   "backend='reference'")
            return FusedCrossEntropy.apply(logits, label, weight, valid)
        return forward(logits, label, weight, valid)[0]

    return loss
