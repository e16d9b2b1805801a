"""Label smoothing: the sum of the log-probs over the classes, next to the NLL.

``F.cross_entropy(..., label_smoothing=eps)`` adds ``eps / V * sum_n -sum_v lsm[n, v]`` (masked
and reduced like the NLL) to ``(1 - eps) * nll``. The part the pass replaces is the class sum
itself::

    class_sum = sum(lsm, [-1])                          # [N]: equals sum_logits - V * lse

which the op gives from its ``lse`` and ``sum_logits`` outputs; masking, ``neg``, the scaling
by ``eps / V`` and the reduction stay in the graph as the user's code computed them.
Backward, with ``g`` the gradient of ``class_sum``, a broadcast added to the NLL's gradient::

    grad_lsm = add(expand(unsqueeze(g, -1), [N, V]), <NLL backward>)
      -> the op's grad_sum_logits += g, grad_lse += -V * g
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch.fx import Node

from .common import NoMatch, aten, is_op, normalize_dim, same_shape, shape


@dataclass
class ClassSum:
    output: Node                                  # sum(lsm, [-1]): [N]
    grad: Optional[Node] = None                   # g: [N] gradient of output (joint graphs)
    grad_nodes: list = field(default_factory=list)


def match_class_sum(node: Node, log_probs: Node) -> Optional[ClassSum]:
    """``node`` = ``sum(log_probs, [-1])`` (no keepdim): the record, else None."""
    if not (is_op(node, aten.sum.dim_IntList) and node.args[0] is log_probs):
        return None
    dims = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    ndim = len(shape(log_probs))
    keepdim = len(node.args) > 2 and node.args[2] or node.kwargs.get("keepdim", False)
    if len(dims) != 1 or normalize_dim(dims[0], ndim) != ndim - 1 or keepdim or node.kwargs.get("dtype"):
        return None
    return ClassSum(node)


def split_class_sum_grad(grad_lsm: Node, class_sum: ClassSum, target: Node) -> Node:
    """``grad_lsm`` = ``add(broadcast of g, rest)``: fills ``class_sum.grad`` and returns ``rest``.
    ``target``: the labels, whose row count g may be expressed in (dynamic shapes can give the
    labels and the logits separate, equal, symbols)."""
    if not is_op(grad_lsm, aten.add.Tensor):
        raise NoMatch("label_smoothing", "the class sum's gradient is not added to the NLL's")
    for term, rest in (grad_lsm.args[:2], reversed(grad_lsm.args[:2])):
        g = _broadcast_source(term, grad_lsm, target)
        if g is not None and len(term.users) == 1:
            class_sum.grad, class_sum.grad_nodes = g, [grad_lsm, term, term.args[0]]
            return rest
    raise NoMatch("label_smoothing", "the class sum's gradient is not a broadcast")


def _broadcast_source(term, grad_lsm: Node, target: Node) -> Optional[Node]:
    """``expand(unsqueeze(g, -1), shape)`` with g [N]: g, else None."""
    if not (is_op(term, aten.expand.default) and same_shape(shape(term), shape(grad_lsm))):
        return None
    inner = term.args[0]
    if not (is_op(inner, aten.unsqueeze.default) and inner.args[1] in (-1, len(shape(grad_lsm)) - 1)
            and len(inner.users) == 1):
        return None
    g = inner.args[0]
    rows = shape(g)
    return g if same_shape(rows, shape(grad_lsm)[:-1]) or same_shape(rows, shape(target)) else None
