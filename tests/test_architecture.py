"""The house's rules that a reader can check by eye, checked by the code's own syntax trees.

- ``DistillConfig`` (the whole run's config) appears in signatures only in ``flows/`` and
  ``tasks/pipeline/``: below them every function gets the sections it reads.
- No stage module is loaded by name (``importlib``): every import is one a tool can follow
  (``distill/legacy.py`` is the one place that maps names, for models registered by 0.1).
- Past five parameters a signature is keyword-only (ruff's PLR0917 says so too; this is the
  same rule held without ruff).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

SOURCES = [p for d in ("distill", "flows", "tasks") for p in sorted((REPO / d).rglob("*.py"))]


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _annotations(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    args = [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]
    return [ast.unparse(x.annotation) for x in args if x.annotation is not None]


def test_the_whole_config_is_taken_only_by_the_flows_and_the_pipeline_layer() -> None:
    allowed = (REPO / "flows", REPO / "tasks" / "pipeline")
    found = {
        f"{p.relative_to(REPO)}:{fn.name}"
        for p in SOURCES
        if not p.is_relative_to(allowed[0]) and not p.is_relative_to(allowed[1]) and p.name != "config.py"
        for fn in _functions(p)
        if any("DistillConfig" in ann for ann in _annotations(fn))
    }
    assert not found, f"these take the whole DistillConfig; give them the sections they read: {sorted(found)}"
    takers = {p for p in SOURCES for fn in _functions(p) if any("DistillConfig" in a for a in _annotations(fn))}
    assert takers and all(p.is_relative_to(allowed[0]) or p.is_relative_to(allowed[1]) for p in takers)


def test_no_module_is_loaded_by_a_name_in_a_string() -> None:
    loaders = {
        f"{p.relative_to(REPO)}"
        for p in SOURCES
        if p.name != "legacy.py"
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Call) and ast.unparse(n.func) in ("importlib.import_module", "import_module", "__import__")
    }
    assert not loaders, f"modules loaded by name (tools cannot follow these): {sorted(loaders)}"


def test_long_signatures_are_keyword_only() -> None:
    too_long = {
        f"{p.relative_to(REPO)}:{fn.name}"
        for p in SOURCES
        for fn in _functions(p)
        if len([a for a in [*fn.args.posonlyargs, *fn.args.args] if a.arg not in ("self", "cls")]) > 5
    }
    assert not too_long, f"more than 5 positional parameters: {sorted(too_long)}"
