"""Which cross-entropies did the pass rewrite, and why not the others?

    python -m inductor_lce.explain train.py [script args...]

runs the script with ``inductor_lce.install()`` in effect (every ``torch.compile`` with the
Inductor backend gets the pass) and prints every cross-entropy site the pass saw. From
Python, ``inductor_lce.explain(fn, *args)`` compiles ``fn`` with ``options()``, runs it
(and its backward when the result requires grad) and returns the same report.

Compile caches are off while it runs (a cache hit would skip the pass and the report).
Sites are printed per graph the pass saw: a joint (training) graph and, for inference, the
forward graph; a site compiled twice (a recompile) appears twice.
"""
from __future__ import annotations

import contextlib
import runpy
import sys
from typing import Callable

import torch

from . import graph_pass
from .entry import install, options, uninstall

HELP = {
    "logits_returned": "the logits leave the compiled region (returned or stored): return only the loss",
    "logits_other_users": "something besides the loss reads the logits",
    "log_softmax_other_users": "something besides the loss reads the log-probabilities",
    "label_smoothing": "label_smoothing is not fused yet",
    "class_weights": "per-class weights are not fused",
    "not_fp32": "the loss reads bf16/fp16 logits: add .float() before the loss",
    "logits_path_op": "an op between the lm-head matmul and the loss is not a view/float/shift slice",
    "no_matmul": "the logits do not come from a matmul in this graph",
    "post_grad_training": "training graph seen by the post-grad pass: use options() / install()",
}


def format_report(report: list) -> str:
    if not report:
        return "inductor_lce: no cross-entropy found in the compiled graphs"
    rows = [("decision", "reason", "site", "where")]
    for r in report:
        rows.append((r["decision"], r["reason"], r["site"], r["where"]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] for row in rows]
    hints = sorted({r["reason"] for r in report if r["decision"] == "skipped" and r["reason"] in HELP})
    if hints:
        lines.append("")
        lines += [f"{reason}: {HELP[reason]}" for reason in hints]
    details = [f"{r['site']}: {r['detail']}" for r in report if r["detail"] and r["decision"] == "skipped"]
    if details:
        lines.append("")
        lines += details
    return "\n".join(lines)


def _no_compile_caches():
    """A cache hit skips the passes, and with them the report: compile from scratch."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    patches = [inductor_config.patch({"fx_graph_cache": False})]
    if hasattr(functorch_config, "enable_autograd_cache"):
        patches.append(functorch_config.patch({"enable_autograd_cache": False}))
    stack = contextlib.ExitStack()
    for p in patches:
        stack.enter_context(p)
    return stack


def explain(fn: Callable, *args, **kwargs) -> list:
    """Compile ``fn`` with the pass, run it once (and backward if it returns a loss that
    requires grad), print and return the report of every cross-entropy site."""
    start = len(graph_pass.REPORT)
    torch._dynamo.reset()
    with _no_compile_caches():
        out = torch.compile(fn, options=options())(*args, **kwargs)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(loss, torch.Tensor) and loss.requires_grad and loss.numel() == 1:
            loss.backward()
    report = graph_pass.REPORT[start:]
    print(format_report(report))
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    script = argv[0]
    start = len(graph_pass.REPORT)
    install()
    sys.argv = argv
    try:
        with _no_compile_caches():
            runpy.run_path(script, run_name="__main__")
    finally:
        uninstall()
        print("\n== inductor_lce: cross-entropy sites ==")
        print(format_report(graph_pass.REPORT[start:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
