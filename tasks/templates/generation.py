"""Generation prompt templates (task: generate): instruction, few-shot examples, a length limit.

Why a template of its own: a labelling prompt ends in one of a closed label set and is
parsed strictly against it; a generation prompt ends in free text, so "parsing" means
taking the answer's first line and judging its length, and the length limit belongs to
the prompt (it is what the instruction asks for). The k samples differ by few-shot order,
with the same distinct-variant rule as labelling (:func:`tasks.templates.base.distinct_variants`).

The teacher sees the few-shot prefix; the student never does: :meth:`GenerationTemplate.student_instruction`
is the zero-shot instruction it is trained and served on (shorter inputs are part of its speed).
Long documents are cut to ``max_input_words`` words for both, counted, so a request never
overflows the teacher's context and fails until its attempts run out.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import jinja2
import yaml

from tasks.templates.base import (
    MAX_VARIANTS,
    Example,
    PromptError,
    SlotTemplate,
    defuse_markup,
    distinct_variants,
    one_line,
    read_template_file,
)

DEFAULT_GENERATION_TEMPLATE = """{{ instruction }}

{% for ex in examples %}{{ input_prefix }}{{ ex.text }}
{{ output_prefix }} {{ ex.label }}

{% endfor %}{{ input_prefix }}{{ text }}
{{ output_prefix }}"""


def cut_words(text: str, max_words: Optional[int]) -> tuple[str, bool]:
    """The first ``max_words`` words of ``text`` on one line, and whether anything was cut."""
    words = one_line(text).split(" ")
    if max_words is None or len(words) <= max_words:
        return " ".join(words), False
    return " ".join(words[:max_words]), True


# a sentence ends at . ! or ? (and any closing quote or bracket) followed by space and a capital,
# a digit or an opening quote: "1.5m" and "U.S" inside a sentence do not end it
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"'\u2019\u201d)\]]*)\s+(?=[A-Z0-9\"'\u2018\u201c(])")


def first_sentences(text: str, n: Optional[int]) -> str:
    """The first ``n`` sentences of ``text`` (all of it when ``n`` is None or it has no more)."""
    if n is None:
        return text
    for count, m in enumerate(_SENTENCE_END.finditer(text), start=1):
        if count == n:
            return text[: m.start() + len(m.group(1))].strip()
    return text


def effective_finish_reason(
    answer: Optional[str], parsed: Optional[str], finish_reason: Optional[str]
) -> Optional[str]:
    """``length`` only when the cut reached the text that was kept.

    An answer cut at ``max_tokens`` whose kept part (first line, first sentences) ended before
    the cut is complete: the truncation fell in what :meth:`GenerationTemplate.parse` dropped.
    Such a sample counts as ``stop``; one whose kept part runs to the cut stays ``length``
    (invalid, counted as truncated).
    """
    if finish_reason != "length" or not answer or not parsed:
        return finish_reason
    a = answer.strip()
    at = a.find(parsed)
    return "stop" if at >= 0 and at + len(parsed) < len(a) else finish_reason


@dataclass
class GenerationTemplate:
    """A writing prompt: instruction, few-shot (input, output) examples, limits on input and output length."""

    name: str
    instruction: str
    examples: list[Example]  # ``label`` holds the example's output text
    max_words: int
    max_input_words: Optional[int] = 300
    max_sentences: Optional[int] = None  # keep the answer's first N sentences (None: its whole first line)
    student_instruction_text: str = ""
    input_prefix: str = "Article: "
    output_prefix: str = "Summary:"
    completion_template: str = DEFAULT_GENERATION_TEMPLATE
    source: str = ""
    labels: list[str] = field(default_factory=list)  # none: the answer is free text
    task: str = "generate"

    def __post_init__(self) -> None:
        self._slot = SlotTemplate(self.completion_template)
        self._variants: list[tuple[int, ...]] | None = None

    # -- rendering -----------------------------------------------------------------
    def variant_count(self, limit: int = MAX_VARIANTS) -> int:
        return len(self._orders()[:limit])

    def check_variants(self, k: int) -> None:
        n = self.variant_count(max(k, 1))
        if n < k:
            raise PromptError(
                f"{self.source or self.name}: teacher.samples={k} with variation 'prompt_variants' needs {k} "
                f"distinct prompts, but this template's {len(self.examples)} example(s) give only {n}"
            )

    def _orders(self) -> list[tuple[int, ...]]:
        if self._variants is None:
            self._variants = distinct_variants(self.examples, MAX_VARIANTS, self.name)
        return self._variants

    def examples_for(self, sample_index: int, vary: bool) -> list[Example]:
        if not vary or sample_index == 0:
            return list(self.examples)
        orders = self._orders()
        if sample_index >= len(orders):
            self.check_variants(sample_index + 1)
        return [self.examples[j] for j in orders[sample_index]]

    def item_text(self, text: str) -> str:
        """What of a document goes into the prompt's slot: its first ``max_input_words`` words, on one line."""
        return defuse_markup(cut_words(text, self.max_input_words)[0])

    def render_completion(self, text: str, sample_index: int = 0, vary: bool = False) -> str:
        return self._slot.render(
            sample_index if vary else 0,
            self.item_text(text),
            instruction=self.instruction.strip(),
            examples=self.examples_for(sample_index, vary),
            input_prefix=self.input_prefix,
            output_prefix=self.output_prefix,
        )

    def render_chat(self, text: str, sample_index: int = 0, vary: bool = False) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.instruction.strip()}]
        for ex in self.examples_for(sample_index, vary):
            msgs.append({"role": "user", "content": cut_words(ex.text, self.max_input_words)[0]})
            msgs.append({"role": "assistant", "content": ex.label})
        msgs.append({"role": "user", "content": self.item_text(text)})
        return msgs

    def student_instruction(self, text: str) -> str:
        """The student's zero-shot input: the instruction and the (cut) document, no examples."""
        instruction = (self.student_instruction_text or self.instruction).strip()
        return f"{instruction}\n\n{cut_words(text, self.max_input_words)[0]}"

    # -- parsing -------------------------------------------------------------------
    def parse(self, answer: Optional[str]) -> Optional[str]:
        """The answer's first non-empty line, stripped (its first ``max_sentences`` sentences when
        set); None for no answer or an empty one.

        Why sentences: a small teacher asked for "a one-sentence summary" often writes one and
        goes on; the sentence it was asked for is complete, and what follows is dropped, not
        held against it. Length is judged by the aggregation (an over-length sample is invalid
        and counted there).
        """
        if answer is None:
            return None
        for line in answer.strip().splitlines():
            if line.strip():
                return first_sentences(line.strip(), self.max_sentences)
        return None

    def template_hash(self) -> str:
        blob = yaml.safe_dump(
            {
                "instruction": self.instruction,
                "examples": [(e.text, e.label) for e in self.examples],
                "max_words": self.max_words,
                "max_input_words": self.max_input_words,
                **({"max_sentences": self.max_sentences} if self.max_sentences else {}),
                "student": self.student_instruction_text,
                "input_prefix": self.input_prefix,
                "output_prefix": self.output_prefix,
                "template": self.completion_template,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


GENERATION_FIELDS = {
    "name",
    "task",
    "instruction",
    "student_instruction",
    "examples",
    "max_words",
    "max_input_words",
    "max_sentences",
    "input_prefix",
    "output_prefix",
    "completion_template",
}


def generation_template_from(raw: dict[str, Any], p: Path) -> GenerationTemplate:
    """Validate a ``task: generate`` template mapping; errors name the file and the field."""
    unknown = set(raw) - GENERATION_FIELDS
    if unknown:
        raise PromptError(f"{p}: unknown field(s) {sorted(unknown)}; allowed: {sorted(GENERATION_FIELDS)}")
    for req in ("name", "instruction", "max_words"):
        if not raw.get(req):
            raise PromptError(f"{p}: field '{req}' is required")
    for fld in ("max_words", "max_sentences"):
        if fld in raw and (not isinstance(raw[fld], int) or isinstance(raw[fld], bool) or raw[fld] < 1):
            raise PromptError(f"{p}: field '{fld}' must be a positive integer")
    examples = []
    for i, ex in enumerate(raw.get("examples") or []):
        if not isinstance(ex, dict) or set(ex) != {"text", "output"}:
            raise PromptError(f"{p}: examples[{i}] must have exactly 'text' and 'output'")
        out = str(ex["output"]).strip()
        if not out or len(out.split()) > raw["max_words"]:
            raise PromptError(f"{p}: examples[{i}].output must be 1 to max_words={raw['max_words']} words")
        examples.append(Example(text=str(ex["text"]), label=out))
    kwargs: dict[str, Any] = {
        k: raw[k]
        for k in ("input_prefix", "output_prefix", "completion_template", "max_input_words", "max_sentences")
        if k in raw
    }
    try:
        return GenerationTemplate(
            name=raw["name"],
            instruction=raw["instruction"],
            examples=examples,
            max_words=raw["max_words"],
            student_instruction_text=raw.get("student_instruction", ""),
            source=str(p),
            **kwargs,
        )
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"{p}: completion_template: {e}") from None


def load_generation_prompt(path: str) -> GenerationTemplate:
    raw, p = read_template_file(path)
    if raw.get("task") != "generate":
        raise PromptError(f"{p}: not a generation template (it needs 'task: generate')")
    return generation_template_from(raw, p)
