"""distill installs three top-level packages whose import paths are their file paths: distill, flows and tasks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    for d in ("distill", "flows", "tasks"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    out = src / "dist"
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta as b; b.build_wheel({str(out)!r})"],
        cwd=src,
        check=True,
        capture_output=True,
    )
    return next(out.glob("*.whl"))


def test_the_wheel_holds_distill_flows_and_tasks_at_their_file_paths(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"distill", "flows", "tasks"}, tops
    in_repo = {str(p.relative_to(REPO)) for d in ("distill", "flows", "tasks") for p in (REPO / d).rglob("*.py")}
    assert in_repo == {n for n in names if n.endswith(".py")}  # every module, under the path it has in the repo
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)


def test_a_tasks_package_of_your_own_that_hides_distills_is_named(wheel: Path, tmp_path: Path) -> None:
    """Installed (not editable) and run from a project with its own ``tasks/`` package: one clear line."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    project = tmp_path / "project"
    (project / "tasks").mkdir(parents=True)
    (project / "tasks" / "__init__.py").write_text("")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    # -S: no site-packages (so no editable install of this checkout); the guard needs nothing but the stdlib
    r = subprocess.run(
        [sys.executable, "-S", "-c", "import flows"], cwd=project, env=env, capture_output=True, text=True
    )
    assert r.returncode != 0
    assert f"distill's 'tasks' package is hidden by {project / 'tasks' / '__init__.py'}" in r.stderr
    ok = subprocess.run(
        [sys.executable, "-S", "-c", "import flows, tasks; print(tasks.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ok.stdout.strip() == str(site / "tasks" / "__init__.py")
