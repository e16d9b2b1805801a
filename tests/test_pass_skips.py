"""What is not the pattern is left alone, and the reason is counted and logged."""
import logging

import pytest
import torch
import torch.nn.functional as F

import inductor_lce
from helpers import compile_recorded, rewrites, saved_numels, skips

V, D = 97, 24


def _inputs(grad=True):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, D, generator=g, requires_grad=grad)
    w = torch.randn(V, D, generator=g, requires_grad=grad)
    y = torch.randint(0, V, (3, 7), generator=g)
    return h, w, y


def logits_returned(h, w, y):
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits


def logits_used_twice(h, w, y):
    logits = F.linear(h, w).float().flatten(0, 1)
    return F.cross_entropy(logits, y.flatten()) + 1e-3 * logits.pow(2).mean()


def smoothing_by_mean(h, w, y):
    """Label smoothing written by hand with a mean over the classes (F.cross_entropy's sum is fused)."""
    logp = F.log_softmax(F.linear(h, w).float().flatten(0, 1), dim=-1)
    return 0.9 * F.nll_loss(logp, y.flatten()) - 0.1 * logp.mean(-1).mean()


def entropy_bonus(h, w, y):
    logp = F.log_softmax(F.linear(h, w).float().flatten(0, 1), dim=-1)
    return F.nll_loss(logp, y.flatten()) + 0.01 * (logp.exp() * logp).sum(-1).mean()


def logsumexp_before_softcap(h, w, y):
    logits = F.linear(h, w).float()
    capped = torch.tanh(logits / 5.0) * 5.0
    return F.cross_entropy(capped.flatten(0, 1), y.flatten()) + 1e-3 * torch.logsumexp(logits, -1).square().mean()


def class_weights(h, w, y):
    weight = torch.linspace(0.5, 1.5, V)
    return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), weight=weight)


def no_upcast_bf16(h, w, y):
    return F.cross_entropy(F.linear(h.bfloat16(), w.bfloat16()).flatten(0, 1), y.flatten())


def not_a_linear(h, w, y):
    return F.cross_entropy((h.flatten(0, 1) @ w.t()).tanh(), y.flatten())


@pytest.mark.parametrize(
    "fn, reason",
    [
        (logits_returned, "skip_logits_returned"),
        (logits_used_twice, "skip_logits_other_users"),
        (smoothing_by_mean, "skip_label_smoothing"),
        (entropy_bonus, "skip_log_softmax_other_users"),
        (logsumexp_before_softcap, "skip_logits_other_users"),
        (class_weights, "skip_class_weights"),
        (no_upcast_bf16, "skip_not_fp32"),
        (not_a_linear, "skip_logits_path_op"),
    ],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_not_the_pattern_is_left_alone(fn, reason, caplog):
    h, w, y = _inputs()
    compiled, _ = compile_recorded(fn)
    with caplog.at_level(logging.INFO, logger="inductor_lce"):
        out = compiled(h, w, y)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
    assert rewrites() == 0
    assert skips() == {reason: 1}, skips()
    assert any("not rewritten" in r.getMessage() and reason[len("skip_"):] in r.getMessage() for r in caplog.records)
    ref = fn(h, w, y)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)


def test_post_grad_slot_on_training_graph_skips_and_warns():
    h, w, y = _inputs()
    fn = lambda h, w, y: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": inductor_lce.LinearCrossEntropyPass()})
    import inductor_lce.graph.driver as driver
    driver._warned_post_grad_training = False
    with pytest.warns(UserWarning, match="joint-graph slot"):
        compiled(h, w, y).backward()
    assert rewrites() == 0
    assert skips() == {"skip_post_grad_training": 1}


def test_post_grad_slot_rewrites_inference_graph():
    h, w, y = _inputs(grad=False)
    fn = lambda h, w, y: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": inductor_lce.LinearCrossEntropyPass()})
    torch.testing.assert_close(compiled(h, w, y), fn(h, w, y), rtol=1e-5, atol=1e-6)
    assert rewrites() == 1


def test_structure_check_sees_logits_without_the_pass():
    """The memory-structure assertion used everywhere can fail: without a rewrite the
    partitioned forward saves an [N, V] tensor."""
    h, w, y = _inputs()
    compiled, rec = compile_recorded(logits_used_twice)
    compiled(h, w, y).backward()
    assert rewrites() == 0
    assert max(saved_numels(rec["post_grad"])) >= 21 * V
