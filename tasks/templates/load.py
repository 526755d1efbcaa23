"""Load a prompt template file: a labelling template, or a writing one (``task: generate``).

The file says which it is (``task: generate`` for free text with a length limit; labels
otherwise); the config's ``task`` must agree (tasks/pipeline/task_types.py checks).
"""

from __future__ import annotations

from typing import Union

from tasks.templates.base import read_template_file
from tasks.templates.generation import GenerationTemplate, generation_template_from
from tasks.templates.label import PromptTemplate, label_template_from

Template = Union[PromptTemplate, GenerationTemplate]


def load_prompt(path: str) -> Template:
    """The template in ``path`` (or in the repo's prompts/ folder); errors name the file and the field."""
    raw, p = read_template_file(path)
    if raw.get("task") == "generate":
        return generation_template_from(raw, p)
    return label_template_from(raw, p)
