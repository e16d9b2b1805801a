"""Whether every scored token gets the same incoming gradient, and its forward factor.

The nll backward reads ``grad_tok = where(valid, X, 0)`` (``patterns/nll.py``). For the usual
reductions X is one scalar times the gradient of the reduced loss ``T`` (a 0-dim tangent)::

    mean:                  X = T / n_valid                      # div(tangents_1, convert(sum(ne(y, ii))))
    sum:                   X = T                                # tangents_1 (expanded)
    sum / num_items:       X = T / num_items                    # HF, torchtune
    none, then .mean():    X = expand(T, [N]) / N
    anything * c:          X = (T * c) / n_valid

i.e. X is built from ``T`` by views / expands / dtype casts / negation and multiplication or division
(as the numerator) by literals or 0-dim values the forward computes. Then X = T * X(T=1) exactly in
real arithmetic, and with T = 1 (``loss.backward()``) in floating point too. The three-GEMM algorithm
computes the gradients in the forward with ``grad_scale = X(T=1)`` and the backward multiplies them by
``T``. Per-token weights (``(loss_tok * w).sum()``) make X a tensor of different values: no match.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from .common import NoMatch, aten, is_op, prims, shape

_SHAPE_OPS = (aten.expand.default, aten.unsqueeze.default, aten.view.default, aten.reshape.default,
              aten._unsafe_view.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
              aten.clone.default, aten.alias.default)
_SCALE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)


@dataclass
class UniformGrad:
    tangent: Node                                 # T: the 0-dim gradient of the reduced loss
    value: Node                                   # X: what every scored token's loss receives
    factors: list = field(default_factory=list)   # 0-dim forward nodes X(T=1) multiplies or divides by


def is_tangent(node) -> bool:
    return isinstance(node, Node) and node.op == "placeholder" and node.name.startswith("tangents")


def _depends_on_tangent(node: Node, seen: Optional[dict] = None) -> bool:
    seen = {} if seen is None else seen
    if node in seen:
        return seen[node]
    seen[node] = False
    result = is_tangent(node) or any(_depends_on_tangent(a, seen) for a in node.all_input_nodes)
    seen[node] = result
    return result


def _forward_scalar(node) -> bool:
    """A literal, or a 0-dim value computed without any tangent (the forward can compute it)."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return True
    return isinstance(node, Node) and shape(node) == () and not _depends_on_tangent(node)


def match_uniform_grad(value: Node) -> UniformGrad:
    """``value`` (X above) -> its tangent and forward factors, or NoMatch('per_token_grad')."""
    factors, node = [], value
    while not is_tangent(node):
        if not isinstance(node, Node):
            raise NoMatch("per_token_grad", "the per-token gradient is a constant")
        if is_op(node, *_SHAPE_OPS) or is_op(node, prims.convert_element_type.default, aten.neg.default):
            node = node.args[0]
            continue
        if is_op(node, *_SCALE_OPS):
            a, b = node.args[:2]
            if isinstance(a, Node) and _depends_on_tangent(a) and _forward_scalar(b):
                factors.append(b)
                node = a
                continue
            if is_op(node, aten.mul.Tensor, aten.mul.Scalar) and isinstance(b, Node) and _depends_on_tangent(b) \
                    and _forward_scalar(a):
                factors.append(a)
                node = b
                continue
        raise NoMatch("per_token_grad", f"tokens get different incoming gradients ({node.name})")
    if shape(node) != ():
        raise NoMatch("per_token_grad", f"{node.name} is not a 0-dim loss gradient")
    return UniformGrad(node, value, [f for f in factors if isinstance(f, Node)])


def unit_tangent_value(emit, anchor: Node, grad: UniformGrad) -> Node:
    """Emit X(T=1) as a 0-dim fp32 node before ``anchor``: the chain from X to T replayed on a 1."""
    chain, node = [], grad.value
    while node is not grad.tangent:
        chain.append(node)
        node = node.args[0] if not is_op(node, *_SCALE_OPS) or _depends_on_tangent(node.args[0]) \
            else node.args[1]
    out = emit(anchor, aten.full.default, [], 1.0, dtype=grad.tangent.meta["val"].dtype,
               device=grad.tangent.meta["val"].device)
    for step in reversed(chain):
        if is_op(step, *_SHAPE_OPS):
            continue                                  # every element is the same: keep the scalar
        if is_op(step, prims.convert_element_type.default):
            out = emit(anchor, prims.convert_element_type.default, out, step.args[1])
        elif is_op(step, aten.neg.default):
            out = emit(anchor, aten.neg.default, out)
        else:
            a, b = step.args[:2]
            tangent_first = isinstance(a, Node) and _depends_on_tangent(a)
            args = (out, b) if tangent_first else (a, out)
            out = emit(anchor, step.target, *args)
    if out.meta["val"].dtype != torch.float32:
        out = emit(anchor, prims.convert_element_type.default, out, torch.float32)
    return out
