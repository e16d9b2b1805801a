"""The custom ops behind the rewrite, their autograd, and the public function.

Two ops, registered with ``torch.library`` under the ``inductor_lce`` namespace,
work on flattened tokens (``hidden`` [N, D], ``target`` [N]):

* ``inductor_lce::lce_forward(hidden, weight, bias, target, ignore_index)``
  -> ``(loss [N] fp32, lse [N] fp32)``: per-token negative log-likelihood (0 where
  the target is ``ignore_index``) and the log-sum-exp of the logits.
* ``inductor_lce::lce_backward(grad_loss, grad_lse, hidden, weight, bias, target, lse, ignore_index)``
  -> ``(grad_hidden [N, D], grad_weight [V, D], grad_bias [V] or [0])``.

Reductions (mean / sum / none) and the causal shift are plain PyTorch around the
ops, so the graph pass can keep whatever reduction the user's graph computes.
The device implementation is pluggable: the default kernel is the chunked
reference (``reference.py``); ``inductor_lce.lowerings`` registers faster
kernels per device with ``register_kernel``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import lce_backward_reference, lce_forward_reference

_NO_GRAD_BIAS_SHAPE = (0,)


@torch.library.custom_op("inductor_lce::lce_forward", mutates_args=())
def lce_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    return lce_forward_reference(hidden, weight, bias, target, ignore_index)


@lce_forward.register_fake
def _lce_forward_fake(hidden, weight, bias, target, ignore_index):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("inductor_lce::lce_backward", mutates_args=())
def lce_backward(
    grad_loss: Tensor,
    grad_lse: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_hidden, grad_weight, grad_bias = lce_backward_reference(
        grad_loss, grad_lse, hidden, weight, bias, target, lse, ignore_index
    )
    if grad_bias is None:
        grad_bias = weight.new_empty(_NO_GRAD_BIAS_SHAPE)
    return grad_hidden, grad_weight, grad_bias


@lce_backward.register_fake
def _lce_backward_fake(grad_loss, grad_lse, hidden, weight, bias, target, lse, ignore_index):
    grad_bias = weight.new_empty(_NO_GRAD_BIAS_SHAPE) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def register_lce_autograd(forward_op, backward_op) -> None:
    """Autograd of a forward op with lce_forward's schema, through a backward op with
    lce_backward's schema (used for these ops and for the per-device Triton ops)."""

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, ignore_index = inputs
        _, lse = output
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.ignore_index = ignore_index
        ctx.has_bias = bias is not None

    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        grad_hidden, grad_weight, grad_bias = backward_op(
            grad_loss.float(), None if grad_lse is None else grad_lse.float(),
            hidden, weight, bias, target, lse, ctx.ignore_index,
        )
        return grad_hidden, grad_weight, (grad_bias if ctx.has_bias else None), None, None

    forward_op.register_autograd(backward, setup_context=setup_context)


register_lce_autograd(lce_forward, lce_backward)

_REDUCTIONS = ("mean", "sum", "none")


def shift_targets(labels: Tensor, ignore_index: int) -> Tensor:
    """Causal shift without touching hidden: position t is scored against labels[..., t+1];
    the last position of every sequence gets ``ignore_index``."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(), ...)``
    without materializing the [N, V] logits.

    hidden: [..., D]; weight: [V, D]; labels: [...] (hidden's leading shape), integer.
    ``shift=True`` scores hidden position t against ``labels[..., t + 1]`` (the causal
    LM shift; the last position of each sequence is dropped). Returns float32: a scalar
    for ``mean`` / ``sum``, one value per scored token shaped like ``labels`` (or
    ``labels[..., 1:]`` with ``shift``) for ``none``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied "
            f"({hidden.reshape(-1, hidden.shape[-1]).shape[0]}x{hidden.shape[-1]} and "
            f"{weight.shape[1]}x{weight.shape[0]})"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise RuntimeError(f"expected scalar type Long but found {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"Expected labels of shape {tuple(hidden.shape[:-1])} (hidden's leading shape), "
            f"got {tuple(labels.shape)}"
        )
    if shift and labels.dim() == 0:
        raise ValueError("shift=True needs labels with a sequence dimension")
    target = shift_targets(labels, ignore_index) if shift else labels
    target = target.reshape(-1).long()
    loss, _ = lce_forward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, target, ignore_index)
    if reduction == "none":
        loss = loss.view(labels.shape)
        return loss[..., :-1] if shift else loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum()
