"""The custom ops behind the rewrite, their autograd, and the public function.

Two ops, registered with ``torch.library`` under the ``inductor_lce`` namespace,
work on flattened tokens (``hidden`` [N, D], ``target`` [N]); the math is in
``reference.py``:

* ``inductor_lce::lce_forward(hidden, weight, bias, target, ignore_index, softcap=0.0)``
  -> ``(loss [N], lse [N], sum_logits [N])``, all fp32: per-token negative
  log-likelihood (0 where the target is ``ignore_index``), the log-sum-exp of the
  (soft-capped) logits, and their sum over the classes (what label smoothing reads).
* ``inductor_lce::lce_backward(grad_loss, grad_lse, grad_sum_logits, hidden, weight, bias, target, lse,
  ignore_index, softcap=0.0)`` -> ``(grad_hidden [N, D], grad_weight [V, D], grad_bias [V] or [0])``.

* ``inductor_lce::lce_fused(hidden, weight, bias, target, grad_scale, ignore_index, softcap=0.0)``
  -> ``(loss [N], lse [N], grad_hidden [N, D], grad_weight [V, D], grad_bias [V] or [0])``: the three-GEMM
  algorithm. ``grad_scale`` is a 0-dim fp32 tensor, the incoming gradient of every scored token's loss;
  the gradients are those of ``sum_n grad_scale * loss_n``, computed in the same pass over row chunks
  as the loss. Used where every token gets the same incoming gradient (mean, sum, sum / num_items).

``softcap > 0`` scores ``softcap * tanh(logits / softcap)`` (Gemma 2's final logit
soft-capping) instead of the logits.  Reductions (mean / sum / none), label
smoothing, z-loss and the causal shift are plain PyTorch on the three outputs, so
the graph pass can keep whatever the user's graph computes around them.  The
device implementation is pluggable: the default kernel is the chunked reference;
``inductor_lce.lowering`` registers faster kernels per device with ``register_kernel``, and ops with the
same schemas for the graph pass to emit (``register_device_ops``; ``ops_for`` is the one place that picks them).
"""
from __future__ import annotations

import math

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .reference import lce_backward_reference, lce_forward_reference, lce_fused_reference

_NO_GRAD_BIAS_SHAPE = (0,)


@torch.library.custom_op("inductor_lce::lce_forward", mutates_args=())
def lce_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    check_softcap(softcap)
    return lce_forward_reference(hidden, weight, bias, target, ignore_index, softcap)


def lce_forward_fake(hidden, weight, bias, target, ignore_index, softcap=0.0):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


lce_forward.register_fake(lce_forward_fake)


@torch.library.custom_op("inductor_lce::lce_backward", mutates_args=())
def lce_backward(
    grad_loss: Tensor,
    grad_lse: Optional[Tensor],
    grad_sum_logits: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    lse: Tensor,
    ignore_index: int,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    check_softcap(softcap)
    grad_hidden, grad_weight, grad_bias = lce_backward_reference(
        grad_loss, grad_lse, grad_sum_logits, hidden, weight, bias, target, lse, ignore_index, softcap
    )
    if grad_bias is None:
        grad_bias = weight.new_empty(_NO_GRAD_BIAS_SHAPE)
    return grad_hidden, grad_weight, grad_bias


def lce_backward_fake(grad_loss, grad_lse, grad_sum_logits, hidden, weight, bias, target, lse, ignore_index,
                      softcap=0.0):
    grad_bias = weight.new_empty(_NO_GRAD_BIAS_SHAPE) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


lce_backward.register_fake(lce_backward_fake)


@torch.library.custom_op("inductor_lce::lce_fused", mutates_args=())
def lce_fused(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, grad_scale: Tensor,
    ignore_index: int, softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_softcap(softcap)
    check_grad_scale(grad_scale)
    loss, lse, grad_hidden, grad_weight, grad_bias = lce_fused_reference(
        hidden, weight, bias, target, grad_scale, ignore_index, softcap)
    if grad_bias is None:
        grad_bias = weight.new_empty(_NO_GRAD_BIAS_SHAPE)
    return loss, lse, grad_hidden, grad_weight, grad_bias


def lce_fused_fake(hidden, weight, bias, target, grad_scale, ignore_index, softcap=0.0):
    n = hidden.shape[0]
    grad_bias = weight.new_empty(_NO_GRAD_BIAS_SHAPE) if bias is None else torch.empty_like(bias)
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            torch.empty_like(hidden), torch.empty_like(weight), grad_bias)


lce_fused.register_fake(lce_fused_fake)


def check_grad_scale(grad_scale: Tensor) -> None:
    if grad_scale.dim() != 0 or grad_scale.dtype != torch.float32:
        raise ValueError(f"grad_scale must be a 0-dim float32 tensor, got {grad_scale.dtype} "
                         f"of shape {tuple(grad_scale.shape)}")


def check_softcap(softcap: float) -> None:
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap}")


def register_lce_autograd(forward_op, backward_op) -> None:
    """Autograd of a forward op with lce_forward's schema, through a backward op with
    lce_backward's schema (used for these ops and for the per-device Triton ops)."""

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, ignore_index, softcap = inputs
        _, lse, _ = output
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.ignore_index = ignore_index
        ctx.softcap = softcap
        ctx.has_bias = bias is not None

    def backward(ctx, grad_loss, grad_lse, grad_sum_logits):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        as_fp32 = lambda g: None if g is None else g.float()  # noqa: E731
        grad_hidden, grad_weight, grad_bias = backward_op(
            grad_loss.float(), as_fp32(grad_lse), as_fp32(grad_sum_logits),
            hidden, weight, bias, target, lse, ctx.ignore_index, ctx.softcap,
        )
        return grad_hidden, grad_weight, (grad_bias if ctx.has_bias else None), None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)


register_lce_autograd(lce_forward, lce_backward)


class DeviceOps(NamedTuple):
    """The OpOverloads the graph pass emits for one device type (same schemas and semantics as the reference ops)."""
    forward: "torch._ops.OpOverload"    # lce_forward's schema
    backward: "torch._ops.OpOverload"   # lce_backward's schema
    fused: "torch._ops.OpOverload"      # lce_fused's schema (the three-GEMM algorithm)


_DEVICE_OPS: dict = {}  # device type -> DeviceOps, filled by the lowering (inductor_lce/lowering/__init__.py)


def register_device_ops(device_type: str, forward, backward, fused) -> None:
    """The lowering's ops for tensors on ``device_type`` (e.g. "cuda" with a working Triton)."""
    _DEVICE_OPS[device_type] = DeviceOps(forward, backward, fused)


def ops_for(device_type: str) -> DeviceOps:
    """(forward, backward, fused) OpOverloads the graph pass should emit for tensors on ``device_type``: those a
    lowering registered for it (``inductor_lce::lce_*_triton`` on "cuda" with a working Triton), anything else
    ``inductor_lce::lce_forward`` / ``lce_backward`` / ``lce_fused`` (chunked PyTorch reference)."""
    found = _DEVICE_OPS.get(device_type)
    if found is not None:
        return found
    return DeviceOps(torch.ops.inductor_lce.lce_forward.default, torch.ops.inductor_lce.lce_backward.default,
                     torch.ops.inductor_lce.lce_fused.default)

_REDUCTIONS = ("mean", "sum", "none")


class _ThreeGemmLoss(torch.autograd.Function):
    """mean / sum of the per-token loss, with the gradients computed in the forward (``lce_fused``);
    the backward multiplies them by the incoming gradient, in place (so a second backward through
    the same graph, ``retain_graph=True``, is refused)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, softcap, mean):
        n_valid = (target != ignore_index).sum().float()
        grad_scale = (1.0 / n_valid) if mean else torch.ones((), device=hidden.device)
        loss, _, grad_hidden, grad_weight, grad_bias = lce_fused(
            hidden, weight, bias, target, grad_scale.float(), ignore_index, softcap)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        ctx.used = False
        total = loss.sum()
        return total / n_valid if mean else total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("inductor_lce.linear_cross_entropy: backward through the same graph twice "
                               "(retain_graph=True) is not supported with reduction='mean'/'sum'")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_out.reshape(())
        grads = [g.mul_(scale) for g in (grad_hidden, grad_weight, grad_bias)]
        return grads[0], grads[1], (grads[2] if ctx.has_bias else None), None, None, None, None


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
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(), ...)``
    without materializing the [N, V] logits.

    hidden: [..., D]; weight: [V, D]; labels: integer, either hidden's leading shape [...] or flattened
    like ``F.cross_entropy``'s target ([N], N = the number of hidden rows).
    ``shift=True`` scores hidden position t against ``labels[..., t + 1]`` (the causal
    LM shift; the last position of each sequence is dropped; it needs labels in hidden's leading shape).
    ``label_smoothing`` is ``F.cross_entropy``'s; ``softcap=c`` scores ``c * tanh(logits / c)`` (Gemma 2).
    Returns float32: a scalar for ``mean`` / ``sum``, one value per scored token shaped
    like ``labels`` (or ``labels[..., 1:]`` with ``shift``) for ``none``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    softcap = 0.0 if softcap is None else float(softcap)
    check_softcap(softcap)
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
    n_rows = math.prod(hidden.shape[:-1])
    flat = labels.dim() == 1 and hidden.dim() > 2 and labels.shape[0] == n_rows
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) and not flat:
        if labels.dim() == 1 or tuple(labels.shape[:-1]) == tuple(hidden.shape[:-2]):  # F.cross_entropy's words
            raise ValueError(f"Expected input batch_size ({n_rows}) to match target batch_size ({labels.numel()}).")
        raise ValueError(
            f"Expected labels of shape {tuple(hidden.shape[:-1])} (hidden's leading shape) or ({n_rows},) "
            f"(flattened), got {tuple(labels.shape)}"
        )
    if shift and flat:
        raise ValueError("shift=True needs labels in hidden's leading shape (the sequence dimension), "
                         f"got flattened labels of shape {tuple(labels.shape)}")
    if shift and labels.dim() == 0:
        raise ValueError("shift=True needs labels with a sequence dimension")
    target = shift_targets(labels, ignore_index) if shift else labels
    target = target.reshape(-1).long()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad and reduction != "none" and not label_smoothing:
        # every token gets the same incoming gradient: the three-GEMM algorithm
        return _ThreeGemmLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, target, ignore_index,
                                    softcap, reduction == "mean")
    loss, lse, sum_logits = lce_forward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, target, ignore_index,
                                        softcap)
    if label_smoothing:
        # F.cross_entropy: (1 - eps) * nll + eps / V * (-sum_v log_softmax), 0 on ignored tokens
        num_classes = weight.shape[0]
        smooth = torch.where(target != ignore_index, num_classes * lse - sum_logits, 0.0)
        loss = (1 - label_smoothing) * loss + (label_smoothing / num_classes) * smooth
    if reduction == "none":
        loss = loss.view(labels.shape)
        return loss[..., :-1] if shift else loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum()
