"""Expand the Triton ops inside an already-traced graph, so Inductor emits their kernels itself.

A ``triton_op`` is decomposed into its kernels only while AOTAutograd traces (functionalization). The
graph pass inserts ``lce_forward_triton`` / ``lce_backward_triton`` into the *joint* graph, after that
trace, so Inductor would treat them as opaque fallbacks that launch the kernels from Python at run time.
``inline_triton_ops(graph)`` replays what AOTAutograd would have done: it traces each such node's
implementation under ``FunctionalTensorMode`` (``triton_kernel_wrapper_functional`` nodes, aten matmuls,
the slab loop unrolled) with the node's fake inputs, and splices that graph in place of the node. Run it
on the joint graph after the rewrite (``InlineTritonOps`` is the same as a ``CustomGraphPass``); the
partitioner then splits the kernels between forward and backward and Inductor's reinplacing removes
the functional copies.

Status (H100, torch 2.11, bench/NOTES.md): correct at every shape measured, and faster than the fallback
on a small problem (4096x1024x32000: 2.23 ms against 2.78 ms), but at the benchmark shapes Inductor's
backward keeps every grad_logits slab alive at once (+1.0 / +2.0 / +4.0 GB over the gradients, i.e. the
whole [N, V] logits) and is slower than the fallback. Nothing orders slab i+1's logits after slab i's
grad_hidden update except memory, which Inductor's schedule does not weigh; making each slab's
grad_logits kernel take the previous slab's grad_hidden state as an input would force the order (not
done yet). Until then the opaque fallback (do not inline) is the recommended way.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

__all__ = ["inline_triton_ops", "InlineTritonOps"]


def _targets():
    ops = torch.ops.inductor_lce
    return (ops.lce_forward_triton.default, ops.lce_backward_triton.default)


def _trace(node: Node, fake_mode):
    """Functional graph of ``node``'s op on its fake inputs; returns (GraphModule, positions of tensor args)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    schema_args = torch.fx.operator_schemas.normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=False)
    args = list(schema_args.args) if schema_args is not None else list(node.args)
    if schema_args is not None and schema_args.kwargs:
        names = [a.name for a in node.target._schema.arguments]
        args += [schema_args.kwargs[n] for n in names[len(args):]]
    vals = [a.meta["val"] if isinstance(a, Node) else a for a in args]
    tensor_pos = [i for i, v in enumerate(vals) if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        full = list(vals)
        for i, t in zip(tensor_pos, tensors):
            full[i] = t
        return node.target(*full)

    try:  # the decompositions AOTAutograd applies for Inductor (e.g. aten.all), as if traced there
        from torch._inductor.decomposition import select_decomp_table

        decompositions = select_decomp_table()
    except ImportError:  # pragma: no cover
        decompositions = None
    with fake_mode:
        gm = make_fx(dispatch_functionalize(fn), decomposition_table=decompositions,
                     tracing_mode="real")(*[vals[i] for i in tensor_pos])
    return gm, [args[i] for i in tensor_pos]


def inline_triton_ops(graph: Graph) -> int:
    """Replace every lce_forward_triton / lce_backward_triton node of ``graph`` by its kernels; returns how many."""
    from torch._guards import detect_fake_mode

    targets = _targets()
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target in targets]
    if not nodes:
        return 0
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    if fake_mode is None:
        return 0
    for node in nodes:
        gm, tensor_args = _trace(node, fake_mode)
        env = {}
        placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
        for p, outer in zip(placeholders, tensor_args):
            env[p] = outer
        outputs = None
        inserted = []
        with graph.inserting_before(node):
            for sub in gm.graph.nodes:
                if sub.op == "placeholder":
                    continue
                if sub.op == "output":
                    outputs = torch.fx.node.map_arg(sub.args[0], lambda x: env[x])
                    continue
                if sub.op == "get_attr":
                    raise RuntimeError("inline_triton_ops: traced implementation holds constants")
                new = graph.node_copy(sub, lambda x: env[x])
                new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "seq_nr", "nn_module_stack")
                                 and k not in new.meta})
                env[sub] = new
                inserted.append(new)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
            else:
                raise RuntimeError(f"inline_triton_ops: unexpected user {user.format_node()}")
        graph.erase_node(node)
        for new in reversed(inserted):  # e.g. unused getitems of the functional kernel wrappers
            if not new.users and not new.is_impure():
                graph.erase_node(new)
    return len(nodes)


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # pragma: no cover
    CustomGraphPass, get_hash_for_files = object, None


class InlineTritonOps(CustomGraphPass):
    """``inline_triton_ops`` as an Inductor graph pass (joint_custom_pre_pass / post_grad slots)."""

    def __call__(self, graph: Graph) -> None:
        inline_triton_ops(graph)

    def uuid(self):
        if get_hash_for_files is None:
            return None
        import os

        here = os.path.dirname(os.path.abspath(__file__))
        dirs = (here, os.path.join(os.path.dirname(here), "kernels"))  # the host code and the kernels it inlines
        files = sorted(os.path.join(d, f) for d in dirs for f in os.listdir(d) if f.endswith(".py"))
        return get_hash_for_files(tuple(files))
