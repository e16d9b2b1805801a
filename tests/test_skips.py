"""One table of skip reasons (inductor_lce/graph/skips.py): every reason the package raises has a row with a
hint, the README's "Current limits" table is that table, and the pass logs the hint with the skip."""
import ast
import logging
import pathlib
import re

import torch
import torch.nn.functional as F

import inductor_lce
from inductor_lce.graph import skips
from helpers import skips as skip_counts

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "inductor_lce"


def _string_constants(node):
    """String literals an argument can evaluate to (``"a" if x else "b"`` gives both)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _string_constants(node.body) + _string_constants(node.orelse)
    return []


def raised_reasons() -> dict:
    """reason -> files, for every ``NoMatch("reason", ...)`` and every literal reason given to ``_skip``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "NoMatch" and node.args:
                reasons = _string_constants(node.args[0])
            elif name == "_skip":
                reasons = [s for a in node.args for s in _string_constants(a) if re.fullmatch(r"[a-z0-9_]+", s)]
            else:
                continue
            for reason in reasons:
                found.setdefault(reason, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_the_scan_finds_the_reasons():
    found = raised_reasons()
    # the scan itself must see the package: these are raised in three different files
    assert {"logits_returned", "class_weights", "nll_form", "logits_path_op", "post_grad_training",
            "matcher_error"} <= set(found), sorted(found)


def test_every_raised_reason_is_in_the_table():
    found = raised_reasons()
    unknown = {r: sorted(files) for r, files in found.items() if r not in skips.SKIPS and r not in skips.NOT_SKIPS}
    assert not unknown, f"add these reasons to inductor_lce/graph/skips.py (SKIPS, with a hint): {unknown}"


def test_every_row_is_a_raised_reason_with_a_hint():
    found = raised_reasons()
    assert not set(skips.SKIPS) & set(skips.NOT_SKIPS)
    assert not set(skips.SKIPS) - set(found), "rows for reasons nothing raises"
    assert not set(skips.NOT_SKIPS) - set(found), "NOT_SKIPS for reasons nothing raises"
    for reason, row in skips.SKIPS.items():
        assert row.when.strip() and row.hint.strip(), reason
        assert "|" not in row.when + row.hint, f"{reason}: a '|' would break the README's table"
        assert skips.hint(reason) == row.hint


def test_readme_limits_table_is_the_skip_table():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Current limits"):]
    table = "\n".join(line for line in section.splitlines()[1:40] if line.startswith("|"))
    assert table == skips.markdown_table(), (
        "README.md's 'Current limits' table differs from inductor_lce.graph.skips.markdown_table(): paste its output")
    for reason in skips.SKIPS:
        assert f"`{reason}`" in table


def test_skip_log_carries_the_hint(caplog):
    h, w, y = torch.randn(2, 5, 8, requires_grad=True), torch.randn(33, 8, requires_grad=True), torch.randint(0, 33, (2, 5))

    def weighted(h, w, y):
        return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), weight=torch.linspace(0.5, 1.5, 33))

    with caplog.at_level(logging.INFO, logger="inductor_lce"):
        torch.compile(weighted, options=inductor_lce.options())(h, w, y).backward()
    assert skip_counts() == {"skip_class_weights": 1}
    messages = [r.getMessage() for r in caplog.records if "not rewritten" in r.getMessage()]
    assert len(messages) == 1 and skips.SKIPS["class_weights"].hint in messages[0], messages
    assert "test_skips.py" in messages[0]  # the user's line, not a graph node
