"""The teacher's tokenizer on this machine, when there is one: what its prompts and answers are counted with.

The local GGUF's own vocabulary, or a Hugging Face tokenizer folder named by
``teacher.tokenizer``; tiktoken for an OpenAI model name; otherwise the
4-characters-per-token estimate, which says so (tasks/templates/tokens.py).
"""

from __future__ import annotations

from distill.config import TeacherConfig
from tasks.teacher.local_server import default_gguf
from tasks.templates.tokens import TokenCounter, gguf_counter, heuristic_counter, hf_counter, openai_counter


def counter_for(teacher: TeacherConfig) -> TokenCounter:
    """The best counter this machine has for ``teacher`` (a TeacherConfig)."""
    if teacher.tokenizer:
        return hf_counter(teacher.tokenizer)
    if teacher.local:
        return gguf_counter(str(teacher.gguf_path or default_gguf()))
    return openai_counter(teacher.model) or heuristic_counter()
