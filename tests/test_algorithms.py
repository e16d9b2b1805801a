"""Which algorithm each site takes, and that both stay exact.

``three_gemm`` (``lce_fused``: loss and gradients in one pass over row chunks) needs the same incoming
gradient on every scored token: mean, sum, sum / num_items_in_batch, ``none`` followed by a mean or a
sum, any constant factor. Per-token weights, z-loss and label smoothing take ``recompute``
(``lce_forward`` + ``lce_backward``), as does everything with ``options(lean=True)``. Both are
compared with eager in float64 (1e-6 relative), with the incoming gradient of the loss != 1.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import inductor_lce
import loss_patterns as P
from helpers import compile_recorded, format_graph, rel_err, rewrites, saved_numels, skips

V, D = 13, 8


def _inputs(shape=(2, 6), bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[::4] = -100
    return h, w, b, y


def _grads(fn, tensors, args, upstream=2.5):
    for t in tensors:
        t.grad = None
    out = fn(*args)
    (out * upstream).backward()
    return out.detach(), [t.grad.clone() for t in tensors]


def _check(fn, *, lean=False, expect, bias=False, shape=(2, 6)):
    h, w, b, y = _inputs(shape, bias)
    args = (h, w, y) if b is None else (h, w, b, y)
    tensors = [t for t in (h, w, b) if t is not None]
    ref, ref_grads = _grads(fn, tensors, args)
    counters.clear()
    compiled = torch.compile(fn, options=inductor_lce.options(lean=lean))
    out, grads = _grads(compiled, tensors, args)
    algorithms = {k[len("algorithm_"):]: v for k, v in counters["inductor_lce"].items() if k.startswith("algorithm_")}
    assert algorithms == expect, (algorithms, skips())
    # the ops compute in fp32 (like eager's `.float()` loss on fp32 logits), so 1e-6 against float64 eager
    assert rel_err(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-6


def mean(h, w, y):
    return P.view_3d(h, w, y)


def summed(h, w, y):
    return P.view_3d(h, w, y, reduction="sum")


def num_items(h, w, y):
    # HF: sum / num_items_in_batch (here a count the forward computes)
    return P.shift_pad(h, w, y, reduction="sum") / (y != -100).sum().clamp_min(1)


def none_then_mean(h, w, y):
    return P.view_3d(h, w, y, reduction="none").mean()


def scaled_mean(h, w, y):
    return 0.25 * P.shift_slice(h, w, y)


def count_after_sum(h, w, y):
    # the forward factor (1 / count) is computed after the loss: the pass hoists it
    total = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), reduction="sum")
    count = (y != -100).sum()
    return total / count


def per_token_weights(h, w, y):
    loss = P.view_3d(h, w, y, reduction="none")
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    return (loss * weights).sum()


def scale_from_loss(h, w, y):
    # the gradient's scale needs the loss itself: cannot be computed before the fused op
    loss = P.view_3d(h, w, y, reduction="none")
    return loss.sum() / loss.detach().sum()


def with_bias(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).float().flatten(0, 1), y.flatten())


@pytest.mark.parametrize("fn", [mean, summed, num_items, none_then_mean, scaled_mean, count_after_sum])
def test_same_gradient_for_every_token_takes_three_gemm(fn):
    _check(fn, expect={"three_gemm": 1})


def test_bias_takes_three_gemm():
    _check(with_bias, bias=True, expect={"three_gemm": 1})


@pytest.mark.parametrize("fn", [per_token_weights, scale_from_loss, P.label_smoothed, P.softcapped_z_loss])
def test_per_token_gradients_take_recompute(fn):
    _check(fn, expect={"recompute": 1})


@pytest.mark.parametrize("fn", [mean, num_items, per_token_weights])
def test_lean_always_recomputes(fn):
    _check(fn, lean=True, expect={"recompute": 1})


def test_softcap_three_gemm():
    def gemma(h, w, y):
        logits = torch.tanh(F.linear(h, w) / 3.0) * 3.0
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    _check(gemma, expect={"three_gemm": 1})


def test_two_sites_two_algorithms():
    """Multi-token prediction: one head's mean loss (three_gemm) and one head's per-token weighted loss
    (recompute) in one graph."""
    def two_heads(h, w, y):
        weights = torch.linspace(0.0, 2.0, y.numel(), dtype=h.dtype)
        first = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
        second = F.cross_entropy(F.linear(torch.tanh(h), w).float().flatten(0, 1), y.roll(1, 1).flatten(),
                                 reduction="none")
        return first + (second * weights).sum()
    _check(two_heads, expect={"three_gemm": 1, "recompute": 1})


def test_inference_graph_is_forward_only():
    h, w, _, y = _inputs()
    counters.clear()
    with torch.no_grad():
        out = torch.compile(mean, options=inductor_lce.options())(h, w, y)
        ref = mean(h, w, y)
    assert counters["inductor_lce"]["algorithm_recompute"] == 1
    assert rel_err(out, ref) < 1e-6


def test_three_gemm_saves_gradients_not_logits():
    """Memory structure: the partitioned forward saves grad_hidden / grad_weight-sized tensors and nothing
    of N * V elements; the backward only scales them (no matmul left in it)."""
    N, Vb, Db = 48, 997, 4   # N * V much larger than V * D and N * D
    h = torch.randn(N, Db, requires_grad=True)
    w = torch.randn(Vb, Db, requires_grad=True)
    y = torch.randint(0, Vb, (N,))
    compiled, rec = compile_recorded(P.plain_2d)
    compiled(h, w, y).backward()
    assert counters["inductor_lce"]["algorithm_three_gemm"] == 1
    assert max(saved_numels(rec["post_grad"])) < N * Vb
    backward = "\n".join(g for kind, g, _ in rec["post_grad"].of_kind("backward"))
    assert "aten.mm" not in backward and "lce_" not in backward, backward


def test_upstream_gradient_other_than_one_is_exact_in_bf16():
    """The backward multiplies the forward's bf16 gradients by the incoming gradient: with T = 1 that is
    exact; with a power of two as well (gradient accumulation over 2^k steps)."""
    torch.manual_seed(0)
    h = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(50, 32, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 50, (64,))
    compiled = torch.compile(P.plain_2d, options=inductor_lce.options())
    compiled(h, w, y).backward()
    g1 = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    (compiled(h, w, y) * 0.25).backward()
    assert torch.equal(h.grad, g1[0] * 0.25) and torch.equal(w.grad, g1[1] * 0.25)


def test_head_and_loss_region_recipe():
    """README's recipe for stacks that compile the loss apart from the output projection: the loss compiled
    alone sees the logits as an input and is left alone (skip counted); norm + output + loss compiled as one
    region is rewritten (three GEMMs) and stays exact."""
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(D, dtype=torch.float64)
    output = torch.nn.Linear(D, V, bias=False, dtype=torch.float64)
    h, _, _, y = _inputs()

    def loss_only(logits, labels):
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def head_and_loss(h, labels):
        return loss_only(output(norm(h)), labels)

    counters.clear()
    torch.compile(loss_only, options=inductor_lce.options())(output(norm(h)), y).backward()
    assert rewrites() == 0 and skips(), dict(counters["inductor_lce"])
    params = [h, norm.weight, output.weight]
    ref, ref_grads = _grads(head_and_loss, params, (h, y))
    counters.clear()
    out, grads = _grads(torch.compile(head_and_loss, options=inductor_lce.options()), params, (h, y))
    assert rewrites() == 1 and counters["inductor_lce"]["algorithm_three_gemm"] == 1, dict(counters["inductor_lce"])
    assert rel_err(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-6
