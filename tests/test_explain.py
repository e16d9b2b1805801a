"""python -m inductor_lce.explain and inductor_lce.explain(): every site, rewritten or not, why."""
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

import inductor_lce


def test_explain_api_reports_rewrite_and_skip(capsys):
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(33, 8, requires_grad=True)
    y = torch.randint(0, 33, (2, 5))

    def two_losses(h, w, y):
        good = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
        weighted = F.cross_entropy(F.linear(h * 2, w).float().flatten(0, 1), y.flatten(),
                                   weight=torch.linspace(0.5, 1.5, 33))
        return good + weighted

    report = inductor_lce.explain(two_losses, h, w, y)
    decisions = sorted((r["decision"], r["reason"]) for r in report)
    assert decisions == [("rewritten", "forward+backward, three_gemm"), ("skipped", "class_weights")]
    assert all("two_losses" in r["where"] for r in report)
    out = capsys.readouterr().out
    assert "class_weights" in out and "rewritten" in out


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
    proc = subprocess.run([sys.executable, "-m", "inductor_lce.explain", str(script), "--steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stdout and "logits_returned" in proc.stdout
    assert "return only the loss" in proc.stdout
