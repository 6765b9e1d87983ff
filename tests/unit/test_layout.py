"""The architecture of docs/design.md, checked on the source: which package may import which,
and the size limits of modules and functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "mpi", "data_prep", "app")
# package -> the packages of ours it must not import
FORBIDDEN = {"common": ("app", "mpi", "data_prep"), "mpi": ("app", "data_prep"),
             "data_prep": ("app",), "app": ()}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def sources():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    rel = path.relative_to(ROOT)
    tree = ast.parse(path.read_text())
    banned = FORBIDDEN[rel.parts[0]]
    is_bench = rel.parts[:2] == ("app", "bench")
    for name in imported_modules(tree):
        top = name.split(".")[0]
        assert top not in banned, f"{rel} imports {name}"
        if not is_bench:
            assert not name.startswith("app.bench"), f"{rel} imports the benchmarks ({name})"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    rel = path.relative_to(ROOT)
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{rel}: {len(text.splitlines())} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{rel}: {', '.join(long)}"
