"""Which cross-entropies did the pass rewrite, and why not the others?

    python -m inductor_lce.explain train.py [script args...]

runs the script with ``inductor_lce.install()`` in effect (every ``torch.compile`` with the
Inductor backend gets the pass) and then prints every cross-entropy site the pass judged, with
the user's source line, the logits' shape, the reason of a skip and what to do about it. Logits that
are an input of the compiled graph (``logits_input``) come with the graph break that put the lm-head in an
earlier graph, where Dynamo recorded one: its line and Dynamo's reason (``explain/breaks.py``).
From Python, ``inductor_lce.explain(fn, *args)`` compiles ``fn`` with ``options()``, calls it
once and prints and returns the same report.

The compile caches stay on: a graph served from the FX graph cache or the AOTAutograd cache
(e.g. the second run of a script) brings its sites back with it, marked "from the compile cache".
Sites are listed per graph compiled: a site compiled twice (a recompile) appears twice.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Callable

import torch

from ..graph import driver, skips
from ..entry import install, options, uninstall


def format_report(report: list) -> str:
    """The report as text: one block per site, with its source line, detail and, for a skip, the hint."""
    if not report:
        return "inductor_lce: no cross-entropy found in the compiled graphs"
    rewritten = sum(r["decision"] == "rewritten" for r in report)
    cached = sum(bool(r.get("cached")) for r in report)
    head = (f"inductor_lce: {len(report)} cross-entropy site{'s' if len(report) != 1 else ''}: "
            f"{rewritten} rewritten, {len(report) - rewritten} skipped"
            + (f" ({cached} from the compile cache)" if cached else ""))
    width = max(len(r["reason"]) for r in report)
    lines = [head]
    for r in report:
        where = r["where"] or "(no source line)"
        lines.append("")
        lines.append(f"{r['decision']:<9}  {r['reason']:<{width}}  {where}  logits {r['shape']}"
                     + ("  [from the compile cache]" if r.get("cached") else ""))
        if r.get("code"):
            lines.append(f"    {r['code']}")
        if r["detail"]:  # several lines for a graph break (where Dynamo broke, its reason)
            detail = r["detail"].splitlines()
            lines.append(f"    {'why: ' if r['decision'] == 'rewritten' else ''}{detail[0]}")
            lines += [f"    {line}" for line in detail[1:]]
        if r["decision"] == "skipped":
            lines.append(f"    hint: {r.get('hint') or skips.hint(r['reason'])}")
    return "\n".join(lines)


def explain(fn: Callable, *args, **kwargs) -> list:
    """Compile ``fn`` with ``options()``, call it once with ``args`` / ``kwargs``, print and return the
    report of every cross-entropy site (a list of dicts: decision, reason, algorithm, detail, where,
    code, shape, graph, hint, cached).

    Side effects: ``fn`` runs once, forward only (its own side effects happen: in-place updates, RNG
    draws; no backward runs, so no ``.grad`` changes). Dynamo keeps the compiled code for ``fn`` as one
    more entry next to the user's own (a recompile: the backend differs); nothing is reset, so models
    the user already compiled stay compiled. The compile caches stay on: a cache hit replays the report.
    """
    driver.sync()
    start = len(driver.REPORT)
    torch.compile(fn, options=options())(*args, **kwargs)
    driver.sync()
    report = driver.REPORT[start:]
    print(format_report(report))
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    script = argv[0]
    driver.sync()
    start = len(driver.REPORT)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python train.py` would
    install()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        uninstall()
        sys.argv, sys.path[:] = saved_argv, saved_path
        driver.sync()
        print("\n== inductor_lce: cross-entropy sites ==")
        print(format_report(driver.REPORT[start:]))
    return 0


__all__ = ["explain", "format_report", "main"]
