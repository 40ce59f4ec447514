"""The code's shape, as the house style asks for it: short functions, no private names used across
modules, and no import cycle hidden behind an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LONGEST = 80  # lines, docstring included: a function longer than this is several waiting to be named


def modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.slow
def test_no_function_in_the_library_is_longer_than_a_screen():
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in modules("ddpm") for f in functions(p) if f.end_lineno - f.lineno + 1 > LONGEST]
    assert not long, long


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["ddpm", "bench", "tests"])
def test_no_private_name_is_imported_from_another_module(folder):
    found = []
    for path in modules(folder):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("ddpm", "bench"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {private}")
    assert not found, found


@pytest.mark.slow
def test_the_library_imports_its_own_modules_at_the_top():
    # The command line (cli.py) imports each verb's code when the verb runs, so that `ddpm --help`
    # stays fast; anywhere else an import inside a function would only hide an import cycle.
    late = [f"{p.relative_to(ROOT)}:{node.lineno} in {f.name}: {node.module}"
            for p in modules("ddpm") if p.name != "cli.py" for f in functions(p) for node in ast.walk(f)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpm")]
    assert not late, late
