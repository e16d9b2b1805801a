"""Helpers shared by the matchers: op tests on FX nodes."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims


class NoMatch(Exception):
    """A matcher did not match; ``reason`` is a short snake_case counter key, ``node`` (optional) where it stopped."""

    def __init__(self, reason: str, detail: str = "", node: Any = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.node = node


def is_op(node: Any, *targets) -> bool:
    """Whether ``node`` is a call of one of ``targets`` (OpOverloads or OpOverloadPackets)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    for t in targets:
        if node.target is t:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket) and getattr(node.target, "overloadpacket", None) is t:
            return True
    return False


def val(node: Any):
    """The fake value of a node (``meta['val']``), or the constant itself."""
    return node.meta.get("val") if isinstance(node, Node) else node


def shape(node: Node) -> tuple:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def dtype(node: Node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def arg(node: Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_scalar_value(node: Any, value: float) -> bool:
    """A literal, ``scalar_tensor(value)`` or ``full([], value)``."""
    if isinstance(node, (int, float, bool)):
        return node == value
    if is_op(node, aten.scalar_tensor.default):
        return node.args[0] == value
    if is_op(node, aten.full.default):
        return list(node.args[0]) == [] and node.args[1] == value
    return False


def is_zeros(node: Any) -> bool:
    """``full(shape, 0)`` / ``zeros(shape)`` / ``new_zeros``."""
    if is_op(node, aten.full.default):
        return node.args[1] == 0
    if is_op(node, aten.zeros.default, aten.new_zeros.default):
        return True
    return False


def aliases(node: Node) -> list:
    """``node`` and every ``alias`` chained from it (how the joint graph saves a value)."""
    out, frontier = [node], [node]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if is_op(u, aten.alias.default):
                out.append(u)
                frontier.append(u)
    return out


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def same_size(a, b) -> bool:
    """Sizes equal by value (ints) or by symbolic expression (SymInts), without adding guards."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.node.expr == b.node.expr


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))
