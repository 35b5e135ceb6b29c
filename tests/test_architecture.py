"""The layering docs/architecture.md describes, measured from the code's own imports."""

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "tfpure"


def modules():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path, known):
    """The tfpure modules a file imports, at any depth (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tfpure"):
            out |= {node.module} & known
            out |= {f"{node.module}.{a.name}" for a in node.names} & known
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & known
    return out


def test_at_most_seven_floors_of_imports_and_no_cycle():
    found = modules()
    packages = {"tfpure", "tfpure.testing"}  # their __init__s re-export: left out
    deps = {m: imports(p, set(found)) - packages - {m} for m, p in found.items()}

    @functools.cache
    def floor(module, path=()):
        assert module not in path, "import cycle: " + " -> ".join((*path, module))
        return 1 + max((floor(d, (*path, module)) for d in deps[module]), default=0)

    floors = {m: floor(m) for m in found if m not in packages}
    assert max(floors.values()) <= 7, sorted(floors.items(), key=lambda kv: -kv[1])[:5]
    assert floors["tfpure.loop"] == 6 and floors["tfpure.compat"] == 1


def lines_without_docstrings(node):
    n = node.end_lineno - node.lineno + 1
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if (
            isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            n -= body[0].end_lineno - body[0].lineno + 1
    return n


def test_no_class_over_300_lines_and_no_function_over_60():
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {ast.ClassDef: 300, ast.FunctionDef: 60, ast.AsyncFunctionDef: 60}.get(
                type(node)
            )
            if limit and lines_without_docstrings(node) > limit:
                over.append(f"{path.name}:{node.name} ({lines_without_docstrings(node)} lines)")
    assert not over, over


def test_the_suite_orders_existing_files_heaviest_first():
    """conftest.py's HEAVY_FIRST names files that exist, and its hook puts their tests first,
    in that order, the other files' tests after them in their collected order."""
    import types

    import conftest

    root = PACKAGE.parent
    missing = [p for p in conftest.HEAVY_FIRST if not (root / p).is_file()]
    assert not missing, f"HEAVY_FIRST names files that are gone: {missing}"
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py"))
    items = [types.SimpleNamespace(nodeid=f"{f}::test_{i}") for f in files for i in range(2)]
    conftest.pytest_collection_modifyitems(items)
    ordered = list(dict.fromkeys(item.nodeid.split("::")[0] for item in items))
    rest = [f for f in files if f not in conftest.HEAVY_FIRST]
    assert ordered == conftest.HEAVY_FIRST + rest
    assert [item.nodeid.split("::")[1] for item in items[:2]] == ["test_0", "test_1"]
