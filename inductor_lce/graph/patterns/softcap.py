"""Final logit soft-capping (Gemma 2): ``c * tanh(x / c)`` on the path from the matmul to the loss.

Forward, in the input dtype (HF Gemma 2) or after ``.float()``::

    t = tanh(div(x, c))          # or tanh(mul(x, 1 / c))
    y = mul(t, c)                # [N, V]

Backward, the mirror image (tanh's derivative from the saved output ``t``, read through
``alias`` / casts; ``tanh_backward`` decomposed or not)::

    g1 = mul(g, c)
    g2 = mul(g1, sub(1, mul(t, t)))        | tanh_backward(g1, t)
    gx = div(g2, c)                        | mul(g2, 1 / c)

The op computes ``c * tanh(z / c)`` in fp32 from the logits rounded like ``F.linear``: one
rounding where eager Gemma 2 in bf16 rounds after each of the three steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch.fx import Node

from .common import NoMatch, aliases, aten, is_op, prims


@dataclass
class Softcap:
    cap: float                                    # c
    scale_in: Node                                # div(x, c) | mul(x, 1 / c)
    tanh: Node
    scale_out: Node                               # mul(t, c)
    saved: list = field(default_factory=list)     # aliases of t the backward reads


def _scalar_operand(node: Node) -> tuple:
    """``(tensor_arg, scalar)`` of a binary op with one Python-number operand, else ``(None, None)``."""
    a, b = node.args[:2]
    if isinstance(b, (int, float)) and isinstance(a, Node):
        return a, float(b)
    if isinstance(a, (int, float)) and isinstance(b, Node) and is_op(node, aten.mul.Tensor):
        return b, float(a)
    return None, None


def _inverse_scale(node: Node) -> Optional[float]:
    """``c`` if ``node`` is ``div(., c)`` or ``mul(., 1 / c)`` (within float rounding), else None."""
    if is_op(node, aten.div.Tensor):
        _, c = _scalar_operand(node)
        return c
    if is_op(node, aten.mul.Tensor):
        _, k = _scalar_operand(node)
        return None if not k else 1.0 / k
    return None


def _same_cap(a: Optional[float], b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-6)


def match_softcap_forward(node: Node) -> Optional[Softcap]:
    """``node`` is ``mul(tanh(x / c), c)``: the Softcap record (``scale_in.args[0]`` is x), else None."""
    if not is_op(node, aten.mul.Tensor):
        return None
    t, cap = _scalar_operand(node)
    if t is None or not is_op(t, aten.tanh.default):
        return None
    scale_in = t.args[0]
    if not isinstance(scale_in, Node) or not (cap > 0 and math.isfinite(cap)):
        return None
    if not _same_cap(_inverse_scale(scale_in), cap):
        raise NoMatch("logits_path_op", "tanh soft-cap with different scales inside and outside")
    x, _ = _scalar_operand(scale_in)
    if x is None or scale_in.args[0] is not x:
        return None
    return Softcap(cap, scale_in, t, node)


def saved_tanh(softcap: Softcap) -> list:
    """Aliases of ``t`` (how the joint graph saves it for tanh's backward)."""
    return aliases(softcap.tanh)[1:]


def _reads_tanh(node: Node, softcap: Softcap) -> list:
    """The nodes from ``node`` up to ``t`` through casts and aliases, or [] if it does not read ``t``."""
    path = []
    while is_op(node, prims.convert_element_type.default, aten.alias.default):
        path.append(node)
        node = node.args[0]
    return path if node is softcap.tanh else []


class SoftcapBackward:
    """Recognises the three backward steps while ``logits.match_logits_grad`` walks down the gradient."""

    def __init__(self, softcap: Softcap):
        self.softcap = softcap
        self.seen = []              # "out", "tanh", "in", in the order met
        self.nodes = []             # extra nodes (the 1 - t * t branch)

    def step(self, node: Node, user: Node) -> bool:
        """Whether ``user`` (the only user of the gradient ``node``) is the next soft-cap backward step."""
        cap = self.softcap.cap
        expected = ("out", "tanh", "in")[len(self.seen)] if len(self.seen) < 3 else None
        if expected == "out" and is_op(user, aten.mul.Tensor):
            g, c = _scalar_operand(user)
            if g is node and _same_cap(c, cap):
                self.seen.append("out")
                return True
        if expected == "tanh":
            if is_op(user, aten.tanh_backward.default) and user.args[0] is node:
                path = _reads_tanh(user.args[1], self.softcap)
                if path:
                    self.nodes += path
                    self.seen.append("tanh")
                    return True
            if is_op(user, aten.mul.Tensor) and node in user.args:
                other = user.args[1] if user.args[0] is node else user.args[0]
                path = self._one_minus_square(other)
                if path:
                    self.nodes += path
                    self.seen.append("tanh")
                    return True
        if expected == "in" and _same_cap(_inverse_scale(user), cap) and user.args[0] is node:
            self.seen.append("in")
            return True
        return False

    def _one_minus_square(self, node: Node) -> list:
        """``sub(1, mul(t, t))`` with t read through casts / aliases: its nodes, or []."""
        if not (is_op(node, aten.sub.Tensor, aten.rsub.Scalar) and len(node.users) == 1):
            return []
        if is_op(node, aten.sub.Tensor):
            one, square = node.args[:2]
        else:
            square, one = node.args[:2]
        if one != 1 or not (is_op(square, aten.mul.Tensor) and square.args[0] is square.args[1]):
            return []
        path = _reads_tanh(square.args[0], self.softcap)
        return [node, square] + path if path else []

    def check_done(self) -> None:
        if self.seen != ["out", "tanh", "in"]:
            raise NoMatch("logits_grad_form", f"soft-cap backward not recognised ({self.seen})")
