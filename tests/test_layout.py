"""Who may import what (README, "Layout"): the graph side emits ``inductor_lce::`` ops and imports no kernel and
nothing from the lowering; the kernels import only each other; the ops and their reference import neither side."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "inductor_lce"


def _imports() -> dict:
    """module -> the inductor_lce modules it imports (anywhere in the file, relative imports resolved)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["inductor_lce", *path.relative_to(PACKAGE).with_suffix("").parts]
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                if node.module:
                    targets.add(f"{base}.{node.module}" if base else node.module)
                else:
                    targets |= {f"{base}.{a.name}" for a in node.names}
        found[module] = {t for t in targets if t == "inductor_lce" or t.startswith("inductor_lce.")}
    return found


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_scan_sees_the_package():
    found = _imports()
    assert {"inductor_lce.graph.driver", "inductor_lce.graph.patterns.logits", "inductor_lce.lowering.lce_triton",
            "inductor_lce.kernels.lse_forward", "inductor_lce.ops"} <= set(found)
    assert "inductor_lce.kernels.lse_forward" in found["inductor_lce.lowering.lce_triton"]
    assert "inductor_lce.ops" in found["inductor_lce.graph.rewrite"]


def test_who_imports_what():
    wrong = []
    for module, targets in _imports().items():
        if _under(module, "inductor_lce.graph.patterns"):
            allowed = lambda t: _under(t, "inductor_lce.graph.patterns")  # noqa: E731
        elif _under(module, "inductor_lce.graph"):
            allowed = lambda t: not _under(t, "inductor_lce.lowering", "inductor_lce.kernels")  # noqa: E731
        elif _under(module, "inductor_lce.kernels"):
            allowed = lambda t: _under(t, "inductor_lce.kernels")  # noqa: E731
        elif _under(module, "inductor_lce.lowering"):
            allowed = lambda t: _under(t, "inductor_lce.ops", "inductor_lce.lowering", "inductor_lce.kernels")  # noqa: E731
        elif module in ("inductor_lce.ops", "inductor_lce.reference"):
            allowed = lambda t: t == "inductor_lce.reference"  # noqa: E731
        else:
            continue
        wrong += [f"{module} imports {t}" for t in sorted(targets) if not allowed(t)]
    assert not wrong, wrong
