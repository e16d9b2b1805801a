"""python -m inductor_lce.explain and inductor_lce.explain(): every site, rewritten or not, why."""
import os
import re
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import inductor_lce
from inductor_lce.graph import skips

# a graph node's name (view_21, primals_1, amax_1), outside the user's code quoted in `backticks`
NODE_NAME = re.compile(r"\b[a-z_]+_\d+\b")


def _no_node_names(text: str) -> bool:
    return not NODE_NAME.search(re.sub(r"`[^`]*`", "", text))


def _inputs():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(33, 8, requires_grad=True)
    y = torch.randint(0, 33, (2, 5))
    return h, w, y


def two_losses(h, w, y):
    good = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    weighted = F.cross_entropy(F.linear(h * 2, w).float().flatten(0, 1), y.flatten(),
                               weight=torch.linspace(0.5, 1.5, 33))
    return good + weighted


def test_explain_api_reports_rewrite_and_skip(capsys):
    h, w, y = _inputs()
    report = inductor_lce.explain(two_losses, h, w, y)
    decisions = sorted((r["decision"], r["reason"]) for r in report)
    assert decisions == [("rewritten", "forward+backward, three_gemm"), ("skipped", "class_weights")]
    for r in report:
        assert "test_explain.py:" in r["where"] and "two_losses" in r["where"], r
        assert r["code"].startswith(("good = F.cross_entropy", "weighted = F.cross_entropy")), r
        assert r["shape"] == "[10, 33] float32", r
        assert not r["cached"]
    skipped = next(r for r in report if r["decision"] == "skipped")
    assert skipped["hint"] == skips.SKIPS["class_weights"].hint
    out = capsys.readouterr().out
    assert "1 rewritten, 1 skipped" in out
    assert skips.SKIPS["class_weights"].hint in out and "weighted = F.cross_entropy(" in out
    assert _no_node_names(out), out


def test_explain_has_no_hidden_side_effects():
    """No torch._dynamo.reset() (the user's compiled functions stay compiled), no gradients in .grad."""
    h, w, y = _inputs()
    user_fn = lambda x: (x * 2).sum()  # noqa: E731
    counter = CompileCounter()
    user_compiled = torch.compile(user_fn, backend=counter)
    user_compiled(torch.ones(3))
    inductor_lce.explain(two_losses, h, w, y)
    user_compiled(torch.ones(3))
    assert counter.frame_count == 1, "explain() dropped the user's compiled code"
    assert h.grad is None and w.grad is None


def test_explain_details_name_the_users_code(capsys):
    """Details say which line and shape, never a graph node's name."""
    h, w, y = _inputs()

    def aux_loss_on_logits(h, w, y):
        logits = F.linear(h, w).float().flatten(0, 1)
        return F.cross_entropy(logits, y.flatten()) + 1e-3 * logits.pow(2).mean()

    def temperature(h, w, y):
        return F.cross_entropy((F.linear(h, w).float() / 0.7).flatten(0, 1), y.flatten())

    def entropy_bonus(h, w, y):
        logp = F.log_softmax(F.linear(h, w).float().flatten(0, 1), dim=-1)
        return F.nll_loss(logp, y.flatten()) + 0.01 * (logp.exp() * logp).sum(-1).mean()

    report = []
    for fn in (aux_loss_on_logits, temperature, entropy_bonus):
        report += inductor_lce.explain(fn, h, w, y)
    out = capsys.readouterr().out
    assert [r["reason"] for r in report] == ["logits_other_users", "logits_path_op", "log_softmax_other_users"]
    for r in report:
        assert r["detail"] and _no_node_names(r["detail"]), r
        assert "float32" in r["detail"], r  # the tensors' shapes and dtypes
        assert r["hint"] == skips.SKIPS[r["reason"]].hint
    assert "`logits = F.linear(h, w).float().flatten(0, 1)`" in report[0]["detail"]
    assert report[1]["detail"].startswith("div between the lm-head matmul and the loss"), report[1]
    assert _no_node_names(out), out


def test_explain_cli_runs_a_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        assert sys.argv[1:] == ["--steps", "1"]
        def loss_fn(h, w, y):
            logits = F.linear(h, w).float().flatten(0, 1)
            return F.cross_entropy(logits, y.flatten()), logits
        h = torch.randn(2, 5, 8, requires_grad=True); w = torch.randn(33, 8, requires_grad=True)
        y = torch.randint(0, 33, (2, 5))
        loss, _ = torch.compile(loss_fn)(h, w, y)
        loss.backward()
    """))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "inductor_lce.explain", str(script), "--steps", "1"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeWarning" not in proc.stderr, proc.stderr[-3000:]  # runpy's "found in sys.modules" one
    assert "skipped" in proc.stdout and "logits_returned" in proc.stdout
    assert skips.SKIPS["logits_returned"].hint in proc.stdout
    assert "train.py:6 in loss_fn" in proc.stdout  # the site: the user's line
    assert "return F.cross_entropy(logits, y.flatten()), logits" in proc.stdout
    assert "`logits = F.linear(h, w).float().flatten(0, 1)` (train.py:5 in loss_fn)" in proc.stdout
    assert _no_node_names(proc.stdout), proc.stdout
