"""``logsumexp`` of the scored logits next to the cross-entropy: the z-loss (PaLM, OLMo:
``coeff * logsumexp(logits, -1) ** 2`` added to the loss).  The op's ``lse`` output is that
value, and its ``grad_lse`` input takes the gradient, so the z-loss costs nothing extra.

Forward, as ``torch.logsumexp(x, -1)`` decomposes (``x`` a node of the logits path)::

    m   = amax(x, [-1], True)
    m   = where(abs(m) == inf, 0, m)
    lse = add(log(sum(exp(x - m), [-1])), squeeze(m, [-1]))       # [..] (keepdim: no squeeze)

or a single ``aten.logsumexp(x, [-1])``.  Backward, with ``g`` the gradient of ``lse``
(``lse`` read back through aliases)::

    term = mul(unsqueeze(g, -1), exp(sub(x, unsqueeze(lse, -1))))  # [.., V], added into x's gradient
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch.fx import Node

from .common import NoMatch, aten, is_op, is_scalar_value, normalize_dim, shape


@dataclass
class LogSumExp:
    input: Node                                   # x: a node of the logits path [.., V]
    output: Node                                  # lse: [..] (or [.., 1] with keepdim)
    keepdim: bool
    nodes: list = field(default_factory=list)     # forward nodes, lse excluded
    grad: Optional[Node] = None                   # g: gradient of lse (joint graphs)
    grad_term: Optional[Node] = None              # the [.., V] term added into x's gradient
    grad_nodes: list = field(default_factory=list)


def _last_dim(dims, ndim: int) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return len(dims) == 1 and normalize_dim(dims[0], ndim) == ndim - 1


def _single_user(node: Node, *targets) -> Optional[Node]:
    users = list(node.users)
    if len(users) == 1 and is_op(users[0], *targets):
        return users[0]
    return None


def match_logsumexp(x: Node, amax: Node) -> LogSumExp:
    """``amax`` (a user of ``x``) starts a logsumexp over the classes; raise NoMatch if it does not."""
    ndim = len(shape(x))
    if is_op(amax, aten.logsumexp.default):
        if amax.args[0] is not x or not _last_dim(amax.args[1], ndim):
            raise NoMatch("logits_other_users", "logsumexp over another dim")
        keepdim = bool(amax.args[2]) if len(amax.args) > 2 else bool(amax.kwargs.get("keepdim", False))
        return LogSumExp(x, amax, keepdim, [])
    if not (is_op(amax, aten.amax.default) and amax.args[0] is x and _last_dim(amax.args[1], ndim)
            and len(amax.args) > 2 and amax.args[2]):
        raise NoMatch("logits_other_users", f"{x.name} is read by {amax.name}")
    fail = NoMatch("logits_other_users", f"{amax.name} does not start a logsumexp")
    # where(abs(m) == inf, 0, m)
    guard = [u for u in amax.users if is_op(u, aten.where.self)]
    abs_ = [u for u in amax.users if is_op(u, aten.abs.default)]
    if len(guard) != 1 or len(abs_) != 1 or len(amax.users) != 2:
        raise fail
    guard, abs_ = guard[0], abs_[0]
    eq = _single_user(abs_, aten.eq.Scalar)
    if eq is None or eq.args[1] != float("inf") or guard.args[0] is not eq \
            or not is_scalar_value(guard.args[1], 0) or guard.args[2] is not amax:
        raise fail
    nodes = [amax, abs_, eq, guard]
    subs = [u for u in guard.users if is_op(u, aten.sub.Tensor) and u.args == (x, guard)]
    squeezes = [u for u in guard.users if is_op(u, aten.squeeze.dims, aten.squeeze.dim)]
    if len(subs) != 1:
        raise fail
    sub = subs[0]
    exp = _single_user(sub, aten.exp.default)
    total = exp and _single_user(exp, aten.sum.dim_IntList)
    log = total and _single_user(total, aten.log.default)
    add = log and _single_user(log, aten.add.Tensor)
    if add is None or not _last_dim(total.args[1], ndim):
        raise fail
    keepdim = len(total.args) > 2 and bool(total.args[2])
    m_out = guard if keepdim else (squeezes[0] if len(squeezes) == 1 else None)
    if m_out is None or set(add.args[:2]) != {log, m_out} or len(guard.users) != (1 if keepdim else 2):
        raise fail
    nodes += [sub, exp, total, log] + ([] if keepdim else [m_out])
    return LogSumExp(x, add, keepdim, nodes)


def _reads_lse(node: Node, lse: LogSumExp) -> list:
    """``node`` is lse (keepdim) or unsqueeze(lse, -1), lse read through aliases: the path, else []."""
    path = []
    if not lse.keepdim:
        if not (is_op(node, aten.unsqueeze.default) and node.args[1] in (-1, len(shape(node)) - 1)):
            return []
        path.append(node)
        node = node.args[0]
    while is_op(node, aten.alias.default):
        path.append(node)
        node = node.args[0]
    return path if node is lse.output else []


def match_logsumexp_backward(lse: LogSumExp) -> None:
    """Find ``lse``'s backward term among the users of its input; fills ``grad`` / ``grad_term``."""
    x = lse.input
    if is_op(lse.output, aten.logsumexp.default):
        found = [u for u in x.users if is_op(u, aten.logsumexp_backward.default)] \
            if hasattr(aten, "logsumexp_backward") else []
        if found:
            raise NoMatch("logits_grad_form", "undecomposed logsumexp backward")
    for sub in x.users:
        if not (is_op(sub, aten.sub.Tensor) and sub.args[0] is x):
            continue
        path = _reads_lse(sub.args[1], lse)
        if not path:
            continue
        exp = _single_user(sub, aten.exp.default)
        mul = exp and _single_user(exp, aten.mul.Tensor)
        if mul is None:
            raise NoMatch("logits_grad_form", "logsumexp backward form")
        g = mul.args[1] if mul.args[0] is exp else mul.args[0]
        # the aliases of lse stay: they die with their last reader (lse itself is replaced)
        nodes = [sub, exp, mul] + [n for n in path if not is_op(n, aten.alias.default)]
        if not lse.keepdim:
            if not (is_op(g, aten.unsqueeze.default) and g.args[1] in (-1, len(shape(g)) - 1) and len(g.users) == 1):
                raise NoMatch("logits_grad_form", "logsumexp backward form")
            nodes.append(g)
            g = g.args[0]
        if lse.grad_term is not None:
            raise NoMatch("logits_grad_form", "two backward uses of one logsumexp")
        lse.grad, lse.grad_term, lse.grad_nodes = g, mul, nodes
