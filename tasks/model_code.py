"""The code a registered model carries (MLflow ``code_paths``): only the modules it imports.

Why minimal: a model shipped with the whole ``tasks/`` folder carries the teacher client,
the trainer and everything else into every registry entry and every serving image; a
loader needs only the pyfunc class and its inference path. The files are copied into a
temporary ``tasks/`` package, so the model loads with ``tasks.<module>`` imports and
without distill installed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TASKS_DIR = Path(__file__).resolve().parent

CLASSIFIER_CODE = ["__init__.py", "mlflow_model.py", "inference.py"]
GENERATOR_CODE = ["__init__.py", "generator_model.py", "lora_student.py", "gen_prompt.py", "prompting.py"]


@contextlib.contextmanager
def model_code(files: list[str]) -> Iterator[str]:
    """A temporary ``tasks`` package holding just ``files``; yields its path for ``code_paths``."""
    root = Path(tempfile.mkdtemp(prefix="distill-code-"))
    code = root / "tasks"
    code.mkdir()
    try:
        for f in files:
            shutil.copy2(TASKS_DIR / f, code / f)
        yield str(code)
    finally:
        shutil.rmtree(root, ignore_errors=True)
