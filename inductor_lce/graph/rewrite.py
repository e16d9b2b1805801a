"""The rewrite of a matched site: the ops the driver emits in place of its region.

Runs only on a site ``match.py`` accepted (its algorithm chosen). It can still fail halfway (a ``NoMatch``
for a size no surviving tensor has, or a bug): the driver takes a ``_snapshot`` of the graph first and
``_restore``s it then, so a graph is either rewritten or left exactly as it was. The op to emit for the
device comes from ``inductor_lce.ops.ops_for``; nothing here imports a kernel.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Graph, Node

from ..ops import ops_for
from .match import THREE_GEMM, Site, _nodes_to_hoist, _position, _region, describe
from .patterns.common import NoMatch, aten, dtype, is_op, prims, same_size, shape
from .patterns.logits import LogitsChain, LogitsGrad
from .patterns.uniform_grad import unit_tangent_value


class _Emitter:
    """Emitted ops must be ones Inductor lowers directly: its decompositions already ran.

    Creates nodes before ``anchor`` and fills ``meta['val']`` by running them on fake values."""

    def __init__(self, graph: Graph, fake_mode):
        self.graph = graph
        self.fake_mode = fake_mode

    def __call__(self, anchor: Node, target, *args, **kwargs) -> Node:
        with self.graph.inserting_before(anchor):
            node = self.graph.call_function(target, args, kwargs)
        fake_args = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
        fake_kwargs = torch.fx.node.map_arg(kwargs, lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def size(self, anchor: Node, node: Node, dim: int):
        s = node.meta["val"].shape[dim]
        return s if isinstance(s, int) else self(anchor, aten.sym_size.int, node, dim)


def _row_index(emit: _Emitter, anchor: Node, chain: LogitsChain, steps: list) -> Optional[Node]:
    """[R] int64: for each row of the node reached by ``steps`` (the path after the matmul), its row
    in the matmul output; None when the path only reshapes (rows keep their order).
    Replays the path on ``arange(N)`` with the class dim replaced by 1."""
    if not any(is_op(step, aten.slice.Tensor) for step in steps):
        return None
    n_rows = emit.size(anchor, chain.matmul, 0)
    rows = emit(anchor, torch.ops.prims.iota.default, n_rows, start=0, step=1, dtype=torch.int64,
                device=chain.matmul.meta["val"].device, requires_grad=False)
    node = emit(anchor, aten.view.default, rows, [n_rows, 1])
    for step in steps:
        if is_op(step, aten.slice.Tensor):
            node = emit(anchor, aten.slice.Tensor, node, *step.args[1:], **step.kwargs)
        elif is_op(step, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            new_shape = list(step.args[1])[:-1] + [1]
            node = emit(anchor, aten.reshape.default, node, new_shape)
    return emit(anchor, aten.reshape.default, node, [-1])


def _steps_to(chain: LogitsChain, node: Node) -> list:
    return chain.nodes[1: chain.nodes.index(node) + 1]


class _Rows:
    """Per-row values of the op ([N], one per matmul row) <-> the rows some node of the graph has."""

    def __init__(self, emit: _Emitter, anchor: Node, chain: LogitsChain, row_index: Optional[Node]):
        self.emit, self.anchor, self.chain, self.row_index = emit, anchor, chain, row_index

    def take(self, values: Node, like: Node, size_source: Optional[Node] = None) -> Node:
        """``values`` [N] -> the rows ``like`` holds, in ``like``'s shape and dtype. Symbolic sizes of a
        multi-dim ``like`` are read off ``size_source`` (a region node with the same leading dims: reading
        them off ``like`` would make its replacement depend on itself)."""
        emit, anchor = self.emit, self.anchor
        out = values if self.row_index is None else emit(anchor, aten.index.Tensor, values, [self.row_index])
        if len(shape(like)) != 1:
            sizes = [s if isinstance(s, int) else emit.size(anchor, size_source, d) for d, s in enumerate(shape(like))]
            out = emit(anchor, aten.reshape.default, out, sizes)
        if dtype(like) != torch.float32:
            out = emit(anchor, prims.convert_element_type.default, out, dtype(like))
        return out

    def put(self, grad: Node, anchor: Node) -> Node:
        """The gradient of some rows -> fp32 [N] (0 on rows the node does not hold)."""
        emit = self.emit
        flat = emit(anchor, aten.reshape.default, grad, [-1])
        if dtype(grad) != torch.float32:
            flat = emit(anchor, prims.convert_element_type.default, flat, torch.float32)
        if self.row_index is None:
            return flat
        zeros = emit(anchor, aten.full.default, [emit.size(anchor, self.chain.matmul, 0)], 0.0,
                     dtype=torch.float32, device=grad.meta["val"].device)
        return emit(anchor, aten.scatter.src, zeros, 0, self.row_index, flat)


def rewrite(graph: Graph, site: Site, fake_mode) -> None:
    chain, nll = site.chain, site.nll
    emit = _Emitter(graph, fake_mode)
    fwd_op, bwd_op, fused_op = ops_for(chain.hidden.meta["val"].device.type)
    softcap = chain.softcap.cap if chain.softcap is not None else 0.0
    anchor = min([nll.loss_tok] + ([site.class_sum.output] if site.class_sum else [])
                 + [lse.output for lse in site.lse_uses], key=_position(graph))
    target = nll.target
    if target.meta["val"].dtype != torch.int64:
        target = emit(anchor, prims.convert_element_type.default, target, torch.int64)
    row_index = _row_index(emit, anchor, chain, chain.nodes[1:] + site.post_views)
    loss_rows = _Rows(emit, anchor, chain, row_index)
    if row_index is not None:
        # The loss reads a subset of the matmul's rows (logits[..., :-1, :]): score every
        # row, with ignore_index on the rows the loss does not read.
        n_rows = emit.size(anchor, chain.matmul, 0)
        filled = emit(anchor, aten.full.default, [n_rows], nll.ignore_index, dtype=torch.int64,
                      device=target.meta["val"].device)
        target = emit(anchor, aten.scatter.src, filled, 0, row_index, target)
    if site.algorithm == THREE_GEMM:
        for node in _nodes_to_hoist(anchor, site.uniform.factors):
            anchor.prepend(node)                  # the forward factor's inputs, computed before the loss
        grad_scale = unit_tangent_value(emit, anchor, site.uniform)
        out = emit(anchor, fused_op, chain.hidden, chain.weight, chain.bias, target, grad_scale, nll.ignore_index,
                   softcap)
        loss = emit(anchor, operator.getitem, out, 0)
        fused_grads = [emit(anchor, operator.getitem, out, i) for i in (2, 3, 4)]
    else:
        out = emit(anchor, fwd_op, chain.hidden, chain.weight, chain.bias, target, nll.ignore_index, softcap)
        loss, lse, sum_logits = (emit(anchor, operator.getitem, out, i) for i in range(3))
    new_loss_tok = loss_rows.take(loss, nll.loss_tok)
    nll.loss_tok.replace_all_uses_with(new_loss_tok)
    num_classes = emit.size(anchor, chain.weight, 0)
    if site.class_sum is not None:
        # sum_v log_softmax = sum_v logits - V * lse
        class_sum = emit(anchor, aten.sub.Tensor, sum_logits, emit(anchor, aten.mul.Tensor, lse, num_classes))
        site.class_sum.output.replace_all_uses_with(
            loss_rows.take(class_sum, site.class_sum.output, site.class_sum.output.args[0]))
    lse_rows = []
    for use in site.lse_uses:
        rows = _Rows(emit, anchor, chain, _row_index(emit, anchor, chain, _steps_to(chain, use.input)))
        use.output.replace_all_uses_with(rows.take(lse, use.output, use.input))
        lse_rows.append(rows)

    if site.backward and site.algorithm == THREE_GEMM:
        grad = site.backward[2]
        anchor = min([n for n in (grad.grad_hidden, grad.grad_weight, grad.grad_bias) if n is not None],
                     key=_position(graph))
        # the gradients of sum(X(T=1) * loss_n), times T = the loss's incoming gradient
        outs = [emit(anchor, aten.mul.Tensor, g, site.uniform.tangent) for g in fused_grads]
        _replace_grads(emit, anchor, grad, outs)
    elif site.backward:
        _, nll_bwd, grad = site.backward
        grads = [n for n in (grad.grad_hidden, grad.grad_weight, grad.grad_bias) if n is not None]
        anchor = min(grads, key=_position(graph))
        grad_loss = loss_rows.put(nll_bwd.grad_tok, anchor)
        grad_lse, grad_sum = [], None
        if site.class_sum is not None and site.class_sum.grad is not None:
            grad_sum = loss_rows.put(site.class_sum.grad, anchor)
            # class_sum = sum_logits - V * lse: its gradient g goes to sum_logits as g, to lse as -V * g
            grad_lse.append(emit(anchor, aten.neg.default, emit(anchor, aten.mul.Tensor, grad_sum, num_classes)))
        for use, rows in zip(site.lse_uses, lse_rows):
            if use.grad is not None:
                grad_lse.append(rows.put(use.grad, anchor))
        total_grad_lse = None
        for term in grad_lse:
            total_grad_lse = term if total_grad_lse is None else emit(anchor, aten.add.Tensor, total_grad_lse, term)
        outs = emit(anchor, bwd_op, grad_loss, total_grad_lse, grad_sum, chain.hidden, chain.weight, chain.bias,
                    target, lse, nll.ignore_index, softcap)
        _replace_grads(emit, anchor, grad, [emit(anchor, operator.getitem, outs, i) for i in range(3)])
    _repoint_sizes(site, _label_views(nll.target) + [chain.hidden, new_loss_tok])


def _replace_grads(emit: _Emitter, anchor: Node, grad: LogitsGrad, outs: list) -> None:
    """The graph's gradient matmuls of hidden / weight / bias -> the op's (grad_hidden, grad_weight, grad_bias)."""
    grad_hidden, grad_weight, grad_bias = outs
    if grad.grad_hidden is not None:
        grad.grad_hidden.replace_all_uses_with(grad_hidden)
    if grad.grad_weight is not None:
        if grad.grad_weight_transposed:
            grad_weight = emit(anchor, aten.permute.default, grad_weight, [1, 0])
        grad.grad_weight.replace_all_uses_with(grad_weight)
    if grad.grad_bias is not None:
        grad_bias = emit(anchor, aten.reshape.default, grad_bias, list(shape(grad.grad_bias)))
        grad.grad_bias.replace_all_uses_with(grad_bias)


def _label_views(target: Node) -> list:
    """The targets and the label tensors they are views / slices of (labels[..., 1:] has the
    [B, T - 1] sizes a flat target lost)."""
    out = [target]
    node = target
    while is_op(node, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                aten.slice.Tensor, prims.convert_element_type.default) and isinstance(node.args[0], Node):
        node = node.args[0]
        out.append(node)
    return out


def _repoint_sizes(site: Site, sources: list) -> None:
    """A size read off a dying [N, V] node (``sym_size(logits, 0)``) that something outside the
    region still needs is read instead off a surviving tensor with the same symbolic size."""
    internal, outputs = _region(site)
    region = set(internal) | set(outputs)
    for node in internal:
        if not is_op(node, aten.sym_size.int) or all(u in region for u in node.users):
            continue
        size = node.meta["val"]
        order = _position(node.graph)
        for src in sources:
            dims = [d for d, s in enumerate(src.meta["val"].shape) if same_size(s, size)]
            if not dims:
                continue
            if order(src) > order(node):
                # read it after the source; fine when every surviving reader comes later still
                if any(order(u) <= order(src) for u in node.users if u not in region):
                    continue
                src.append(node)
            node.args = (src, dims[0])
            break
        else:
            raise NoMatch("dynamic_size_use", f"size {node.args[1]} of {describe(node.args[0], site)} is needed "
                                              "after the rewrite and no surviving tensor has it")


def _erase_dead(graph: Graph, site: Site) -> None:
    internal, outputs = _region(site)
    for node in reversed(list(graph.nodes)):
        if node in internal or node in outputs:
            if node.users:
                raise RuntimeError(f"inductor_lce: {node.name} still has users after the rewrite")
            graph.erase_node(node)
    graph.eliminate_dead_code()


def _fake_mode(graph: Graph):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals)


def _snapshot(graph: Graph) -> Graph:
    copy = Graph()
    out = copy.graph_copy(graph, {})
    copy.output(out)
    return copy


def _restore(graph: Graph, snapshot: Graph) -> None:
    nodes = list(graph.nodes)
    for node in nodes:  # cut every edge first: a half-done rewrite need not be in topological order
        node.args, node.kwargs = (), {}
    for node in reversed(nodes):
        graph.erase_node(node)
    out = graph.graph_copy(snapshot, {})
    graph.output(out)
