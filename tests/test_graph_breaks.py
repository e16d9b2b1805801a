"""A Dynamo graph break between the lm-head and the loss (a logging call on the way, as in HF's loss lookup):
the loss graph gets the logits as an input. The pass counts ``skip_logits_input``, and explain names the break
(the user's line, Dynamo's reason). No Dynamo switch removes such a break without dropping the logging call
(README, "Graph breaks between the head and the loss"), so the entry points leave the call alone; with the
README's one-line fixes the site is rewritten and equals eager."""
import contextlib
import inspect
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import inductor_lce
from inductor_lce.graph import skips
from inductor_lce.backend import inductor_lce_backend
from helpers import rewrites, skips as skip_counts

log = logging.getLogger("tests.tiny_lm")
NODE_NAME = re.compile(r"\b[a-z_]+_\d+\b")  # a graph node's name (primals_1, view_21) outside `code`


class TinyLM(nn.Module):
    def __init__(self, vocab=33, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, labels):
        logits = self.head(torch.tanh(self.emb(ids))).float()
        # a graph break: Dynamo does not trace Logger methods
        log.info("scoring %d tokens", labels.numel())
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


LOG_LINE = next(i for i, line in enumerate(inspect.getsourcelines(TinyLM.forward)[0]) if "log.info(" in line) \
    + TinyLM.forward.__code__.co_firstlineno


def _tiny():
    torch.manual_seed(0)
    return TinyLM(), torch.randint(0, 33, (2, 5), generator=torch.Generator().manual_seed(1))


@contextlib.contextmanager
def ignored(method):
    """The README's generic fix: Dynamo treats ``method`` as a no-op (torch 2.11 to 2.13 have this name)."""
    methods = torch._dynamo.config.ignore_logger_methods
    methods.add(method)
    try:
        yield
    finally:
        methods.discard(method)


def _check_against_eager(model, step, compiled, *args):
    """Loss and gradients of ``compiled(*args)`` against ``step(*args)`` run eagerly (test_hf_models' tolerances)."""
    loss = compiled(*args)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = step(*args)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_explain_names_the_graph_break(capsys):
    model, ids = _tiny()
    report = inductor_lce.explain(model, ids, ids)
    assert [(r["decision"], r["reason"]) for r in report] == [("skipped", "logits_input")], report
    assert skip_counts() == {"skip_logits_input": 1}
    detail = report[0]["detail"]
    assert detail.startswith("the logits are an input of the compiled region ([2, 5, 33] float32): a graph break "
                             "separates the lm-head from the loss"), detail
    # the user's line of the break, and Dynamo's reason for it (its wording differs between torch versions)
    assert f"graph break at {os.path.relpath(__file__)}:{LOG_LINE} in forward: " \
           f"`log.info(\"scoring %d tokens\", labels.numel())`" in detail, detail
    reason = re.search(r"^Dynamo's reason: (.+)$", detail, re.M)
    assert reason and "logging.Logger" in reason.group(1), detail
    assert not NODE_NAME.search(re.sub(r"`[^`]*`", "", detail)), detail
    out = capsys.readouterr().out
    assert f"{os.path.relpath(__file__)}:{LOG_LINE} in forward" in out and reason.group(0) in out, out
    assert skips.SKIPS["logits_input"].hint in out


def test_a_loss_compiled_on_its_own_blames_no_break():
    """An earlier break (in a function that has returned) is not this graph's: nothing is blamed."""
    model, ids = _tiny()
    torch.compile(model, options=inductor_lce.options())(ids, ids)  # records a graph break at LOG_LINE
    logits = model.head(torch.tanh(model.emb(ids))).float()

    def loss_fn(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    report = inductor_lce.explain(loss_fn, logits, ids)
    assert [r["reason"] for r in report] == ["logits_input"]
    assert "graph break at" not in report[0]["detail"], report[0]["detail"]
    assert "Dynamo recorded no graph break on the way here" in report[0]["detail"]


def test_entry_points_keep_the_logging_call(caplog):
    """install() and the backend change no Dynamo setting: the break stays (and is reported), the user's
    logging call still runs."""
    model, ids = _tiny()
    with caplog.at_level(logging.INFO, logger=log.name):
        inductor_lce.install()
        try:
            torch.compile(model)(ids, ids).backward()
        finally:
            inductor_lce.uninstall()
        torch.compile(model, backend=inductor_lce_backend)(ids, ids).backward()
    assert skip_counts() == {"skip_logits_input": 2} and rewrites() == 0
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["scoring 10 tokens"] * 2


@pytest.mark.parametrize("entry", ["install", "backend"])
def test_without_the_break_the_entry_points_rewrite(entry):
    model, ids = _tiny()
    with ignored(logging.Logger.info):
        if entry == "install":
            inductor_lce.install()
            try:
                _check_against_eager(model, model, torch.compile(model), ids, ids)
            finally:
                inductor_lce.uninstall()
        else:
            _check_against_eager(model, model, torch.compile(model, backend=inductor_lce_backend), ids, ids)
    assert rewrites() == 1 and not skip_counts()


def test_explain_cli_prints_the_break(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import logging, torch, torch.nn.functional as F
        log = logging.getLogger("train")
        def step(h, w, y):
            logits = F.linear(h, w).float()
            log.warning("step")
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())
        h = torch.randn(2, 5, 8, requires_grad=True); w = torch.randn(33, 8, requires_grad=True)
        torch.compile(step)(h, w, torch.randint(0, 33, (2, 5))).backward()
    """))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, installed or not
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "inductor_lce.explain", str(script)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout[proc.stdout.index("== inductor_lce: cross-entropy sites =="):]
    # the site under the user's function name, not Dynamo's resume function (torch_dynamo_resume_in_step_at_6)
    assert "skipped    logits_input  train.py:7 in step " in report, report
    assert "graph break at train.py:6 in step: `log.warning(\"step\")`" in report, report
    assert re.search(r"^    Dynamo's reason: .*logging\.Logger", report, re.M), report


# --------------------------------------------------------------------------- HF transformers

V, T = 257, 16


def _hf_model():
    """A subclass whose name HF does not map to a loss (a custom model class, as many are): its
    ``loss_function`` warns once through ``logger.warning_once`` before falling back to ``ForCausalLM``."""
    transformers = pytest.importorskip("transformers")

    class TinyChat(transformers.LlamaForCausalLM):
        pass

    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = TinyChat(config)
    assert model.loss_type is None
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    return model, ids, labels


def test_hf_loss_lookup_break_is_explained():
    model, ids, labels = _hf_model()

    def train_step(ids, labels):
        return model(input_ids=ids, labels=labels).loss

    report = inductor_lce.explain(train_step, ids, labels)
    assert [r["reason"] for r in report] == ["logits_input"], report
    detail = report[0]["detail"]
    assert re.search(r"^graph break at \S*transformers/modeling_utils\.py:\d+ in loss_function: "
                     r"`logger\.warning_once\(`$", detail, re.M), detail
    assert re.search(r"^reached from \S*transformers/models/llama/modeling_llama\.py:\d+ in forward: "
                     r"`loss = self\.loss_function\(", detail, re.M), detail
    assert re.search(r"^Dynamo's reason: .*logging\.Logger", detail, re.M), detail


def test_hf_loss_type_fix_is_rewritten():
    """The README's one-line fix for HF: name the loss HF falls back to; then install() rewrites the site."""
    model, ids, labels = _hf_model()
    model.loss_type = "ForCausalLM"

    def train_step(ids, labels):
        return model(input_ids=ids, labels=labels).loss

    inductor_lce.install()
    try:
        _check_against_eager(model, train_step, torch.compile(train_step), ids, labels)
    finally:
        inductor_lce.uninstall()
    assert rewrites() == 1 and not skip_counts()
