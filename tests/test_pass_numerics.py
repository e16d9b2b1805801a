"""Compiled with the pass == eager, the rewrite happened, and nothing [N, V] is saved."""
import pytest
import torch

import loss_patterns as P
from helpers import compile_recorded, rel_err, rewrites, saved_numels, skips

V = 97  # not a multiple of any block size
D = 24


def _inputs(pattern, dtype, ignore_index, seed=0, n_tokens=(3, 11), frac_ignored=0.25, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    lead = (n_tokens[0] * n_tokens[1],) if pattern in P.PATTERNS_2D else n_tokens
    h = torch.randn(*lead, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, lead, generator=g)
    if all_ignored:
        y.fill_(ignore_index)
    else:
        y[torch.rand(lead, generator=g) < frac_ignored] = ignore_index
    return h, w, y


def _run(fn, h, w, y, cotangent_seed=1, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, y, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(cotangent_seed)) if loss.dim() else None
    loss.backward(g)
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _check(pattern, dtype, ignore_index, reduction, **input_kw):
    h, w, y = _inputs(pattern, dtype, ignore_index, **input_kw)
    compiled, rec = compile_recorded(pattern)
    got = _run(compiled, h, w, y, ignore_index=ignore_index, reduction=reduction)
    assert rewrites() == 1, skips()
    eager = _run(pattern, h, w, y, ignore_index=ignore_index, reduction=reduction)
    if dtype == torch.float32:
        for a, e in zip(got, eager):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True)
    else:
        # Reference: the same loss on fp32 copies of the inputs. Our error may not exceed
        # eager's own (bf16 vs fp32) by more than 25% (+ a hair for exact-zero cases).
        hf, wf = (t.detach().float().requires_grad_() for t in (h, w))
        ref = _run(pattern, hf, wf, y, ignore_index=ignore_index, reduction=reduction)
        for a, e, r in zip(got, eager, ref):
            assert torch.isnan(a).equal(torch.isnan(r))
            assert rel_err(a.nan_to_num(), r.nan_to_num()) <= 1.25 * rel_err(e.nan_to_num(), r.nan_to_num()) + 1e-6
    n, v = y.numel(), V
    assert rec["post_grad"].of_kind("forward"), "no partitioned forward graph was seen"
    assert max(saved_numels(rec["post_grad"])) < n * v, rec["post_grad"].of_kind("forward")[0][2]
    return got


@pytest.mark.parametrize("pattern", P.ALL, ids=lambda p: p.__name__)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pattern_matches_eager(pattern, reduction, dtype):
    _check(pattern, dtype, -100, reduction)


@pytest.mark.parametrize("pattern", [P.plain_2d, P.shift_slice, P.shift_pad], ids=lambda p: p.__name__)
@pytest.mark.parametrize("ignore_index", [0, 5, -1])
def test_any_ignore_index(pattern, ignore_index):
    _check(pattern, torch.float32, ignore_index, "mean")


@pytest.mark.parametrize("pattern", [P.view_3d, P.shift_slice], ids=lambda p: p.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_labels_ignored_gives_nan_like_eager(pattern, dtype):
    loss, gh, gw = _check(pattern, dtype, -100, "mean", all_ignored=True)
    assert torch.isnan(loss)
    assert not gh.isnan().any() and not gw.isnan().any()


@pytest.mark.parametrize("pattern", [P.plain_2d, P.shift_pad], ids=lambda p: p.__name__)
def test_no_labels_ignored(pattern):
    _check(pattern, torch.float32, -100, "mean", frac_ignored=0.0)


def test_single_token():
    _check(P.plain_2d, torch.float32, -100, "mean", n_tokens=(1, 1), frac_ignored=0.0)


def test_ragged_shapes():
    _check(P.shift_slice, torch.float32, -100, "sum", n_tokens=(5, 3))


def test_module_training_steps_match_eager():
    torch.manual_seed(0)
    model = P.TinyLM()
    ref_model = P.TinyLM()
    ref_model.load_state_dict(model.state_dict())
    compiled, rec = compile_recorded(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    tokens = torch.randint(0, 97, (4, 9))
    labels = tokens.clone()
    labels[:, :2] = -100
    for _ in range(3):
        loss = compiled(tokens, labels)
        loss.backward()
        opt.step(); opt.zero_grad()
        ref_loss = ref_model(tokens, labels)
        ref_loss.backward()
        ref_opt.step(); ref_opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert rewrites() >= 1
    assert max(saved_numels(rec["post_grad"])) < 4 * 9 * 97


@pytest.mark.parametrize("pattern", [P.view_3d, P.shift_slice, P.shift_pad], ids=lambda p: p.__name__)
def test_inference_no_grad(pattern):
    h, w, y = _inputs(pattern, torch.float32, -100)
    compiled, rec = compile_recorded(pattern)
    with torch.no_grad():
        got = compiled(h, w, y)
    assert rewrites() == 1
    torch.testing.assert_close(got, pattern(h.detach(), w.detach(), y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", [P.plain_2d, P.view_3d, P.shift_slice, P.shift_pad] + P.FEATURES_3D,
                         ids=lambda p: p.__name__)
def test_dynamic_shapes_one_graph_for_all_lengths(pattern):
    compiled, rec = compile_recorded(pattern, dynamic=True)
    for seq in (5, 9, 14):
        h, w, y = _inputs(pattern, torch.float32, -100, seed=seq, n_tokens=(2, seq))
        got = _run(compiled, h, w, y)
        eager = _run(pattern, h, w, y)
        for a, e in zip(got, eager):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert rewrites() == 1, skips()          # compiled once, rewritten once
    assert len(rec["joint_before"].graphs) == 1


def test_mark_dynamic_token_dim():
    compiled, rec = compile_recorded(P.shift_slice)
    for seq in (6, 10):
        h, w, y = _inputs(P.shift_slice, torch.bfloat16, -100, seed=seq, n_tokens=(2, seq))
        torch._dynamo.mark_dynamic(h, 1)
        torch._dynamo.mark_dynamic(y, 1)
        _run(compiled, h, w, y)
    assert rewrites() == 1 and len(rec["joint_before"].graphs) == 1
