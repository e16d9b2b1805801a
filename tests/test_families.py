"""Loss code as libraries write it (beyond the textbook pattern): every loss site is rewritten,
results equal eager, and the partitioned forward saves nothing of N * V elements."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from helpers import compile_recorded, rewrites, saved_numels, skips

V, D, B, T = 97, 24, 2, 8


def ce_module(h, w, y):
    return nn.CrossEntropyLoss()(F.linear(h, w).float().flatten(0, 1), y.flatten())


def log_softmax_then_nll(h, w, y):
    return F.nll_loss(F.log_softmax(F.linear(h, w).float(), dim=-1).flatten(0, 1), y.flatten())


def multi_token_prediction(h, w, y):
    """Two heads sharing the lm_head: next token and the one after."""
    l1 = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    h2 = torch.tanh(h)
    l2 = F.cross_entropy(F.linear(h2[:, :-1], w).float().flatten(0, 1), y[:, 1:].flatten())
    return l1 + 0.5 * l2


def tied_embeddings(h, w, y):
    x = F.embedding(y.clamp(min=0), w) + h
    return F.cross_entropy(F.linear(x, w).float().flatten(0, 1), y.flatten())


def torchtune_chunked(h, w, y):
    """CEWithChunkedOutputLoss: the user chunks the hidden states and upcasts per chunk."""
    total = 0
    for hc, yc in zip(h.chunk(4, dim=1), y.chunk(4, dim=1)):
        total = total + F.cross_entropy(F.linear(hc, w).float().reshape(-1, V), yc.reshape(-1), reduction="sum")
    return total / (y != -100).sum()


def checkpointed_head(h, w, y):
    head = lambda h, w: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    return checkpoint(head, h, w, use_reentrant=False)


def grad_accumulation(h, w, y):
    """Micro-batches in one compiled step, summed."""
    return sum(F.cross_entropy(F.linear(hb, w).float(), yb) for hb, yb in zip(h.unbind(0), y.unbind(0))) / B


BIAS = torch.randn(V, generator=torch.Generator().manual_seed(3))


def linear_bias(h, w, y):
    """nn.Linear(bias=True) head: addmm in the graph; the bias gradient is rewritten too."""
    return F.cross_entropy(F.linear(h, w, BIAS).float().flatten(0, 1), y.flatten())


def none_then_weighted(h, w, y):
    """reduction="none" followed by the user's own per-token weighting."""
    per_token = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), reduction="none")
    weights = torch.linspace(0.1, 1.0, per_token.numel())
    return (per_token * weights).sum() / weights.sum()


FAMILIES = [
    (linear_bias, 1),
    (none_then_weighted, 1),
    (ce_module, 1),
    (log_softmax_then_nll, 1),
    (multi_token_prediction, 2),
    (tied_embeddings, 1),
    (torchtune_chunked, 4),
    (checkpointed_head, 1),
    (grad_accumulation, B),
]


@pytest.mark.parametrize("fn, sites", FAMILIES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_family(fn, sites):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3] = -100
    compiled, rec = compile_recorded(fn)
    out = compiled(h, w, y)
    out.backward()
    got = (out.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = fn(h, w, y)
    ref.backward()
    for a, e in zip(got, (ref.detach(), h.grad, w.grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert rewrites() == sites, skips()
    assert not skips()
    assert max(saved_numels(rec["post_grad"])) < T * V


def test_bias_gradient():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    fn = lambda h, w, b, y: F.cross_entropy(F.linear(h, w, b).float().flatten(0, 1), y.flatten())
    compiled, rec = compile_recorded(fn)
    compiled(h, w, b, y).backward()
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    fn(h, w, b, y).backward()
    for a, t in zip(got, (h, w, b)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)
    assert rewrites() == 1 and max(saved_numels(rec["post_grad"])) < T * V
