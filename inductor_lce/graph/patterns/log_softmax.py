"""Log-softmax over the class dimension, as AOTAutograd hands it to Inductor.

Forward, decomposed (what ``F.cross_entropy`` / ``F.log_softmax`` become)::

    shifted = x - amax(x, [1], keepdim=True)
    lsm     = shifted - log(sum(exp(shifted), [1], keepdim=True))

or a single ``aten._log_softmax(x, 1, False)``.  Backward, with ``grad`` the gradient
of ``lsm`` (aliases of ``lsm`` are how the joint graph saves it)::

    grad_x = grad - exp(lsm) * sum(grad, [1], keepdim=True)

or ``aten._log_softmax_backward_data(grad, lsm, 1, float32)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .common import NoMatch, aliases, aten, dtype, is_op, normalize_dim, prims, shape


@dataclass
class LogSoftmax:
    input: Node                                   # x: [N, V] fp32 logits
    output: Node                                  # lsm: [N, V]
    nodes: list = field(default_factory=list)     # every node of the forward computation


@dataclass
class LogSoftmaxBackward:
    grad_output: Node                             # gradient of lsm: [N, V]
    grad_input: Node                              # gradient of x:   [N, V]
    nodes: list = field(default_factory=list)     # aliases of lsm, exp, sum, mul, sub


def _is_class_dim(dims, ndim: int) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return len(dims) == 1 and normalize_dim(dims[0], ndim) == ndim - 1


def match_log_softmax(node: Node) -> LogSoftmax:
    """``node`` is the log-softmax output; classes on the last dim (2-D, or [B, T, V] when the
    user calls log_softmax before flattening)."""
    if is_op(node, aten._log_softmax.default):
        x, dim, half_to_float = node.args
        if len(shape(x)) < 2 or not _is_class_dim(dim, len(shape(x))) or half_to_float:
            raise NoMatch("log_softmax_layout")
        return LogSoftmax(x, node, [node])
    if not is_op(node, aten.sub.Tensor):
        raise NoMatch("not_log_softmax")
    shifted, log = node.args
    if not (is_op(log, aten.log.default) and is_op(shifted, aten.sub.Tensor)):
        raise NoMatch("not_log_softmax")
    total = log.args[0]
    if not (is_op(total, aten.sum.dim_IntList) and len(total.args) >= 3 and total.args[2]):
        raise NoMatch("not_log_softmax")
    exp = total.args[0]
    if not (is_op(exp, aten.exp.default) and exp.args[0] is shifted):
        raise NoMatch("not_log_softmax")
    x, amax = shifted.args
    if not (is_op(amax, aten.amax.default) and amax.args[0] is x):
        raise NoMatch("not_log_softmax")
    ndim = len(shape(x))
    if ndim < 2 or not (_is_class_dim(amax.args[1], ndim) and _is_class_dim(total.args[1], ndim)):
        raise NoMatch("log_softmax_layout")
    if len(amax.args) < 3 or not amax.args[2]:
        raise NoMatch("not_log_softmax")
    return LogSoftmax(x, node, [amax, shifted, exp, total, log, node])


def is_log_softmax(node: Node) -> bool:
    try:
        match_log_softmax(node)
        return True
    except NoMatch:
        return False


def match_log_softmax_backward(lsm: LogSoftmax, saved=None) -> list:
    """Every backward of ``lsm`` found among the users of its aliases.

    ``saved``: what the joint graph saves instead of ``lsm`` itself, when the log-probs are
    cast to bf16 / fp16 before the loss (the backward reads ``exp(float(alias(cast)))``)."""
    found = []
    for a in aliases(lsm.output):
        for u in a.users:
            if is_op(u, aten._log_softmax_backward_data.default):
                if u.args[1] is a and _is_class_dim(u.args[2], len(shape(a))):
                    found.append(LogSoftmaxBackward(u.args[0], u, [u]))
            elif is_op(u, aten.exp.default) and a is not lsm.output:
                found.append(_match_decomposed_backward(u))
    if saved is not None:
        for a in aliases(saved)[1:]:
            for u in a.users:
                exp = next(iter(u.users)) if len(u.users) == 1 else None
                if is_op(u, prims.convert_element_type.default) and u.args[1] == torch.float32 \
                        and is_op(exp, aten.exp.default):
                    bwd = _match_decomposed_backward(exp)
                    bwd.nodes.append(u)
                    found.append(bwd)
    return found


def _match_decomposed_backward(exp: Node) -> LogSoftmaxBackward:
    (mul,) = list(exp.users) if len(exp.users) == 1 else (None,)
    if not is_op(mul, aten.mul.Tensor):
        raise NoMatch("log_softmax_backward_form")
    total = mul.args[1] if mul.args[0] is exp else mul.args[0]
    if not (is_op(total, aten.sum.dim_IntList) and _is_class_dim(total.args[1], len(shape(mul))) and total.args[2]):
        raise NoMatch("log_softmax_backward_form")
    grad = total.args[0]
    subs = [u for u in mul.users if is_op(u, aten.sub.Tensor) and u.args == (grad, mul)]
    if len(subs) != 1 or len(mul.users) != 1:
        raise NoMatch("log_softmax_backward_form")
    if dtype(grad) != torch.float32:
        raise NoMatch("log_softmax_backward_form")
    return LogSoftmaxBackward(grad, subs[0], [exp, total, mul, subs[0]])
