"""Which Dynamo graph break put the logits in another graph than the loss?

When the pass finds a loss whose logits are an input of the graph it compiles, the lm-head ran in an
earlier graph. Dynamo records every graph break it makes (``torch._dynamo.utils.graph_break_reasons``:
the reason and the user's stack, cleared by ``torch._dynamo.reset()``). The break that matters is one
in a function that is still running: Dynamo compiles the code after a break (a resume function, or a
function the eagerly run code calls) from inside the frame that broke, so that frame, at the line of the
break, is on the Python stack while the loss graph compiles. A record sharing such a frame is that break;
a loss compiled on its own has no such record and gets none.

Only ``graph_break_reasons`` is private (torch 2.11 to 2.13 have it); without it nothing is said.
"""
from __future__ import annotations

import inspect
from typing import Optional

from ..graph.match import short_path


def _where(frame) -> str:
    return f"{short_path(frame.filename)}:{frame.lineno} in {frame.name}"


def _records() -> list:
    try:
        from torch._dynamo import utils as dynamo_utils
    except ImportError:
        return []
    records = getattr(dynamo_utils, "graph_break_reasons", None)
    return list(records) if isinstance(records, list) else []


def _running_frames() -> list:
    """(file, line, function) of every Python frame now running, innermost first."""
    frames, f = [], inspect.currentframe()
    while f is not None:
        frames.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return frames


def graph_break() -> str:
    """The graph break that separates the graph being compiled from the code that called it, in the user's
    terms (where, the line, Dynamo's reason), or "" when Dynamo recorded none."""
    try:
        return _describe_break()
    except Exception:  # a record of another shape (another torch): the skip keeps its reason, without the break
        return ""


def _describe_break() -> str:
    running: dict = {}
    for depth, frame in enumerate(_running_frames()):
        running.setdefault(frame, depth)  # a recursive function: its innermost call
    best: Optional[tuple] = None
    for index, record in enumerate(_records()):
        stack = list(getattr(record, "user_stack", None) or [])
        shared = [(running[frame], k) for k, f in enumerate(stack)
                  if (frame := (f.filename, f.lineno, f.name)) in running]
        if not shared:
            continue
        depth, k = min(shared)  # the innermost running frame the break is in
        # innermost running frame first; then the record that goes deepest below it (Dynamo's first
        # record of a break names the unsupported call, its restart only the line that reached it); then the latest
        key = (-depth, len(stack) - k, index)
        if best is None or key > best[0]:
            best = (key, record, stack, k)
    if best is None:
        return ""
    _, record, stack, k = best
    site = stack[-1]
    code = (site.line or "").strip()
    text = f"graph break at {_where(site)}" + (f": `{code}`" if code else "")
    if k != len(stack) - 1:  # the break is in a call made from the running frame: name that line too
        caller = (stack[k].line or "").strip()
        text += f"\nreached from {_where(stack[k])}" + (f": `{caller}`" if caller else "")
    reason = str(getattr(record, "reason", "") or "").strip().splitlines()
    if reason:
        # its first line (the kind of break); a backtick would pair with the pass's quotes of the user's code
        text += "\nDynamo's reason: " + reason[0][:300].replace("`", "'")
    return text


__all__ = ["graph_break"]
