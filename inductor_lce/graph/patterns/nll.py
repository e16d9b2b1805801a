"""Negative log-likelihood with ``ignore_index``: the per-token loss before reduction.

Forward, as ``nll_loss`` decomposes (``valid = target != ignore_index``)::

    picked   = gather(lsm, 1, where(valid, target, 0).unsqueeze(1)).squeeze(1)   # [N]
    loss_tok = where(valid, -picked, 0)                                            # [N]

whatever reduction follows (``sum``, ``sum / count``, nothing) is left to the graph.
Backward, with ``grad_tok`` the per-token incoming gradient::

    grad_lsm = scatter(zeros[N, V], 1, where(valid, target, 0).unsqueeze(1), -1.0)
               * where(valid, grad_tok, 0)                                          # [N, V]

Class weights and label smoothing add nodes to both and are not this pattern.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from .common import NoMatch, aten, is_op, is_scalar_value, is_zeros, same_shape, shape


@dataclass
class NllForward:
    target: Node                                  # [N] int64 labels (in log-softmax row order)
    ignore_index: object                          # int, or a Node holding a SymInt
    loss_tok: Node                                # [N] fp32 per-token loss, 0 where ignored
    nodes: list = field(default_factory=list)     # gather .. neg (not loss_tok)


@dataclass
class NllBackward:
    grad_tok: Node                                # [N, 1] fp32, already 0 where ignored
    grad_lsm: Node                                # [N, V]
    nodes: list = field(default_factory=list)


def _same_index(a, b) -> bool:
    return a is b if isinstance(a, Node) or isinstance(b, Node) else a == b


def _unsqueezed(node: Node) -> Optional[Node]:
    if is_op(node, aten.unsqueeze.default) and node.args[1] in (1, -1):
        return node.args[0]
    return None


def valid_mask(node: Node, target: Optional[Node] = None):
    """``node`` is ``ne(t, ignore_index)`` with t the target or ``target.unsqueeze(1)``.
    Returns ``(target, ignore_index)`` or None."""
    if not is_op(node, aten.ne.Scalar):
        return None
    t, ignore_index = node.args
    # an int, or a SymInt graph input when dynamic=True makes the caller's ignore_index symbolic
    if not (isinstance(ignore_index, int) or (isinstance(ignore_index, Node) and isinstance(
            ignore_index.meta.get("val"), torch.SymInt))):
        return None
    base = _unsqueezed(t) or t
    if target is not None and base is not target:
        return None
    return base, ignore_index


def _safe_index(node: Node):
    """``where(ne(t, ii), t, 0)`` -> (target, ignore_index, t, nodes)."""
    if not is_op(node, aten.where.self):
        return None
    cond, t, zero = node.args
    m = valid_mask(cond)
    if m is None or not is_scalar_value(zero, 0):
        return None
    target, ignore_index = m
    if (_unsqueezed(t) or t) is not target:
        return None
    return target, ignore_index, t


def match_nll_forward(gather: Node, lsm: Node) -> NllForward:
    if not (is_op(gather, aten.gather.default) and gather.args[0] is lsm and gather.args[1] in (1, -1)):
        raise NoMatch("nll_form")
    index = gather.args[2]
    inner = _unsqueezed(index)
    safe = _safe_index(inner) if inner is not None else None
    if safe is None:
        raise NoMatch("nll_form", "gather index is not where(target != ignore_index, target, 0)")
    target, ignore_index, _ = safe
    if len(shape(target)) != 1:
        raise NoMatch("nll_form")
    users = list(gather.users)
    if len(users) != 1:
        raise NoMatch("log_softmax_other_users")
    squeeze = users[0]
    if not (is_op(squeeze, aten.squeeze.dim, aten.squeeze.dims, aten.view.default, aten.reshape.default)
            and same_shape(shape(squeeze), shape(target))):
        raise NoMatch("nll_form")
    if len(squeeze.users) != 1 or not is_op(next(iter(squeeze.users)), aten.neg.default):
        raise NoMatch("nll_form")
    neg = next(iter(squeeze.users))
    if len(neg.users) != 1:
        raise NoMatch("nll_form")
    loss_tok = next(iter(neg.users))
    if not (is_op(loss_tok, aten.where.self) and loss_tok.args[1] is neg and is_scalar_value(loss_tok.args[2], 0)):
        raise NoMatch("nll_form", "class weights or unmasked loss")
    m = valid_mask(loss_tok.args[0], target)
    if m is None or not _same_index(m[1], ignore_index):
        raise NoMatch("nll_form")
    return NllForward(target, ignore_index, loss_tok, [gather, squeeze, neg])


def match_nll_backward(grad_lsm: Node, fwd: NllForward) -> NllBackward:
    if not is_op(grad_lsm, aten.mul.Tensor):
        raise NoMatch("nll_backward_form")
    a, b = grad_lsm.args
    scatter, grad_tok = (a, b) if is_op(a, aten.scatter.value) else (b, a)
    if not (is_op(scatter, aten.scatter.value) and scatter.args[1] in (1, -1) and scatter.args[3] == -1.0
            and is_zeros(scatter.args[0]) and len(scatter.users) == 1):
        raise NoMatch("nll_backward_form")
    safe = _safe_index(scatter.args[2])
    if safe is None or safe[0] is not fwd.target or not _same_index(safe[1], fwd.ignore_index):
        raise NoMatch("nll_backward_form")
    # grad_tok must be masked by the same condition, so ignored rows get no gradient.
    if not (is_op(grad_tok, aten.where.self) and is_scalar_value(grad_tok.args[2], 0)):
        raise NoMatch("nll_backward_form", "per-token gradient is not masked")
    m = valid_mask(grad_tok.args[0], fwd.target)
    if m is None or not _same_index(m[1], fwd.ignore_index) or not same_shape(shape(grad_tok), (shape(fwd.target)[0], 1)):
        raise NoMatch("nll_backward_form")
    return NllBackward(grad_tok, grad_lsm, [scatter.args[0], scatter, grad_lsm])
