"""The Inductor graph pass: find linear -> float() -> cross-entropy and rewrite it.

One structural matcher serves every slot.  It starts at each log-softmax over the
classes (a cross-entropy *site*), then checks, without touching the graph:

  logits    the path up to the lm-head matmul, soft-cap included  (patterns/logits.py, softcap.py)
  nll       the per-token loss, masked by ignore_index     (patterns/nll.py)
  extras    a class sum of the log-probs (label smoothing)  (patterns/label_smoothing.py)
            and logsumexps of the logits (z-loss)           (patterns/logsumexp.py)
  backward  when the graph is a joint graph: the log-softmax and nll backward and
            the gradient matmuls of hidden / weight / bias  (patterns/log_softmax.py, ...)
  users     no node of the region (logits, log-probs, their gradients) is read by
            anything outside it

and only then rewrites, with one of two algorithms chosen per site (``choose_algorithm``):

  three_gemm  every scored token gets the same incoming gradient (mean, sum, sum / num_items:
              patterns/uniform_grad.py) and no z-loss / label smoothing reads the lse: ``lce_fused``
              computes the loss and the gradients in the forward (scaled by the forward factor of
              that gradient); the backward multiplies them by the loss's incoming gradient.
  recompute   otherwise, or with ``lean=True``: the per-token loss, the class sum and the logsumexps
              become ``lce_forward``'s outputs (loss, sum_logits - V * lse, lse) and the gradient
              matmuls ``lce_backward``'s outputs (four GEMMs, ~64 MB of workspace).

Either way everything [N, V] dies.
The user's reduction (mean / sum / none, whatever scaling of the incoming
gradient) is left exactly as the graph computes it.  A site that fails a check is
left alone and counted in ``counters["inductor_lce"]["skip_<reason>"]``.
"""
from __future__ import annotations

import collections
import json
import logging
import operator
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

from . import ops  # noqa: F401  (registers torch.ops.inductor_lce)
from . import skips
from .patterns.common import NoMatch, aten, dtype, is_op, prims, same_size, shape
from .patterns.label_smoothing import ClassSum, match_class_sum, split_class_sum_grad
from .patterns.log_softmax import LogSoftmax, match_log_softmax, match_log_softmax_backward, aliases
from .patterns.logits import LogitsChain, LogitsGrad, match_logits_chain, match_logits_grad
from .patterns.logsumexp import match_logsumexp, match_logsumexp_backward
from .patterns.nll import NllBackward, NllForward, match_nll_backward, match_nll_forward
from .patterns.softcap import saved_tanh
from .patterns.uniform_grad import UniformGrad, match_uniform_grad, unit_tangent_value

log = logging.getLogger("inductor_lce")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _source_files() -> tuple:
    files = []
    for root, _, names in os.walk(_PACKAGE_DIR):
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    return tuple(sorted(files))


@dataclass
class Site:
    """One cross-entropy found in a graph and everything the rewrite touches."""
    log_softmax: LogSoftmax
    chain: Optional[LogitsChain] = None
    nll: Optional[NllForward] = None
    backward: Optional[tuple] = None          # (LogSoftmaxBackward, NllBackward, LogitsGrad)
    post_views: list = field(default_factory=list)  # views (and a downcast) from log-probs to what the nll reads
    cast: Optional[Node] = None               # log-probs cast to bf16/fp16 (no .float(): opt-in)
    class_sum: Optional[ClassSum] = None      # sum of the log-probs over the classes (label smoothing)
    lse_uses: list = field(default_factory=list)  # LogSumExp of the scored logits (z-loss)
    algorithm: str = "recompute"              # "three_gemm" or "recompute" (choose_algorithm)
    why: str = ""                             # why this algorithm
    uniform: Optional[UniformGrad] = None     # the incoming gradient, when the same for every token

    @property
    def location(self) -> str:
        """Where the user's code computed the cross-entropy: ``path:line in function``."""
        return source(self.log_softmax.output)[0]

    @property
    def name(self) -> str:
        """The site for logs: the user's line, or the node (a graph without stack traces)."""
        where = self.location
        return f"at {where}" if where else f"{self.log_softmax.output.name} [{_fmt_shape(self.log_softmax.input)}]"


_FRAME = re.compile(r'\s*File "(.+)", line (\d+), in (.+)')
_RESUME = re.compile(r"^torch_dynamo_resume_in_(.+)_at_\d+$")


def source(node: Node) -> tuple:
    """(``path:line in function``, the line's code) of the user's code that computed ``node``, from
    its stack trace (``("", "")`` when it has none). Paths under the working directory are relative."""
    lines = (node.meta.get("stack_trace") or "").rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _FRAME.match(lines[i])
        if m is None:
            continue
        path = m.group(1)
        try:
            rel = os.path.relpath(path)
            path = rel if not rel.startswith("..") else path
        except ValueError:
            pass
        code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
        # code after a graph break runs in a function Dynamo names torch_dynamo_resume_in_<function>_at_<line>
        function = _RESUME.sub(r"\1", m.group(3))
        return f"{path}:{m.group(2)} in {function}", code
    return "", ""


def _fmt_shape(node: Node) -> str:
    v = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(v, torch.Tensor):
        return "?"
    return f"{list(v.shape)} {str(v.dtype).replace('torch.', '')}".replace("'", "")


def describe(node: Node, site: Optional["Site"] = None) -> str:
    """A graph node in the user's terms: its shape and dtype and the line of code that made it
    (left out when it is the site's own line), never its graph name alone."""
    if node.op == "output":
        return "the compiled region's output"
    text = _fmt_shape(node)
    if node.op == "placeholder":
        return f"an input of the compiled region ({text})"
    where, code = source(node)
    if not where:
        return f"a {text} tensor ({_op_name(node)})"
    if site is not None and where == site.location:
        return f"a {text} tensor on the same line"
    return f"a {text} tensor from `{code}` ({where})"


def _op_name(node: Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", name) if packet is not None else name


# a node's name in a matcher's message: with a numeric suffix anywhere (view_21, amax_1); without one (the first
# node of an op is named after it: amax, mm) only where the message names a node, not an op ("amax is read by ...")
_NODE_NAME = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*_\d+\b"
                        r"|^[A-Za-z_][A-Za-z0-9_]*(?= (?:is|does) )|(?<=by )[A-Za-z_][A-Za-z0-9_]*\b"
                        r"|(?<=\()[A-Za-z_][A-Za-z0-9_]*(?=\))")


def humanize(detail: str, graph: Graph, site: Optional["Site"] = None) -> str:
    """Graph node names in a matcher's message (``view_21 is read by amax_1``) -> ``describe(node)``."""
    if not detail:
        return detail
    nodes = {n.name: n for n in graph.nodes}
    parts = detail.split("`")  # odd parts are the user's code (from describe): left as written
    for i in range(0, len(parts), 2):
        parts[i] = _NODE_NAME.sub(lambda m: describe(nodes[m.group(0)], site) if m.group(0) in nodes else m.group(0),
                                  parts[i])
    return "`".join(parts)


def find_sites(graph: Graph) -> list:
    """Every log-softmax over the classes: a candidate cross-entropy."""
    sites = []
    for node in graph.nodes:
        try:
            sites.append(Site(match_log_softmax(node)))
        except NoMatch:
            pass
    return sites


def _is_downcast(node: Node) -> bool:
    return is_op(node, prims.convert_element_type.default) and node.args[1] in (torch.bfloat16, torch.float16)


def analyze(site: Site, low_precision_logits: bool = False) -> Site:
    """Fill ``site`` with the matched region or raise ``NoMatch``; never mutates."""
    lsm = site.log_softmax
    # log_softmax(logits [B, T, V]).flatten(0, 1) -> nll_loss: views between log-probs and loss;
    # without .float(), the log-softmax of bf16 logits is computed in fp32 and cast back first
    log_probs = lsm.output
    while True:
        views = [u for u in log_probs.users if is_op(u, *_ROW_VIEWS) or (_is_downcast(u) and site.cast is None)]
        if len(views) != 1 or not same_size(shape(views[0])[-1], shape(log_probs)[-1]):
            break
        if _is_downcast(views[0]):
            if not low_precision_logits:
                raise NoMatch("not_fp32", "the loss reads low-precision log-probs (no .float()); "
                                          "opt in with inductor_lce.options(low_precision_logits=True)")
            site.cast = views[0]
        log_probs = views[0]
        site.post_views.append(log_probs)
    site.class_sum = _check_log_softmax_users(site, log_probs)
    gathers = [u for u in log_probs.users if is_op(u, aten.gather.default)]
    if len(gathers) != 1:
        raise NoMatch("no_nll" if not gathers else "log_softmax_other_users")
    site.nll = match_nll_forward(gathers[0], log_probs)
    try:
        chain = site.chain = match_logits_chain(lsm.input)
    except NoMatch as e:
        if e.reason == "no_matmul":
            _check_logits_input(site)
        raise
    site.lse_uses = _match_lse_uses(site)
    for node in chain.nodes + lsm.nodes + site.post_views + site.nll.nodes:
        if any(u.op == "output" for u in node.users):
            what = "the logits" if node in chain.nodes else "the per-token loss" if node in site.nll.nodes \
                else "the log-probs"
            raise NoMatch("logits_returned", f"{what} ({describe(node, site)}) are an output of the compiled region")
    readers = set(chain.nodes) | set(lsm.nodes) | set(saved_tanh(chain.softcap) if chain.softcap else ())
    readers |= {n for lse in site.lse_uses for n in lse.nodes + lse.grad_nodes + [lse.output]}
    for node in chain.nodes:
        for u in node.users:
            if u not in readers and not is_op(u, aten.sym_size.int):
                raise NoMatch("logits_other_users",
                              f"the logits ({describe(node, site)}) are also read by {describe(u, site)}")
    backwards = match_log_softmax_backward(lsm, site.cast)
    if len(backwards) > 1:
        raise NoMatch("log_softmax_other_users", "several backward uses")
    if backwards:
        lsm_bwd = backwards[0]
        grad_log_probs = lsm_bwd.grad_output
        for step in site.post_views:  # the mirror views, from the loss's [N', V] back to log-probs
            mirror = (prims.convert_element_type.default,) if step is site.cast else _ROW_VIEWS
            if not is_op(grad_log_probs, *mirror):  # other users: caught by _check_users
                raise NoMatch("log_softmax_backward_form", "views do not mirror the forward")
            lsm_bwd.nodes.append(grad_log_probs)
            grad_log_probs = grad_log_probs.args[0]
        if site.class_sum is not None:
            grad_log_probs = split_class_sum_grad(grad_log_probs, site.class_sum, site.nll.target)
        nll_bwd = match_nll_backward(grad_log_probs, site.nll)
        terms = [lse.grad_term for lse in site.lse_uses if lse.grad_term is not None]
        logits_grad = match_logits_grad(lsm_bwd.grad_input, chain, terms)
        site.backward = (lsm_bwd, nll_bwd, logits_grad)
    elif any(lse.grad_term is not None for lse in site.lse_uses):
        raise NoMatch("log_softmax_backward_form", "a logsumexp has a backward, the cross-entropy none")
    _check_users(site)
    return site


def _check_logits_input(site: Site) -> None:
    """Logits that are a graph input were computed in an earlier graph: say so, and which graph break
    (Dynamo's record, see explain/breaks.py) put the lm-head there."""
    node = site.log_softmax.input
    for _ in range(64):  # the walk match_logits_chain made, up to where it left the graph's ops
        if not isinstance(node, Node) or node.op != "call_function" or not node.args:
            break
        node = node.args[0]
    if not isinstance(node, Node) or node.op != "placeholder":
        return
    from .explain.breaks import graph_break  # here: the explain package imports this module

    found = graph_break()
    raise NoMatch("logits_input", f"the logits are {describe(node, site)}: " + (
        f"a graph break separates the lm-head from the loss\n{found}" if found else
        "the lm-head ran before this graph, and Dynamo recorded no graph break on the way here (a loss compiled "
        "on its own?)"))


THREE_GEMM, RECOMPUTE = "three_gemm", "recompute"


def choose_algorithm(site: Site, lean: bool = False) -> Site:
    """Three GEMMs (gradients in the forward) where the site allows it, else recompute; never mutates.

    The three-GEMM rewrite needs a backward, the same incoming gradient on every scored token (a
    forward factor times the loss's 0-dim gradient), nothing else reading the lse (z-loss) or the class
    sum (label smoothing), and the forward factor's inputs computable before the loss."""
    if lean:
        site.algorithm, site.why = RECOMPUTE, "lean=True"
        return site
    if not site.backward:
        site.algorithm, site.why = RECOMPUTE, "no backward (inference): forward only"
        return site
    if site.class_sum is not None or site.lse_uses:
        site.algorithm, site.why = RECOMPUTE, "label smoothing / z-loss read the lse: per-token gradients"
        return site
    try:
        uniform = match_uniform_grad(_grad_value(site.backward[1].grad_tok))
        _check_hoistable(site, uniform.factors)
    except NoMatch as e:
        site.algorithm, site.why = RECOMPUTE, humanize(e.detail, site.log_softmax.output.graph, site) or e.reason
        return site
    site.algorithm, site.why, site.uniform = THREE_GEMM, "same incoming gradient for every token", uniform
    return site


def _grad_value(grad_tok: Node) -> Node:
    """X of the nll backward's ``where(valid, X, 0)``."""
    return grad_tok.args[1]


def _nodes_to_hoist(anchor: Node, factors: list) -> list:
    """Ancestors of ``factors`` placed at or after ``anchor``, in graph order."""
    order = _position(anchor.graph)
    found, stack = set(), [f for f in factors if isinstance(f, Node)]
    while stack:
        node = stack.pop()
        if node in found or node.op == "placeholder" or order(node) < order(anchor):
            continue
        found.add(node)
        stack.extend(node.all_input_nodes)
    return sorted(found, key=order)


def _check_hoistable(site: Site, factors: list) -> None:
    internal, outputs = _region(site)
    region = set(internal) | set(outputs)
    for node in _nodes_to_hoist(site.nll.loss_tok, factors):
        if node in region or node.op != "call_function":
            raise NoMatch("per_token_grad", f"the gradient's scale ({describe(node, site)}) needs the loss itself")


def _match_lse_uses(site: Site) -> list:
    """logsumexps of the scored logits (z-loss), with their backward terms."""
    chain, lsm = site.chain, site.log_softmax
    found = []
    for node in chain.nodes:
        for user in node.users:
            if not is_op(user, aten.amax.default, aten.logsumexp.default) or user in lsm.nodes:
                continue
            if not chain.scored(node):
                raise NoMatch("logits_other_users", f"a logsumexp reads logits that are not the scored fp32 ones "
                                                    f"({describe(node, site)})")
            lse = match_logsumexp(node, user)
            match_logsumexp_backward(lse)
            found.append(lse)
    return found


def _check_log_softmax_users(site: Site, log_probs: Node) -> Optional[ClassSum]:
    """In the forward, log-probs feed one gather (and aliases saved for backward), and at most one
    sum over the classes (label smoothing); say why not. Returns that sum."""
    lsm, post_views = site.log_softmax, site.post_views
    for node in lsm.nodes[:-1]:
        outside = [u for u in node.users if u not in lsm.nodes]
        if outside:
            raise NoMatch("log_softmax_other_users", f"a step of the log-softmax ({describe(node, site)}) is "
                                                     f"also read by {describe(outside[0], site)}")
    class_sum = None
    for user in [u for n in [lsm.output] + post_views for u in n.users]:
        if is_op(user, aten.gather.default, aten.alias.default) or user in post_views:
            continue
        if is_op(user, torch.ops.prims.convert_element_type.default):
            raise NoMatch("not_fp32", "log-softmax computed in low precision (no .float() before the loss)")
        if is_op(user, aten.mul.Tensor) and any(len(shape(a)) <= 2 and shape(a)[:1] in ((1,), (shape(lsm.output)[-1],))
                                                 for a in user.args if a is not lsm.output):
            raise NoMatch("class_weights", "per-class weights multiply the log-probs")
        found = match_class_sum(user, log_probs)
        if found is not None and class_sum is None:
            class_sum = found
            continue
        if is_op(user, aten.sum.dim_IntList, aten.mean.dim, aten.sum.default, aten.mean.default):
            raise NoMatch("label_smoothing", "the log-probs are reduced in a form not fused "
                                             "(only one sum over the classes of what the loss reads)")
        raise NoMatch("log_softmax_other_users", f"the log-probs are also read by {describe(user, site)}")
    return class_sum


def _region(site: Site) -> tuple:
    """(internal nodes, boundary outputs): internal nodes may only feed the region."""
    internal = list(site.chain.nodes) + list(site.log_softmax.nodes) + site.post_views + list(site.nll.nodes)
    internal += [a for a in aliases(site.log_softmax.output) if a is not site.log_softmax.output]
    if site.cast is not None:
        internal += aliases(site.cast)[1:]
    if site.chain.softcap is not None:
        internal += saved_tanh(site.chain.softcap)
    outputs = [site.nll.loss_tok]
    if site.class_sum is not None:
        outputs.append(site.class_sum.output)
        internal += site.class_sum.grad_nodes
    for lse in site.lse_uses:
        internal += lse.nodes + lse.grad_nodes
        outputs.append(lse.output)
    if site.backward:
        lsm_bwd, nll_bwd, grad = site.backward
        internal += nll_bwd.nodes + lsm_bwd.nodes + grad.nodes
        outputs += [n for n in (grad.grad_hidden, grad.grad_weight, grad.grad_bias) if n is not None]
    # sizes read off region nodes (dynamic shapes); rewrite() re-points the ones still needed
    internal += [u for n in internal for u in n.users if is_op(u, aten.sym_size.int)]
    return list(dict.fromkeys(internal)), outputs


def _check_users(site: Site) -> None:
    internal, outputs = _region(site)
    allowed = set(internal) | set(outputs)
    for node in internal:
        for user in node.users:
            if user in allowed or is_op(node, aten.sym_size.int):
                continue
            raise NoMatch("logits_other_users", f"{describe(node, site)} inside the loss is also read by "
                                                f"{describe(user, site)}")


def graph_kind(graph: Graph) -> str:
    """'joint', 'forward' / 'backward' (a partitioned training graph) or 'inference',
    from AOTAutograd's placeholder names (primals_*, tangents_*)."""
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    primals = any(n.startswith("primals") for n in names)
    tangents = any(n.startswith("tangents") for n in names)
    if primals and tangents:
        return "joint"
    if primals:
        return "forward"
    if tangents:
        return "backward"
    return "inference"


# --------------------------------------------------------------------------- rewriting

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


def _ops_for(device_type: str):
    try:
        from .lowerings import ops_for
    except ImportError:
        ops_for = None
    if ops_for is not None:
        return ops_for(device_type)
    return torch.ops.inductor_lce.lce_forward.default, torch.ops.inductor_lce.lce_backward.default


def _fused_op_for(device_type: str):
    try:
        from .lowerings import fused_op_for
    except ImportError:
        return torch.ops.inductor_lce.lce_fused.default
    return fused_op_for(device_type)


_ROW_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default)


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
    fwd_op, bwd_op = _ops_for(chain.hidden.meta["val"].device.type)
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
        out = emit(anchor, _fused_op_for(chain.hidden.meta["val"].device.type), chain.hidden, chain.weight,
                   chain.bias, target, grad_scale, nll.ignore_index, softcap)
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




def _position(graph: Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


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

# --------------------------------------------------------------------------- counting and the report
#
# Every decision on a site is an *entry*: a dict with decision ("rewritten" / "skipped"), reason, algorithm,
# detail, where / code (the user's line), shape (the logits') and graph (its kind). Counting an entry adds
# one to ``counters["inductor"]["inductor_lce {entry as JSON}"]`` and applies it: counters["inductor_lce"]
# (rewrites, algorithm_*, skip_*), REPORT (for explain) and, for a replayed one, the log.
#
# Why counters["inductor"]: while Inductor compiles an FX graph, it records what the compile added to
# counters["inductor"] in the compiled artifact (CompiledFxGraph.counter_deltas) and adds it again whenever the
# FX graph cache serves that graph, from disk or memory; the AOTAutograd cache loads its graphs through the same
# path (FxGraphCache.cache_hit_post_compile). So an entry counted during that compile, i.e. from the post-grad
# slot, comes back with every cache hit. The joint-graph slot runs earlier, in AOTAutograd: its entries wait in
# _PENDING until the post-grad instance that options() / install() / the backend put behind it counts them while
# Inductor compiles the forward (or inference) graph. Without such an instance they are counted at once (and not
# replayed on hits). When the FX graph cache serves that forward graph instead (AOTAutograd cache off or missed),
# the hit replays the entries of the first compile and the waiting ones are dropped; entries nobody counted for
# another reason (the graph compiled in a subprocess, a failed compile) are counted at the end (``_settle``).
# ``sync()`` applies the entries a cache hit replayed (what counters["inductor"] holds beyond what was applied);
# it runs at the end of every Dynamo compile (torch._dynamo.callback) and from explain(). torch._dynamo.reset()
# clears Dynamo's callbacks, so uuid(), which Inductor calls for its cache keys on every compile, hit or miss,
# registers it again. Nothing here changes a graph or a cache key. Checked with torch 2.11 and 2.13; where a torch
# lacks the callbacks, replayed entries are applied at the next compile or explain().

_KEY = "inductor_lce "
_JUDGED = "inductor_lce_judged"     # node.meta mark on a skipped site's log-softmax: judged once, counted once

# Every decision on a site, for ``inductor_lce.explain``: entries plus site, hint and cached (replayed by a cache hit).
REPORT: list = []
_PENDING: list = []                 # (compile id, FX graph cache hits then, entry): joint-slot decisions to count
_applied = {"counter": None, "seen": collections.Counter()}
_warned_post_grad_training = False


def _compile_id() -> Optional[str]:
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # no compile context (the pass called by hand), or an older API
        return None
    return None if cid is None else str(cid)


def _entry(site: Site, kind: str, decision: str, reason: str, detail: str = "", algorithm: str = "") -> dict:
    where, code = source(site.log_softmax.output)
    return dict(decision=decision, reason=reason, algorithm=algorithm, detail=detail, where=where, code=code,
                shape=_fmt_shape(site.log_softmax.input), graph=kind)


def _count(entry: dict) -> None:
    """Count ``entry`` now; inside Inductor's compile of a graph this also records it for cache hits."""
    sync()
    key = _KEY + json.dumps(entry, sort_keys=True)
    counters["inductor"][key] += 1
    _applied["seen"][key] += 1
    _apply(entry, cached=False)


def _apply(entry: dict, cached: bool) -> None:
    lce = counters["inductor_lce"]
    if entry["decision"] == "rewritten":
        lce["rewrites"] += 1
        lce[f"algorithm_{entry['algorithm']}"] += 1
    else:
        lce[f"skip_{entry['reason']}"] += 1
    REPORT.append(dict(entry, site=entry["where"] or f"logits {entry['shape']}", cached=cached,
                       hint=skips.hint(entry["reason"]) if entry["decision"] == "skipped" else ""))
    if cached:
        log.info("inductor_lce: from the compile cache: cross-entropy at %s %s (%s%s)", entry["where"] or "?",
                 entry["decision"], entry["reason"], f": {entry['detail']}" if entry["detail"] else "")


def sync() -> None:
    """Apply the entries that compile-cache hits replayed into counters["inductor"] since the last call."""
    # counters.clear() replaces counters["inductor_lce"] (and empties counters["inductor"]): start over then.
    # (counters["inductor"] itself is no such sign: Inductor swaps it for a copy of itself at times.)
    lce = counters["inductor_lce"]
    if _applied["counter"] is not lce:
        _applied["counter"], _applied["seen"] = lce, collections.Counter()
    seen = _applied["seen"]
    for key, n in list(counters["inductor"].items()):
        if not (isinstance(key, str) and key.startswith(_KEY)):
            continue
        if n < seen[key]:  # counters["inductor"] alone was cleared
            seen[key] = n
        if n > seen[key]:
            entry = json.loads(key[len(_KEY):])
            for _ in range(n - seen[key]):
                _apply(entry, cached=True)
            seen[key] = n


def _fx_cache_hits() -> int:
    return counters["inductor"]["fxgraph_cache_hit"]


def _flush_pending() -> None:
    """In the post-grad slot (Inductor is compiling this graph): count what the joint slot decided in this
    compile; older entries are settled."""
    cid = _compile_id()
    pending, _PENDING[:] = list(_PENDING), []
    for item in pending:
        if item[0] == cid:
            _count(item[2])
        else:
            _settle([item])


def _settle(pending: list) -> None:
    """Joint-slot decisions no post-grad slot counted: when the FX graph cache served a graph since, it
    replayed them (sync() applies them); otherwise (the graph compiled elsewhere, or the compile failed)
    count them now."""
    for _, hits, entry in pending:
        if _fx_cache_hits() == hits:
            _count(entry)


def _on_compile_end(*args) -> None:
    try:
        sync()
        pending, _PENDING[:] = list(_PENDING), []
        _settle(pending)
    except Exception as e:  # counting must never break a compile
        log.warning("inductor_lce: counting the compile's cross-entropy sites failed: %r", e, exc_info=True)


_callback_registered_once = False


def _ensure_end_callback() -> None:
    """Register _on_compile_end with Dynamo's end-of-compile callbacks (again after torch._dynamo.reset())."""
    global _callback_registered_once
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return
    register = getattr(callback_handler, "register_end_callback", None)
    if register is None:
        return
    registered = getattr(callback_handler, "end_callbacks", None)
    if registered is None:  # cannot see the list: register once
        if not _callback_registered_once:
            register(_on_compile_end)
            _callback_registered_once = True
        return
    if _on_compile_end not in registered:
        register(_on_compile_end)


def _holds(slot_value, predicate) -> bool:
    """Whether a config slot's value (a pass, a list of passes, a ChainedPass) holds a pass matching ``predicate``."""
    if slot_value is None:
        return False
    if isinstance(slot_value, (list, tuple)):
        return any(_holds(p, predicate) for p in slot_value)
    if predicate(slot_value):
        return True
    inner = getattr(slot_value, "passes", None)
    return isinstance(inner, (list, tuple)) and _holds(inner, predicate)


def _post_grad_counts() -> bool:
    """Whether an instance of the pass is in the post-grad slot (it counts what the joint slot decided)."""
    import torch._inductor.config as inductor_config

    return _holds(getattr(inductor_config, "post_grad_custom_pre_pass", None),
                  lambda p: isinstance(p, LinearCrossEntropyPass))


# --------------------------------------------------------------------------- the pass

class LinearCrossEntropyPass(CustomGraphPass):
    """Rewrite ``cross_entropy(linear(h, W).float(), labels)`` into the fused ops.

    Put it in ``joint_custom_pre_pass`` for training (that is where the [N, V] logits can
    still be kept out of what the forward saves) and in ``post_grad_custom_pre_pass`` for
    inference graphs; ``inductor_lce.options()`` does both.
    """

    def __init__(self, *, report_training_graphs: bool = True, low_precision_logits: bool = False,
                 lean: bool = False):
        # options() puts a second instance in the post-grad slot behind the joint one; that
        # one stays quiet on training graphs, whose sites the joint pass already judged.
        self.report_training_graphs = report_training_graphs
        # also rewrite a loss on bf16/fp16 logits (no .float(), nanoGPT): the fused loss is then
        # computed in fp32 and more accurate than eager's, so not bit-equal to it (opt-in)
        self.low_precision_logits = low_precision_logits
        # never take the three-GEMM algorithm: ~64 MB of workspace instead of up to ~45% of one
        # low-precision [N, V] logits tensor, for ~1.3-1.7x the default's time (README: choosing the algorithm)
        self.lean = lean

    def _slot(self, kind: str) -> Optional[str]:
        """'joint' or 'post_grad': which config slot this call comes from; None when unknown (called by
        hand, or the same instance in both slots on an inference graph)."""
        if kind == "joint":
            return "joint"
        if kind in ("forward", "backward"):
            return "post_grad"
        import torch._inductor.config as inductor_config

        in_joint = _holds(getattr(inductor_config, "joint_custom_pre_pass", None), lambda p: p is self)
        in_post = _holds(getattr(inductor_config, "post_grad_custom_pre_pass", None), lambda p: p is self)
        if in_joint != in_post:
            return "joint" if in_joint else "post_grad"
        return None

    def __call__(self, graph: Graph) -> None:
        _ensure_end_callback()
        kind = graph_kind(graph)
        slot = self._slot(kind)
        if slot == "post_grad" and kind != "backward":
            _flush_pending()
        elif slot == "joint":
            pending, _PENDING[:] = list(_PENDING), []
            _settle(pending)  # from an earlier compile (no Dynamo end-of-compile callback settled it)
        # a site the joint slot skipped is seen again by the post-grad slot (inference graphs): judged once
        sites = [s for s in find_sites(graph) if not s.log_softmax.output.meta.get(_JUDGED)]
        if not sites:
            return
        if kind == "backward":
            return  # what looks like a site here is the forward's recomputation; counted there
        defer = slot == "joint" and _post_grad_counts()
        if kind == "forward":
            # Post-grad slot on a training graph: the forward already saves the logits.
            if not self.report_training_graphs:
                return
            for site in sites:
                self._skip(site, kind, defer, "post_grad_training", "the forward already saves the logits for backward")
            return
        fake_mode = _fake_mode(graph)
        for site in sites:
            try:
                choose_algorithm(analyze(site, self.low_precision_logits), self.lean)
            except NoMatch as e:
                self._skip(site, kind, defer, e.reason, self._detail(site, e))
                continue
            except Exception as e:  # a bug in a matcher must never break compilation
                log.warning("inductor_lce: matcher failed on the cross-entropy %s: %r", site.name, e, exc_info=True)
                self._skip(site, kind, defer, "matcher_error", repr(e))
                continue
            snapshot = _snapshot(graph)
            try:
                rewrite(graph, site, fake_mode)
                _erase_dead(graph, site)
            except NoMatch as e:
                detail = self._detail(site, e)
                _restore(graph, snapshot)
                self._skip(site, kind, defer, e.reason, detail, mark=False)
                return  # nodes of later sites belong to the discarded graph
            except Exception as e:
                _restore(graph, snapshot)
                log.warning("inductor_lce: rewrite failed on the cross-entropy %s, graph left as it was: %r",
                            site.name, e, exc_info=True)
                self._skip(site, kind, defer, "rewrite_error", repr(e), mark=False)
                # nodes of later sites belong to the discarded graph: stop here
                return
            how = ("forward+backward" if site.backward else "forward") + f", {site.algorithm}"
            self._decide(_entry(site, kind, "rewritten", how, site.why, site.algorithm), defer)
            log.info("inductor_lce: rewrote the cross-entropy %s (%s: %s)", site.name, how, site.why)

    @staticmethod
    def _detail(site: Site, e: NoMatch) -> str:
        """The matcher's message in the user's terms (shapes and source lines instead of node names)."""
        graph = site.log_softmax.output.graph
        if e.reason == "logits_path_op" and e.detail:
            node = site.log_softmax.input
            for _ in range(64):  # the op the walk up from the logits stopped at (its message is the op's name)
                if not isinstance(node, Node) or node.op != "call_function":
                    break
                if str(node.target) == e.detail:
                    return f"{_op_name(node)} between the lm-head matmul and the loss ({describe(node, site)})"
                node = node.args[0] if node.args else None
        return humanize(e.detail, graph, site)

    @staticmethod
    def _decide(entry: dict, defer: bool) -> None:
        if defer:
            _PENDING.append((_compile_id(), _fx_cache_hits(), entry))
        else:
            _count(entry)

    def _skip(self, site: Site, kind: str, defer: bool, reason: str, detail: str = "", mark: bool = True) -> None:
        global _warned_post_grad_training
        if mark:
            site.log_softmax.output.meta[_JUDGED] = True
        self._decide(_entry(site, kind, "skipped", reason, detail), defer)
        log.info("inductor_lce: the cross-entropy %s not rewritten: %s%s; %s", site.name, reason,
                 f" ({detail})" if detail else "", skips.hint(reason))
        if reason == "post_grad_training" and not _warned_post_grad_training:
            _warned_post_grad_training = True
            warnings.warn(
                "inductor_lce: the post-grad pass saw a training graph whose forward already saves the "
                "[N, V] logits for backward; rewriting it there saves nothing. Compile with "
                "torch.compile(model, options=inductor_lce.options()) (the joint-graph slot) to save "
                "training memory.",
                stacklevel=2,
            )

    def uuid(self) -> str:
        # The cache key is the real one (the package's sources and the flags). Inductor calls this on every
        # compile, cache hit or not, so it also (re)registers the end-of-compile sync of replayed counts
        # (and applies what earlier hits replayed, for a torch without Dynamo's callbacks).
        try:
            _ensure_end_callback()
            sync()  # not _on_compile_end: the joint slot's decisions still wait for the forward graph's compile
        except Exception as e:  # counting must never break a compile
            log.warning("inductor_lce: counting cross-entropy sites from the compile cache failed: %r", e,
                        exc_info=True)
        flags = f"{int(self.report_training_graphs)}{int(self.low_precision_logits)}{int(self.lean)}"
        return f"{get_hash_for_files(_source_files()).hex()}-{flags}"


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
