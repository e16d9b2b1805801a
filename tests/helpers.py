"""Test helpers: compile with the pass while recording the graphs it saw."""
from __future__ import annotations

import operator

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import inductor_lce
from inductor_lce.entry import ChainedPass
from inductor_lce.graph.driver import graph_kind


class Recorder(CustomGraphPass):
    """Keeps a readable copy of every graph it is called on, with the graph's kind.
    uuid() is None, so compiles that use it bypass the FX graph cache and always run the passes."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append((graph_kind(graph), format_graph(graph), _output_vals(graph)))

    def uuid(self):
        return None

    def of_kind(self, kind):
        return [g for g in self.graphs if g[0] == kind]


def _output_vals(graph):
    out = next(n for n in graph.nodes if n.op == "output")
    vals = []
    for a in torch.fx.node.map_aggregate(out.args[0], lambda x: x) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]:
        if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            vals.append((a.name, tuple(a.meta["val"].shape), _fused_gradient(a)))
    return vals


def _fused_gradient(node) -> bool:
    """Whether ``node`` is one of the gradients the three-GEMM op computes in the forward
    (``lce_fused``'s outputs 2-4: grad_hidden, grad_weight, grad_bias), which the forward saves."""
    if node.target is not operator.getitem or node.args[1] not in (2, 3, 4):
        return False
    op = node.args[0]
    return isinstance(op, torch.fx.Node) and "lce_fused" in str(op.target)


def compile_recorded(fn, options=None, **compile_kwargs):
    """torch.compile(fn, options=inductor_lce.options()) (or the given ``options``) plus recorders
    around the joint pass (before / after) and in front of the post-grad pass. Returns (compiled, recorders)."""
    opts = dict(inductor_lce.options() if options is None else options)
    joint_before, joint_after, post_grad = Recorder(), Recorder(), Recorder()
    opts["joint_custom_pre_pass"] = ChainedPass(joint_before, opts["joint_custom_pre_pass"], joint_after)
    opts["post_grad_custom_pre_pass"] = ChainedPass(post_grad, opts["post_grad_custom_pre_pass"])
    compiled = torch.compile(fn, options=opts, **compile_kwargs)
    return compiled, dict(joint_before=joint_before, joint_after=joint_after, post_grad=post_grad)


def saved_numels(post_grad: Recorder):
    """Numels of everything the partitioned forward graph(s) compute and return (outputs +
    saved tensors); inputs passed through for backward (hidden, weight) are not counted, nor the
    gradients the three-GEMM op computes in the forward (grad_weight is [V, D]: it can exceed N * V
    for tiny N, and it is the gradient, not an activation)."""
    numels = [0]
    for _, _, vals in post_grad.of_kind("forward"):
        for name, shape, fused_gradient in vals:
            if name.startswith("primals") or fused_gradient:
                continue
            n = 1
            for s in shape:
                n *= int(s)
            numels.append(n)
    return numels


def rewrites():
    return counters["inductor_lce"]["rewrites"]


def skips():
    return {k: v for k, v in counters["inductor_lce"].items() if k.startswith("skip_")}


def rel_err(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _fmt_arg(a):
    if isinstance(a, torch.fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, torch.device):
        return a.type
    return repr(a)


def _fmt_target(t):
    if t is operator.getitem:
        return "getitem"
    name = str(t)
    for prefix in ("aten.", "prims.", "inductor_lce."):
        if name.startswith(prefix):
            return name[: -len(".default")] if name.endswith(".default") else name
    return getattr(t, "__name__", name)


def format_graph(graph) -> str:
    """One line per node: ``name: shape = op(args)`` — stable and readable for snapshots."""
    lines = []
    for n in graph.nodes:
        if n.op == "placeholder":
            lines.append(f"{n.name}: {_fmt_shape(n)} = input")
        elif n.op == "output":
            lines.append(f"return {_fmt_arg(n.args[0])}")
        else:
            args = [_fmt_arg(a) for a in n.args]
            args += [f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items() if k not in ("layout", "pin_memory", "device")]
            lines.append(f"{n.name}: {_fmt_shape(n)} = {_fmt_target(n.target)}({', '.join(args)})")
    return "\n".join(lines)


def _fmt_shape(n):
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}" for x in v if isinstance(x, torch.Tensor)) + ")"
    return type(v).__name__ if v is not None else "?"
