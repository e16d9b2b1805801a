"""Site matching: find every cross-entropy of a graph, check its region and choose its algorithm.

Reads the graph through ``patterns/`` and never mutates it: every decision on a site is taken here, before
``rewrite.py`` touches it. ``describe`` / ``humanize`` put graph nodes in the user's terms (shapes, source lines).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Graph, Node

from .patterns.common import NoMatch, aten, is_op, prims, same_size, shape
from .patterns.label_smoothing import ClassSum, match_class_sum, split_class_sum_grad
from .patterns.log_softmax import LogSoftmax, match_log_softmax, match_log_softmax_backward, aliases
from .patterns.logits import LogitsChain, match_logits_chain, match_logits_grad
from .patterns.logsumexp import match_logsumexp, match_logsumexp_backward
from .patterns.nll import NllForward, match_nll_backward, match_nll_forward
from .patterns.softcap import saved_tanh
from .patterns.uniform_grad import UniformGrad, match_uniform_grad


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


def short_path(path: str) -> str:
    """``path`` relative to the working directory when under it (how reports name the user's files)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return rel if not rel.startswith("..") else path


def source(node: Node) -> tuple:
    """(``path:line in function``, the line's code) of the user's code that computed ``node``, from
    its stack trace (``("", "")`` when it has none). Paths under the working directory are relative."""
    lines = (node.meta.get("stack_trace") or "").rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _FRAME.match(lines[i])
        if m is None:
            continue
        path = short_path(m.group(1))
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
        if e.reason == "logits_input":
            raise _logits_input(site, e.node) from None
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


def _logits_input(site: Site, placeholder: Node) -> NoMatch:
    """Logits that are a graph input were computed in an earlier graph: say so, and which graph break
    (Dynamo's record, see explain/breaks.py) put the lm-head there."""
    from ..explain.breaks import graph_break  # here: the explain package imports the graph package

    found = graph_break()
    return NoMatch("logits_input", f"the logits are {describe(placeholder, site)}: " + (
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


_ROW_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default)


def _position(graph: Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]

