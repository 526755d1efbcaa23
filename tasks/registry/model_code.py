"""The code a registered model carries (MLflow ``code_paths``): only the modules it imports.

Why minimal: a model shipped with the whole ``tasks/`` folder carries the teacher client,
the trainer and everything else into every registry entry and every serving image; a
loader needs only the pyfunc class and its inference path. The files are copied into a
temporary ``tasks/`` package of the same shape (the pyfunc class is pickled by its module
path, ``tasks.<concept>.<module>``), so the model loads without distill installed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parents[1]

# paths under tasks/ (each package's __init__.py is written empty beside them)
CLASSIFIER_CODE = ["classify/pyfunc.py", "classify/inference.py"]
GENERATOR_CODE = ["generate/pyfunc.py", "generate/inference.py", "templates/generation.py", "templates/base.py"]


@contextlib.contextmanager
def model_code(files: list[str]) -> Iterator[str]:
    """A temporary ``tasks`` package holding just ``files``; yields its path for ``code_paths``."""
    root = Path(tempfile.mkdtemp(prefix="distill-code-"))
    code = root / "tasks"
    try:
        for f in files:
            dst = code / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TASKS_DIR / f, dst)
        for folder in [code, *{(code / f).parent for f in files}]:
            (folder / "__init__.py").touch()  # empty: nothing else comes along
        yield str(code)
    finally:
        shutil.rmtree(root, ignore_errors=True)
