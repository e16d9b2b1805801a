"""Data-parallel training on the CPU: 2 processes, gloo, fp32.

A small decoder (embedding, two pre-norm RMSNorm + MLP blocks, final RMSNorm, lm head; the loss
``F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)`` computed in the
model's forward, so the head and the loss are inside the compiled region) is trained for STEPS SGD
steps on per-rank data, once as the plain data-parallel model and once as
``torch.compile(data_parallel_model, options=inductor_lce.options())``, from the same init:

* DDP with ``bucket_cap_mb=1``: Dynamo's DDP optimizer (``torch._dynamo.config.optimize_ddp``) splits
  the compiled graph at DDP's bucket boundaries and compiles (and runs the joint pass on) each piece
  alone. 1 MiB is the smallest cap it accepts (its first bucket is fixed at
  ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`` = 1 MiB and a smaller ``bucket_cap_mb`` raises), so
  the parameters are sized in MiB (V x D = 4099 x 64 fp32 is 1 MiB) to give several buckets.
* FSDP2: ``fully_shard`` on every block and on the root. Dynamo graph-breaks at each FSDP-wrapped
  block (FSDP2 calls ``torch._dynamo.disable`` in its hooks), so where the head and the loss end up
  depends on where the loop over the blocks is: with the decoder body in a submodule (Hugging Face's
  layout) they are compiled together in the graph after the body; with the loop in the same forward
  as the loss, Dynamo skips that whole frame and the loss runs eagerly (xfail, reason at the test).

Each worker writes its losses, full gradients (DTensor gradients gathered with ``.full_tensor()``),
``counters["inductor_lce"]`` and the joint graphs it compiled to a file; the parent asserts on them.
"""
from __future__ import annotations

import copy
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
V, D, HIDDEN, LAYERS = 4099, 64, 1024, 2  # lm head and embedding 1 MiB each, a block 0.5 MiB
B, T = 2, 12  # per rank
STEPS = 2
# Compiled (the fused op sums logits and gradients in row chunks, in another order) vs the uncompiled
# data-parallel model, fp32. Seen on CPU (torch 2.13): loss off by <= 9.6e-7 (1 ulp at ~8.5); every
# gradient within rtol=1e-5 once atol >= 3.2e-9. The gradients are small (the largest entry of the
# smallest one is ~5e-3), so atol is scaled down from the 1e-6 other tests use for O(1) gradients.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=3e-8)
TIMEOUT_S = 240  # per test, both workers together (about 15 s normally): a hang fails, not blocks CI
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    """Pre-norm residual SiLU MLP."""

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(D)
        self.up = nn.Linear(D, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, D, bias=False)

    def forward(self, x):
        return x + self.down(F.silu(self.up(self.norm(x))))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(D)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class CausalLM(nn.Module):
    """Hugging Face's layout: the decoder body (with the loop over blocks) is a submodule; the
    head and the loss are in this forward."""

    def __init__(self):
        super().__init__()
        self.model = Decoder()
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, ids, labels):
        logits = self.lm_head(self.model(ids))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


class FlatCausalLM(CausalLM):
    """Same parameters; the loop over the blocks is in the same forward as the head and the loss
    (nanoGPT's / torchtitan's layout)."""

    def forward(self, ids, labels):
        x = self.model.embed(ids)
        for block in self.model.blocks:
            x = block(x)
        logits = self.lm_head(self.model.norm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


MODELS = {"hf": CausalLM, "flat": FlatCausalLM}


def _batches(rank):
    """STEPS batches, different on each rank; about 20% of the labels ignored."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[torch.rand(B, T, generator=g) < 0.2] = -100
        out.append((ids, labels))
    return out


def _parallelize(model, kind):
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # a CPU mesh named explicitly: by default FSDP2 meshes the accelerator when there is one (the GPU machine),
    # and CPU parameters on a CUDA mesh crash the process (SIGSEGV, torch 2.11)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(model, params, batches):
    """STEPS SGD steps: per step the loss and the full (averaged over ranks) gradient of every parameter."""
    opt = torch.optim.SGD(params.values(), lr=0.1)
    steps = []
    for ids, labels in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels)
        loss.backward()
        grads = {}
        for name, p in params.items():  # same order on every rank: full_tensor() is a collective
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        steps.append((loss.detach().clone(), grads))
        opt.step()
    return steps


def _has_log_softmax(graph_text):
    """Whether a joint graph (helpers.format_graph) holds a log-softmax, as such or decomposed (amax,
    sub, exp, sum, log, sub): where the pass starts looking for a cross-entropy."""
    return "aten._log_softmax(" in graph_text or "aten.amax(" in graph_text


def _worker(rank, kind, model_name, port, out_dir):
    from torch._dynamo.utils import counters

    from helpers import compile_recorded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # as conftest.fresh_dynamo: no cache hit may skip the pass (and its counters)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.compile_threads = 1  # two ranks on two cores: no compile worker pool
    torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        torch.manual_seed(0)
        init = MODELS[model_name]()
        batches = _batches(rank)

        eager = _parallelize(copy.deepcopy(init), kind)
        want = _train(eager, dict(eager.named_parameters()), batches)

        model = _parallelize(copy.deepcopy(init), kind)
        compiled, rec = compile_recorded(model)  # torch.compile(model, options=inductor_lce.options()) + recorders
        got = _train(compiled, dict(model.named_parameters()), batches)

        joint = [text for _, text, _ in rec["joint_before"].of_kind("joint")]
        torch.save(dict(want=want, got=got, counters={k: int(v) for k, v in counters["inductor_lce"].items()},
                        joint_graphs=len(joint),
                        joint_graphs_with_loss=sum(_has_log_softmax(text) for text in joint)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(kind, model_name, tmp_path):
    """Both workers (spawned); a worker's exception is raised here with its traceback."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(kind, model_name, _free_port(), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{kind}: the workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def _check(results, min_joint_graphs):
    """Per rank and step: loss and every gradient as the uncompiled run; then the graph was split as
    expected, the loss was in one of the joint graphs and the pass rewrote it (and skipped nothing)."""
    for rank, res in enumerate(results):
        assert len(res["got"]) == len(res["want"]) == STEPS
        for step, ((loss, grads), (want_loss, want_grads)) in enumerate(zip(res["got"], res["want"])):
            where = f"rank {rank}, step {step}"
            torch.testing.assert_close(loss, want_loss, **LOSS_TOL, msg=lambda m: f"{where}, loss: {m}")
            assert grads.keys() == want_grads.keys() and len(grads) == 3 * LAYERS + 3
            for name, g in grads.items():
                assert g.shape == want_grads[name].shape and g.abs().max() > 0, (where, name)
                torch.testing.assert_close(g, want_grads[name], **GRAD_TOL, msg=lambda m: f"{where}, {name}: {m}")
    for rank, res in enumerate(results):
        facts = {k: res[k] for k in ("counters", "joint_graphs", "joint_graphs_with_loss")}
        assert res["joint_graphs"] >= min_joint_graphs, (rank, facts)
        assert res["joint_graphs_with_loss"] == 1, (rank, facts)
        assert res["counters"].get("rewrites", 0) >= 1, (rank, facts)
        assert not {k for k in res["counters"] if k.startswith("skip_")}, (rank, facts)


def test_ddp_graph_split(tmp_path):
    """DDP, bucket_cap_mb=1: the DDP optimizer splits the compiled model into 3 graphs (embedding +
    first norm | the rest of the blocks + final norm | lm head + loss). The lm head and the loss land
    in the same piece (walking the graph backwards from the output, it cuts only once a bucket holds
    1 MiB of parameters; the loss has none), which the pass rewrites on both ranks with nothing
    skipped. Losses and all-reduced gradients as uncompiled DDP's, both steps."""
    _check(_run("ddp", "hf", tmp_path), min_joint_graphs=3)


def test_fsdp2(tmp_path):
    """FSDP2 (fully_shard per block and on the root), decoder body in a submodule: Dynamo breaks the
    graph at the call of the body (a graph break inside it, at the FSDP hooks), runs it eagerly (each
    block and the final norm compiled as frames of their own) and compiles the rest, the lm head (on
    the root's all-gathered weight) and the loss, as one graph, which the pass rewrites on both ranks
    with nothing skipped. Losses and the full (reduce-scattered, then gathered) gradients as
    uncompiled FSDP2's, both steps."""
    _check(_run("fsdp2", "hf", tmp_path), min_joint_graphs=2)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Not the pass: with FSDP2, a loop over fully_shard-ed blocks in the same forward as the loss makes "
    "Dynamo skip that whole frame ('graph break in a for/while loop', at FSDP2's torch._dynamo.disable'd "
    "hooks), so the lm head and the loss run eagerly and never reach Inductor: no joint graph holds a "
    "log-softmax and counters['inductor_lce'] stays empty (no rewrite, no skip). Only the blocks and the "
    "final norm are compiled, as frames of their own. Put the body in a submodule (test_fsdp2)."))
def test_fsdp2_loop_over_blocks_next_to_the_loss(tmp_path):
    """FSDP2 with the blocks looped over in the root's forward, next to the head and the loss. The
    numbers match (everything compiled is checked first); what fails is that the loss is not compiled."""
    _check(_run("fsdp2", "flat", tmp_path), min_joint_graphs=2)
