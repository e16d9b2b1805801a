"""The op itself, eager: semantics of F.cross_entropy(F.linear(...).float()), errors, opcheck."""
import pytest
import torch
import torch.nn.functional as F

import inductor_lce
from inductor_lce.ops import lce_backward, lce_forward
from inductor_lce.reference import lce_backward_reference, lce_forward_reference


def eager(h, w, y, b=None, ignore_index=-100, reduction="mean", shift=False):
    logits = F.linear(h, w, b).float()
    if shift:
        logits, y = logits[..., :-1, :], y[..., 1:]
    out = F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=ignore_index, reduction=reduction)
    return out.view(y.shape) if reduction == "none" else out


def _inputs(lead, V, D, dtype, bias, ignore_index, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * D**-0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, lead, generator=g)
    y[torch.rand(lead, generator=g) < 0.3] = ignore_index
    return h, w, b, y


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype) if out.dim() else None
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g)


@pytest.mark.parametrize("lead", [(1,), (7,), (3, 5), (2, 1)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_matches_eager_fp64(lead, reduction, shift, bias, ignore_index):
    if shift and len(lead) < 2:
        lead = (2,) + lead
    h, w, b, y = _inputs(lead, 37, 16, torch.float64, bias, ignore_index)
    out = inductor_lce.linear_cross_entropy(h, w, y, b, ignore_index=ignore_index, reduction=reduction, shift=shift)
    ref = eager(h, w, y, b, ignore_index=ignore_index, reduction=reduction, shift=shift)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    for a, r in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)  # the loss runs in fp32 (.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_as_accurate_as_eager(dtype):
    h, w, b, y = _inputs((4, 33), 301, 64, dtype, False, -100)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    ref = eager(h64, w64, y)
    ref_grads = _grads(ref, (h64, w64))
    ours, theirs = inductor_lce.linear_cross_entropy(h, w, y), eager(h, w, y)
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
    assert rel(ours, ref) <= 1.25 * rel(theirs, ref) + 1e-6
    for a, e, r in zip(_grads(ours, (h, w)), _grads(theirs, (h, w)), ref_grads):
        assert rel(a, r) <= 1.25 * rel(e, r) + 1e-6


def test_all_ignored_mean_is_nan_like_eager():
    h, w, b, y = _inputs((3, 4), 37, 16, torch.float32, False, -100)
    y.fill_(-100)
    out = inductor_lce.linear_cross_entropy(h, w, y)
    assert torch.isnan(out) and torch.isnan(eager(h, w, y))
    gh, gw = _grads(out, (h, w))
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_chunking_does_not_change_the_result():
    h, w, b, y = _inputs((50,), 37, 16, torch.float64, True, -100)
    for softcap in (0.0, 2.5):
        full = lce_forward_reference(h, w, b, y, -100, softcap, chunk_size=1000)
        for chunk in (1, 7, 49):
            for a, r in zip(lce_forward_reference(h, w, b, y, -100, softcap, chunk_size=chunk), full):
                torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
        g, g_lse, g_sum = torch.randn(3, 50, dtype=torch.float32)
        full_b = lce_backward_reference(g, g_lse, g_sum, h, w, b, y, full[1], -100, softcap, chunk_size=1000)
        for a, r in zip(lce_backward_reference(g, g_lse, g_sum, h, w, b, y, full[1], -100, softcap, chunk_size=3),
                        full_b):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)  # fp32 sums in another order


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_lse_and_sum_logits_flow_like_eager(softcap):
    """All three outputs are differentiable: a z-loss on lse and label smoothing on sum_logits."""
    h, w, b, y = _inputs((9,), 37, 16, torch.float64, True, -100)
    loss, lse, sum_logits = lce_forward(h, w, b, y, -100, softcap)
    z = (lse ** 2).sum() + loss.sum() - 0.3 * sum_logits.sum()
    logits = F.linear(h, w, b).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = (torch.logsumexp(logits, -1) ** 2).sum() + F.cross_entropy(logits, y, reduction="sum") \
        - 0.3 * logits.sum()
    torch.testing.assert_close(z.double(), ref.double(), rtol=1e-6, atol=1e-6)
    for a, r in zip(torch.autograd.grad(z, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [False, True])
def test_label_smoothing_and_softcap_like_eager(reduction, shift):
    h, w, b, y = _inputs((3, 5), 37, 16, torch.float64, False, -100)
    ours = inductor_lce.linear_cross_entropy(h, w, y, reduction=reduction, shift=shift, label_smoothing=0.15,
                                             softcap=4.0)
    logits = torch.tanh(F.linear(h, w).float() / 4.0) * 4.0
    labels = y
    if shift:
        logits, labels = logits[:, :-1], y[:, 1:]
    theirs = F.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), reduction=reduction, label_smoothing=0.15)
    torch.testing.assert_close(ours.double(), theirs.double().view_as(ours), rtol=1e-6, atol=1e-6)
    for a, r in zip(_grads(ours, (h, w)), _grads(theirs, (h, w))):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_opcheck():
    h, w, b, y = _inputs((10,), 37, 16, torch.float32, True, -100)
    torch.library.opcheck(lce_forward, (h, w, b, y, -100))
    torch.library.opcheck(lce_forward, (h, w, None, y, -100, 3.0))
    loss, lse, _ = lce_forward(h, w, b, y, -100)
    for grads in ((torch.randn(10), torch.randn(10), torch.randn(10)), (torch.randn(10), None, None)):
        args = grads + (h.detach(), w.detach(), b.detach(), y, lse.detach(), -100, 2.0)
        torch.library.opcheck(lce_backward, args)


def test_traces_with_symbolic_shapes():
    f = torch.compile(inductor_lce.linear_cross_entropy, dynamic=True, fullgraph=True)
    for n in (5, 9):
        h, w, b, y = _inputs((n,), 37, 16, torch.float32, False, -100)
        torch.testing.assert_close(f(h, w, y), eager(h, w, y), rtol=1e-5, atol=1e-6)


def test_out_of_range_target_raises_like_eager():
    h, w, b, y = _inputs((5,), 37, 16, torch.float32, False, -100)
    y[2] = 37
    with pytest.raises(IndexError, match="Target 37 is out of bounds"):
        eager(h, w, y)
    with pytest.raises(IndexError, match="Target 37 is out of bounds"):
        inductor_lce.linear_cross_entropy(h, w, y)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(reduction="avg"), ValueError),
        (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError),
        (dict(labels=torch.zeros(5)), RuntimeError),
        (dict(weight=torch.randn(37, 15)), RuntimeError),
        (dict(label_smoothing=1.5), RuntimeError),
        (dict(softcap=-1.0), ValueError),
    ],
)
def test_bad_input_raises(kwargs, err):
    h, w, b, y = _inputs((5,), 37, 16, torch.float32, False, -100)
    args = dict(hidden=h, weight=w, labels=y)
    reduction = kwargs.pop("reduction", "mean")
    args.update(kwargs)
    with pytest.raises(err):
        inductor_lce.linear_cross_entropy(**args, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flat_labels_with_3d_hidden(reduction):
    """Labels flattened like F.cross_entropy's target ([B * T]) beside hidden [B, T, D]: the same loss and
    gradients as labels shaped [B, T]; `none` returns one value per row, flat like the labels."""
    h, w, b, y = _inputs((3, 5), 11, 4, torch.float64, False, -100)
    got = inductor_lce.linear_cross_entropy(h, w, y.flatten(), reduction=reduction)
    shaped = inductor_lce.linear_cross_entropy(h, w, y, reduction=reduction)
    ref = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), reduction=reduction)
    assert got.shape == ref.shape == (shaped.flatten() if reduction == "none" else shaped).shape
    assert torch.equal(got, shaped.flatten() if reduction == "none" else shaped)   # the same computation
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)                     # fp32 results, like .float()
    for a, r in zip(_grads(got, (h, w)), _grads(shaped.flatten() if reduction == "none" else shaped, (h, w))):
        assert torch.equal(a, r)


def test_label_shape_errors():
    """Labels neither hidden's leading shape nor flat: F.cross_entropy's error; shift needs the sequence dim."""
    h, w, b, y = _inputs((3, 5), 11, 4, torch.float64, False, -100)
    with pytest.raises(ValueError, match=r"Expected input batch_size \(15\) to match target batch_size \(14\)"):
        inductor_lce.linear_cross_entropy(h, w, y.flatten()[:14])
    with pytest.raises(ValueError, match=r"Expected input batch_size \(15\) to match target batch_size \(14\)"):
        F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten()[:14])   # (the same words as eager)
    with pytest.raises(ValueError, match="leading shape"):
        inductor_lce.linear_cross_entropy(h, w, y.t())
    with pytest.raises(ValueError, match="shift=True needs labels in hidden's leading shape"):
        inductor_lce.linear_cross_entropy(h, w, y.flatten(), shift=True)
