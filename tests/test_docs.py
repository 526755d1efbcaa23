"""The documentation stays true to the code and to the measured figures (fast: no servers, no subprocesses).

The README stays short and its links resolve; the configuration reference names every field of the schema and is
exactly what docs/gen_reference.py generates now; docs/measurements.md is exactly what docs/gen_figures.py renders
from bench/figures/*.json; and every figure file says when, at which commit and with which command it was measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

from distill.config import DistillConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
REFERENCE = REPO / "docs" / "reference" / "configuration.md"
MEASUREMENTS = REPO / "docs" / "measurements.md"
FIGURES = REPO / "bench" / "figures"


def _script(name: str) -> ModuleType:
    """docs/NAME.py as a module (docs/ is the site's folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "docs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def same_environ() -> Iterator[None]:
    """The generators import bench modules, which default the offline variables: leave os.environ as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _submodels(ann: Any) -> list[tuple[str, type[BaseModel]]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [("", ann)]
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is list:
        return [("[]", m) for _, m in _submodels(args[0])]
    if origin is dict:
        return [(".<key>", m) for _, m in _submodels(args[1])]
    return [s for a in args for s in _submodels(a)]  # Optional, Union, Annotated


def _dotted(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        yield prefix + name
        for suffix, sub in _submodels(info.annotation):
            yield from _dotted(sub, f"{prefix}{name}{suffix}.")


def test_readme_is_at_most_16000_bytes() -> None:
    size = len(README.read_bytes())
    assert size <= 16_000, f"README.md is {size:,} bytes: move detail into docs/ (the limit is 16,000)"


def test_every_relative_link_and_image_in_the_readme_points_at_a_file() -> None:
    text = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    targets += re.findall(r"(?:src|href)=\"([^\"]+)\"", text)
    assert targets, "no links found in README.md"
    missing = [
        t for t in targets if not re.match(r"^(https?:|mailto:|#)", t) and not (REPO / t.split("#", 1)[0]).exists()
    ]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_reference_names_every_field_of_the_config_schema(same_environ: None) -> None:
    fields = list(_dotted(DistillConfig))
    assert len(fields) > 100 and "teacher.max_tokens" in fields and "teacher.batch.max_requests" in fields
    text = _script("gen_reference").render()
    missing = [f for f in fields if f"`{f}`" not in text]
    assert not missing, f"fields missing from the generated reference: {missing}"


def test_the_committed_reference_is_what_the_schema_generates(same_environ: None) -> None:
    generated = _script("gen_reference").render()
    assert REFERENCE.read_text(encoding="utf-8") == generated, (
        "docs/reference/configuration.md is stale: run `make docs` (python docs/gen_reference.py)"
    )


def test_the_measurements_page_is_what_the_figures_render(same_environ: None, tmp_path: Path) -> None:
    committed = MEASUREMENTS.read_text(encoding="utf-8")
    gen = _script("gen_figures")
    # rendered from a copy whose generated blocks were emptied: the page must come back byte for byte
    emptied = re.sub(
        r"(<!-- BEGIN generated: ([\w-]+) -->\n).*?(<!-- END generated: \2 -->)", r"\1\3", committed, flags=re.DOTALL
    )
    copy = tmp_path / "measurements.md"
    copy.write_text(emptied, encoding="utf-8")
    assert emptied != committed
    assert gen.render(copy.read_text(encoding="utf-8")) == committed, (
        "docs/measurements.md is not what bench/figures/*.json render: run `make figures` (python docs/gen_figures.py)"
    )
    blocks = re.findall(r"<!-- BEGIN generated: ([\w-]+) -->\n(.*?)<!-- END generated", committed, flags=re.DOTALL)
    assert blocks and all("Measured " in body for _, body in blocks)


def test_every_figure_file_says_its_date_commit_and_command() -> None:
    files = sorted(FIGURES.glob("*.json"))
    assert files
    lacking = {}
    for path in files:
        record = json.loads(path.read_text(encoding="utf-8"))
        if missing := [k for k in ("date", "commit", "command") if k not in record]:
            lacking[path.name] = missing
    assert not lacking, f"figure files without their provenance keys: {lacking} (bench/record.py stamps them)"
