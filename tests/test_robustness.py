"""Randomized agreement with eager, edge cases, errors, and failure containment."""
import random

import pytest
import torch
import torch.nn.functional as F

import inductor_lce
import inductor_lce.graph.match as graph_match
import inductor_lce.graph.rewrite as graph_rewrite
import loss_patterns as P
from helpers import rewrites, skips
from torch._dynamo.utils import counters

CASES_PER_COMBO = 20


def _case(rng, pattern, dtype, ignore_index):
    """Random shapes (ragged, V not a multiple of anything, N=1 at times) and labels."""
    B = rng.choice([1, 2, 3])
    T = rng.choice([2, 3, 7, 16])
    D = rng.choice([8, 24])
    V = rng.choice([2, 5, 33, 130]) if ignore_index < 2 else rng.choice([33, 130])  # V=1: own test
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    lead = (B * T,) if pattern in P.PATTERNS_2D else (B, T)
    h = torch.randn(*lead, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, lead, generator=g)
    frac = rng.choice([0.0, 0.1, 0.5, 0.95, 1.0])
    y[torch.rand(lead, generator=g) < frac] = ignore_index
    return h, w, y


def _run(fn, h, w, y, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, y, **kw)
    cot = torch.ones_like(loss) if loss.dim() else None
    loss.backward(cot)
    return loss.detach(), h.grad.clone(), w.grad.clone()


COMBOS = [
    (P.plain_2d, "mean", torch.float32, -100),
    (P.plain_2d, "sum", torch.bfloat16, 0),
    (P.view_3d, "none", torch.float32, -100),
    (P.flatten_3d, "sum", torch.float32, 3),
    (P.reshape_3d, "mean", torch.bfloat16, -100),
    (P.shift_slice, "mean", torch.float32, -100),
    (P.shift_slice, "none", torch.bfloat16, -1),
    (P.shift_pad, "sum", torch.float32, -100),
    (P.shift_pad, "mean", torch.bfloat16, -100),
    (P.view_3d, "mean", torch.bfloat16, 1),
    (P.label_smoothed, "mean", torch.float32, -100),
    (P.label_smoothed, "none", torch.bfloat16, 0),
    (P.softcapped_z_loss, "sum", torch.float32, -100),
    (P.softcapped_z_loss, "mean", torch.bfloat16, -100),
    (P.all_features_shifted, "mean", torch.float32, -1),
]


@pytest.mark.parametrize("pattern, reduction, dtype, ignore_index", COMBOS,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_randomized_against_eager(pattern, reduction, dtype, ignore_index):
    """CASES_PER_COMBO random cases per combination (300 in all), one dynamic compile each."""
    rng = random.Random(f"{pattern.__name__}-{reduction}-{dtype}-{ignore_index}")
    compiled = torch.compile(pattern, options=inductor_lce.options(), dynamic=True)
    for i in range(CASES_PER_COMBO):
        h, w, y = _case(rng, pattern, dtype, ignore_index)
        got = _run(compiled, h, w, y, ignore_index=ignore_index, reduction=reduction)
        if dtype == torch.float32:
            want = _run(pattern, h, w, y, ignore_index=ignore_index, reduction=reduction)
            tol = dict(rtol=1e-5, atol=1e-5)
        else:  # compare with the fp32 computation; bf16 eager itself is this far off
            hf, wf = (t.detach().float().requires_grad_() for t in (h, w))
            want = _run(pattern, hf, wf, y, ignore_index=ignore_index, reduction=reduction)
            tol = dict(rtol=2e-2, atol=2e-2)
        for a, e in zip(got, want):
            torch.testing.assert_close(a.float(), e.float(), equal_nan=True, **tol, msg=lambda m: f"case {i}: {m}")
    assert rewrites() >= 1 and not skips(), skips()


def test_vocabulary_of_one():
    """V=1: Inductor turns the backward matmuls into broadcasts; the pass may decline, but
    the result must be right and the decision counted."""
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(1, 8, requires_grad=True)
    y = torch.zeros(4, dtype=torch.long)
    got = _run(torch.compile(P.plain_2d, options=inductor_lce.options()), h, w, y)
    want = _run(P.plain_2d, h, w, y)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert rewrites() + sum(skips().values()) >= 1


def test_labels_ignored_only_at_the_shift_boundary():
    """The first label of each sequence is never predicted; ignore exactly those."""
    h = torch.randn(3, 6, 8, requires_grad=True)
    w = torch.randn(33, 8, requires_grad=True)
    y = torch.randint(0, 33, (3, 6))
    y[:, 0] = -100
    for pattern in (P.shift_slice, P.shift_pad):
        torch._dynamo.reset()
        got = _run(torch.compile(pattern, options=inductor_lce.options()), h, w, y)
        want = _run(pattern, h, w, y)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad_label", [33, -5])
def test_out_of_range_label_raises_like_eager(bad_label):
    h = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(33, 8, requires_grad=True)
    y = torch.randint(0, 33, (2, 4))
    y[1, 2] = bad_label
    with pytest.raises(IndexError, match="out of bounds"):
        P.view_3d(h, w, y)
    with pytest.raises(IndexError, match=f"Target {bad_label} is out of bounds"):
        torch.compile(P.view_3d, options=inductor_lce.options())(h, w, y)
    assert rewrites() == 1


def _inputs():
    return torch.randn(2, 4, 8, requires_grad=True), torch.randn(33, 8, requires_grad=True), torch.randint(0, 33, (2, 4))


def test_matcher_failure_leaves_graph_alone(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("matcher bug")

    monkeypatch.setattr(graph_match, "match_logits_chain", broken)
    h, w, y = _inputs()
    got = _run(torch.compile(P.view_3d, options=inductor_lce.options()), h, w, y)
    for a, e in zip(got, _run(P.view_3d, h, w, y)):
        torch.testing.assert_close(a, e)
    assert rewrites() == 0 and skips() == {"skip_matcher_error": 1}


def test_rewrite_failure_restores_graph(monkeypatch):
    def broken(device_type):
        raise RuntimeError("rewrite bug")

    monkeypatch.setattr(graph_rewrite, "ops_for", broken)
    h, w, y = _inputs()
    got = _run(torch.compile(P.shift_slice, options=inductor_lce.options()), h, w, y)
    for a, e in zip(got, _run(P.shift_slice, h, w, y)):
        torch.testing.assert_close(a, e)
    assert rewrites() == 0 and skips() == {"skip_rewrite_error": 1}
