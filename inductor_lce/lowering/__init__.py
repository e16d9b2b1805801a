"""Per-device lowerings of the ``inductor_lce`` ops.

CUDA (when Triton imports): three ``torch.library.triton_op``s with exactly the schemas and semantics of
``inductor_lce::lce_forward`` / ``inductor_lce::lce_backward`` / ``inductor_lce::lce_fused``:

    inductor_lce::lce_forward_triton(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, int ignore_index,
        float softcap=0.0) -> (Tensor loss, Tensor lse, Tensor sum_logits)
    inductor_lce::lce_backward_triton(Tensor grad_loss, Tensor? grad_lse, Tensor? grad_sum_logits, Tensor hidden,
        Tensor weight, Tensor? bias, Tensor target, Tensor lse, int ignore_index, float softcap=0.0)
        -> (Tensor, Tensor, Tensor)
    inductor_lce::lce_fused_triton(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor grad_scale,
        int ignore_index, float softcap=0.0) -> (Tensor loss, Tensor lse, Tensor grad_hidden, Tensor grad_weight,
        Tensor grad_bias)

(``softcap > 0``: Gemma 2's logit soft-cap, s = softcap * tanh(logits / softcap); a compile-time flag of the
kernels, so ``softcap=0`` runs the plain kernels.)

Importing this package registers them with ``inductor_lce.ops.register_device_ops("cuda", ...)``, so the graph
pass emits them on CUDA tensors (``inductor_lce.ops.ops_for``: the one place that picks the op per device), and
makes the Triton implementation the CUDA kernel of the eager ops, so ``inductor_lce.linear_cross_entropy`` on CUDA
tensors is fast without ``torch.compile``. The host code is ``lce_triton.py``; the kernels are in ``../kernels``.

How Inductor runs the Triton ops depends on where they enter the graph:
* present while AOTAutograd traces (a user calling ``lce_forward_triton`` under ``torch.compile``): the
  triton_op is decomposed during functionalization and Inductor emits the Triton kernels and the aten
  matmuls in its own output code;
* inserted afterwards (a joint-graph or post-grad pass): the graph is no longer re-traced, so Inductor
  treats the op as an opaque fallback that calls it at run time (same kernels, launched from Python;
  measured: same time and memory as the eager op). ``inline.inline_triton_ops(graph)`` /
  ``inline.InlineTritonOps`` expand such nodes into the kernel calls; correct, but at large V Inductor
  then keeps all grad_logits slabs alive (see inline.py and bench/NOTES.md), so it is opt-in.

Nothing here is required: on a machine without a working Triton, nothing is registered (``ops_for`` returns
the reference ops) and importing this package never fails.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import ops as _ops

AVAILABLE = False
UNAVAILABLE_REASON: Optional[str] = None

try:
    import triton  # noqa: F401

    from . import lce_triton as _impl
    from .lce_triton import SETTINGS, Settings, lce_backward_impl, lce_forward_impl, lce_fused_impl

    AVAILABLE = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
    if not AVAILABLE:
        UNAVAILABLE_REASON = "torch.library.triton_op / wrap_triton missing in this torch"
except Exception as e:  # ImportError, or a broken Triton install
    UNAVAILABLE_REASON = f"{type(e).__name__}: {e}"

try:  # private: turns wrap_triton into a plain launch for eager calls (avoids the HOP dispatch cost)
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - older/newer torch without it: launches still work, slower
    _set_wrap_triton_enabled = None


def _plain_launches():
    return _set_wrap_triton_enabled(False) if _set_wrap_triton_enabled else contextlib.nullcontext()


if AVAILABLE:

    @torch.library.triton_op("inductor_lce::lce_forward_triton", mutates_args=())
    def lce_forward_triton(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
        softcap: float = 0.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return lce_forward_impl(hidden, weight, bias, target, ignore_index, softcap)

    @torch.library.triton_op("inductor_lce::lce_backward_triton", mutates_args=())
    def lce_backward_triton(
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
        return lce_backward_impl(grad_loss, grad_lse, grad_sum_logits, hidden, weight, bias, target, lse,
                                 ignore_index, softcap)

    @torch.library.triton_op("inductor_lce::lce_fused_triton", mutates_args=())
    def lce_fused_triton(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, grad_scale: Tensor,
        ignore_index: int, softcap: float = 0.0,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return lce_fused_impl(hidden, weight, bias, target, grad_scale, ignore_index, softcap)

    _ops.register_lce_autograd(lce_forward_triton, lce_backward_triton)
    _ops.register_device_ops("cuda", torch.ops.inductor_lce.lce_forward_triton.default,
                             torch.ops.inductor_lce.lce_backward_triton.default,
                             torch.ops.inductor_lce.lce_fused_triton.default)

    # The eager ops' CUDA kernels: the same implementation, launched directly.
    @_ops.lce_forward.register_kernel("cuda")
    def _lce_forward_cuda(hidden, weight, bias, target, ignore_index, softcap=0.0):
        with _plain_launches():
            return lce_forward_impl(hidden, weight, bias, target, ignore_index, softcap)

    @_ops.lce_backward.register_kernel("cuda")
    def _lce_backward_cuda(grad_loss, grad_lse, grad_sum_logits, hidden, weight, bias, target, lse, ignore_index,
                           softcap=0.0):
        with _plain_launches():
            return lce_backward_impl(grad_loss, grad_lse, grad_sum_logits, hidden, weight, bias, target, lse,
                                     ignore_index, softcap)

    @_ops.lce_fused.register_kernel("cuda")
    def _lce_fused_cuda(hidden, weight, bias, target, grad_scale, ignore_index, softcap=0.0):
        with _plain_launches():
            return lce_fused_impl(hidden, weight, bias, target, grad_scale, ignore_index, softcap)


__all__ = ["AVAILABLE", "UNAVAILABLE_REASON"] + (
    ["SETTINGS", "Settings", "lce_forward_triton", "lce_backward_triton", "lce_fused_triton"] if AVAILABLE else []
)
