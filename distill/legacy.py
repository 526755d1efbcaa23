"""Import names of models registered before distill's modules moved, mapped to where that code lives now.

Why: a registered model is a pickled pyfunc object whose class is named by its module
path. Models registered before the layout of concept subpackages (distill 0.1, commit
bdb26e7 and earlier) name ``distill.tasks.mlflow_model.StudentPyfunc`` or
``distill.tasks.generator_model.GeneratorPyfunc``, and carry that code in their MLflow
``code_paths``. A process that has not imported distill loads them from the code they
carry; a process that has (``distill predict``, a selection ranking by the champion, a
service of your own) finds ``distill`` already imported and would look for
``distill.tasks`` in it. These aliases answer those names with today's modules, whose
classes keep the same pickled state and artifacts, so such a model loads and predicts.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Optional

# the module paths pickled into, or imported by, the models an earlier layout registered
ALIASES = {
    "distill.tasks": "tasks",
    "distill.tasks.mlflow_model": "tasks.classify.pyfunc",
    "distill.tasks.inference": "tasks.classify.inference",
    "distill.tasks.generator_model": "tasks.generate.pyfunc",
    "distill.tasks.lora_student": "tasks.generate.inference",
    "distill.tasks.gen_prompt": "tasks.templates.generation",
    "distill.tasks.prompting": "tasks.templates.base",
}


class _Aliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path with the module that holds that code today (the same module object)."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname == "distill.tasks")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(ALIASES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is today's, already imported."""


def install() -> None:
    """Put the aliases last on ``sys.meta_path`` (once): a real module of those names, where there is one, wins."""
    if not any(isinstance(f, _Aliases) for f in sys.meta_path):
        sys.meta_path.append(_Aliases())
