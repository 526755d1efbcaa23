"""The code a registered model carries (MLflow ``code_paths``): only the modules it imports.

Why minimal: a model shipped with the whole ``tasks/`` folder carries the teacher client,
the trainer and everything else into every registry entry and every serving image; a
loader needs only the pyfunc class and its inference path. The files are copied into a
temporary ``distill/tasks/`` package (the pyfunc class is pickled by its module path,
``distill.tasks.<module>``), so the model loads without distill installed.
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
    """A temporary ``distill`` package holding just ``tasks/<files>``; yields its path for ``code_paths``."""
    import distill

    root = Path(tempfile.mkdtemp(prefix="distill-code-"))
    code = root / "distill" / "tasks"
    code.mkdir(parents=True)
    try:
        shutil.copy2(Path(distill.__file__), root / "distill" / "__init__.py")  # empty: nothing else comes along
        for f in files:
            shutil.copy2(TASKS_DIR / f, code / f)
        yield str(root / "distill")
    finally:
        shutil.rmtree(root, ignore_errors=True)
