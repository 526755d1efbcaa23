"""flows/ and tasks/ install as distill.flows and distill.tasks, never as top-level packages of their own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_the_wheel_holds_only_the_distill_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    for d in ("distill", "flows", "tasks"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_wheel({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    names = zipfile.ZipFile(next(out.glob("*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"distill"}, tops
    assert {"distill/flows/distill.py", "distill/tasks/registry.py", "distill/config.py"} <= set(names)


def test_no_top_level_flows_or_tasks_outside_the_repo(tmp_path: Path) -> None:
    """Away from the checkout (no cwd on sys.path), only the distill namespace resolves."""
    code = ("import importlib.util as u; import distill.tasks.registry as r, distill.flows.distill as d; "
            "print(u.find_spec('tasks'), u.find_spec('flows'), r.__name__, d.distill_flow.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert out.split() == ["None", "None", "distill.tasks.registry", "distill"]
