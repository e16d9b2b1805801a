"""From the lm-head matmul to the fp32 logits the loss reads, and back.

Forward (``V`` stays the last dim all the way; any number of these, in any order)::

    mm(hidden2d, permute(weight, [1, 0]))  |  addmm(bias, hidden2d, permute(weight, [1, 0]))   # [N, V]
      -> view / reshape / _unsafe_view / clone / alias          (F.linear on [B, T, D], .view(-1, V))
      -> convert_element_type(float32)                           (.float())
      -> slice(dim < last)                                       (logits[..., :-1, :], the causal shift)
      -> mul(tanh(div(x, c)), c)                                 (soft-capping, at most once: softcap.py)
      -> logits: [N', V] fp32

Backward, the mirror image from ``grad_logits`` to the gradient of the matmul output::

    grad_logits -> view / convert_element_type / clone
                -> add(., grad of a logsumexp of these logits)             (z-loss: logsumexp.py)
                -> the soft-cap backward (softcap.py)
                -> slice_scatter(zeros, ., dim, start, end, step) | slice_backward   (one per forward slice)
                -> grad_mm: [N, V]
    grad_hidden2d = mm(grad_mm, permute(permute(weight)))       # [N, D]
    grad_weight   = mm(permute(grad_mm), hidden2d)              # [V, D]  (or its transpose)
    grad_bias     = sum(grad_mm, [0])                           # [V]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from .common import NoMatch, aten, dtype, is_op, is_zeros, normalize_dim, only_user, prims, same_shape, same_size, shape
from .softcap import Softcap, SoftcapBackward, match_softcap_forward

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_COPIES = (aten.clone.default, aten.alias.default)
_SLICE_END_MAX = 2**63 - 1


@dataclass
class Slice:
    dim: int                 # non-negative, a leading dim
    start: int
    end: int
    step: int
    input_shape: tuple       # shape sliced


@dataclass
class LogitsChain:
    matmul: Node                                  # mm / addmm producing [N, V]
    hidden: Node                                  # [N, D]
    weight_t: Node                                # permute(weight): [D, V]
    weight: Node                                  # [V, D]
    bias: Optional[Node]                          # [V] or None
    logits: Node                                  # [N', V] fp32, what log-softmax reads
    nodes: list = field(default_factory=list)     # matmul .. logits, in order
    slices: list = field(default_factory=list)    # forward slices, in order
    upcast: bool = False                          # a .float() sits on the path
    softcap: Optional[Softcap] = None             # c * tanh(x / c) on the path

    def scored(self, node: Node) -> bool:
        """Whether ``node`` (on the path) holds the values the loss scores: fp32 and after the soft-cap."""
        if dtype(node) != torch.float32:
            return False
        return self.softcap is None or self.nodes.index(node) >= self.nodes.index(self.softcap.scale_out)


@dataclass
class LogitsGrad:
    grad_mm: Node                                 # [N, V]: gradient of the matmul output
    grad_hidden: Optional[Node]                   # mm node giving [N, D]
    grad_weight: Optional[Node]                   # mm node giving [V, D] or [D, V]
    grad_weight_transposed: bool
    grad_bias: Optional[Node]                     # sum node
    nodes: list = field(default_factory=list)     # grad_logits .. grad_mm and permutes of it


def _slice_args(node: Node, ndim: int) -> Slice:
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    dim = normalize_dim(0 if dim is None else dim, ndim)
    start = 0 if start is None else start
    end = _SLICE_END_MAX if end is None else end
    step = 1 if step is None else step
    return Slice(dim, start, end, step, shape(node.args[0]))


def _is_transpose(node: Node) -> bool:
    if is_op(node, aten.permute.default):
        return list(node.args[1]) == [1, 0]
    return is_op(node, aten.t.default)


def match_logits_chain(logits: Node) -> LogitsChain:
    """Walk up from the log-softmax input to the matmul."""
    num_classes = shape(logits)[-1]
    nodes, slices, upcast, softcap = [logits], [], False, None
    node = logits
    while True:
        if is_op(node, aten.mm.default, aten.addmm.default):
            break
        if isinstance(node, Node) and node.op == "placeholder":   # computed in an earlier graph
            raise NoMatch("logits_input", "the logits are an input of the graph", node=node)
        if not isinstance(node, Node) or node.op != "call_function":
            raise NoMatch("no_matmul", "logits do not come from a matmul")
        found = match_softcap_forward(node)
        if found is not None:
            if softcap is not None:
                raise NoMatch("logits_path_op", "two soft-caps")
            softcap = found
            nodes += [found.tanh, found.scale_in]
            node = found.scale_in
        elif is_op(node, *_VIEWS, *_COPIES):
            pass
        elif is_op(node, prims.convert_element_type.default):
            if node.args[1] != torch.float32:
                raise NoMatch("logits_path_op", f"cast to {node.args[1]}")
            upcast = upcast or dtype(node.args[0]) != torch.float32
        elif is_op(node, aten.slice.Tensor):
            s = _slice_args(node, len(shape(node.args[0])))
            if s.dim == len(s.input_shape) - 1:
                if not same_shape(shape(node), s.input_shape):
                    raise NoMatch("logits_path_op", "slice over the classes")
                # logits[..., :] kept as a no-op slice under dynamic shapes
            else:
                slices.append(s)
        else:
            raise NoMatch("logits_path_op", str(node.target), node=node)
        node = node.args[0]
        if not isinstance(node, Node) or not shape(node) or not same_size(shape(node)[-1], num_classes):
            raise NoMatch("logits_path_op", "class dimension changes")
        nodes.append(node)
    matmul = node
    if is_op(matmul, aten.addmm.default):
        bias, hidden, weight_t = matmul.args[:3]
        if matmul.kwargs.get("beta", 1) != 1 or matmul.kwargs.get("alpha", 1) != 1 \
                or not same_shape(shape(bias), (num_classes,)):
            raise NoMatch("matmul_form", "addmm with scaling or broadcast bias")
    else:
        bias, (hidden, weight_t) = None, matmul.args
    if not _is_transpose(weight_t):
        raise NoMatch("matmul_form", "weight is not a transposed [V, D] matrix")
    weight = weight_t.args[0]
    if len(shape(weight)) != 2 or len(shape(hidden)) != 2:
        raise NoMatch("matmul_form")
    if dtype(logits) != torch.float32:
        raise NoMatch("not_fp32", "the loss reads low-precision logits (no .float())")
    nodes.reverse()
    slices.reverse()
    return LogitsChain(matmul, hidden, weight_t, weight, bias, logits, nodes, slices, upcast, softcap)


def match_logits_grad(grad_logits: Node, chain: LogitsChain, extra_terms=()) -> LogitsGrad:
    """Walk down from the gradient of the logits to the gradients of the matmul inputs.

    ``extra_terms``: [., V] gradient terms from other readers of the logits (a logsumexp) that
    autograd adds into this path; each must be added exactly once."""
    nodes, slices = [grad_logits], []
    node = grad_logits
    mm_shape = shape(chain.matmul)
    softcap_bwd = SoftcapBackward(chain.softcap) if chain.softcap is not None else None
    pending = set(extra_terms)
    while True:
        user = only_user(node)
        if user is None:
            break
        if is_op(user, aten.add.Tensor) and node in user.args[:2] and any(a in pending for a in user.args[:2]):
            pending.discard(user.args[1] if user.args[0] is node else user.args[0])
        elif softcap_bwd is not None and softcap_bwd.step(node, user):
            pass
        elif is_op(user, *_VIEWS, *_COPIES, prims.convert_element_type.default):
            if user.args[0] is not node:
                break
        elif is_op(user, aten.slice_scatter.default):
            if user.args[1] is not node or not is_zeros(user.args[0]):
                raise NoMatch("logits_grad_form")
            dim = normalize_dim(user.args[2] if len(user.args) > 2 else 0, len(shape(user)))
            rest = list(user.args[3:]) + [None] * 3
            start = 0 if rest[0] is None else rest[0]
            end = _SLICE_END_MAX if rest[1] is None else rest[1]
            step = 1 if rest[2] is None else rest[2]
            if not (dim == len(shape(user)) - 1 and same_shape(shape(user.args[1]), shape(user))):  # no-op
                slices.append(Slice(dim, start, end, step, shape(user)))
            nodes.append(user.args[0])
        elif is_op(user, aten.slice_backward.default):
            _, input_sizes, dim, start, end, step = user.args
            slices.append(Slice(normalize_dim(dim, len(input_sizes)), start, end, step, tuple(input_sizes)))
        else:
            break
        node = user
        nodes.append(node)
    if not same_shape(shape(node), mm_shape):
        raise NoMatch("logits_grad_form", "gradient does not reach the matmul's shape")
    if pending:
        raise NoMatch("logits_grad_form", "a logsumexp gradient is not added into the logits' gradient")
    if softcap_bwd is not None:
        softcap_bwd.check_done()
        nodes += softcap_bwd.nodes
    if len(slices) != len(chain.slices) or not all(
        (b.dim, b.start, b.end, b.step) == (f.dim, f.start, f.end, f.step) and same_shape(b.input_shape, f.input_shape)
        for b, f in zip(reversed(slices), chain.slices)
    ):
        raise NoMatch("logits_grad_form", "backward slices do not mirror the forward")
    grad = LogitsGrad(node, None, None, False, None, nodes)
    for user in list(node.users):
        if is_op(user, aten.mm.default) and user.args[0] is node and _is_weight_again(user.args[1], chain):
            grad.grad_hidden = _once(grad.grad_hidden, user)
        elif _is_transpose(user) and len(user.users) == 1:
            mm = only_user(user)
            if is_op(mm, aten.mm.default) and mm.args == (user, chain.hidden):
                grad.grad_weight = _once(grad.grad_weight, mm)
                grad.nodes.append(user)
            else:
                raise NoMatch("logits_grad_other_users")
        elif is_op(user, aten.mm.default) and user.args[1] is node and _is_transpose(user.args[0]) \
                and user.args[0].args[0] is chain.hidden:
            grad.grad_weight = _once(grad.grad_weight, user)
            grad.grad_weight_transposed = True
        elif chain.bias is not None and is_op(user, aten.sum.dim_IntList) and list(user.args[1]) in ([0], [-2]):
            grad.grad_bias = _once(grad.grad_bias, user)
        else:
            raise NoMatch("logits_grad_other_users", str(user.target))
    if grad.grad_hidden is None and grad.grad_weight is None:
        raise NoMatch("logits_grad_form", "no gradient reaches hidden or weight")
    return grad


def _is_weight_again(node: Node, chain: LogitsChain) -> bool:
    """``permute(permute(weight))`` or ``weight`` itself: [V, D]."""
    if node is chain.weight:
        return True
    return _is_transpose(node) and node.args[0] is chain.weight_t


def _once(current, new):
    if current is not None:
        raise NoMatch("logits_grad_other_users", "two gradient matmuls of one kind")
    return new
