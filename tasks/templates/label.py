"""Labelling prompt templates: instruction, few-shot examples, the closed label set; render and parse.

Why here and not in the client: rendering decides what is sent (and so the cache key),
parsing decides what an answer means. Parsing is deliberately *not* part of the cache
key, so a better parser re-parses cached answers for free. Parsing is strict: an answer
that is not one of the configured labels (or a declared alias) is an invalid vote, kept
with its raw text, never mapped to a label by guesswork.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import jinja2

from tasks.templates.base import (
    MAX_VARIANTS,
    Example,
    PromptError,
    SlotTemplate,
    defuse_markup,
    distinct_variants,
    normalise_answer,
    one_line,
)

DEFAULT_COMPLETION_TEMPLATE = """{{ instruction }}

{% for ex in examples %}{{ input_prefix }}{{ ex.text }}
{{ output_prefix }}{{ ex.label }}

{% endfor %}{{ input_prefix }}{{ text }}
{{ output_prefix }}"""


@dataclass
class PromptTemplate:
    """A labelling prompt: instruction, few-shot examples and the closed label set."""

    name: str
    labels: list[str]
    instruction: str
    examples: list[Example]
    input_prefix: str = "Text: "
    output_prefix: str = "Label:"
    aliases: dict[str, str] = field(default_factory=dict)
    completion_template: str = DEFAULT_COMPLETION_TEMPLATE
    source: str = ""
    # chain of thought: the teacher reasons, then answers on a last line starting with this marker ("Answer:");
    # only that line is read, so a label word inside the reasoning never counts
    answer_marker: Optional[str] = None

    def __post_init__(self) -> None:
        self._slot = SlotTemplate(self.completion_template)
        norm = {normalise_answer(lab): lab for lab in self.labels}
        for alias, target in self.aliases.items():
            if target not in self.labels:
                raise PromptError(f"{self.source}: alias {alias!r} maps to {target!r}, which is not in labels")
            norm[normalise_answer(alias)] = target
        self._lookup = norm
        self._variant_cache: list[tuple[int, ...]] = []
        self._variants_done = False

    # -- rendering -----------------------------------------------------------------
    def variant_count(self, limit: int = MAX_VARIANTS) -> int:
        """How many pairwise distinct few-shot variants this template can give (counted up to ``limit``)."""
        return len(self._variants(limit))

    def check_variants(self, k: int) -> None:
        """Refuse, before anything is sent, a k this template cannot give k distinct variants for."""
        n = self.variant_count(max(k, 1))
        if n < k:
            raise PromptError(
                f"{self.source or self.name}: teacher.samples={k} with variation 'prompt_variants' needs {k} distinct "
                f"prompts, but this template's {len(self.examples)} few-shot example(s) give only {n} distinct "
                f"variant(s) "
                f"(orders of all examples, then orders of subsets; a zero-shot prompt is not a variant). Lower "
                f"teacher.samples to {n}, add examples to the template, or use variation 'temperature' or 'teachers'."
            )

    def examples_for(self, sample_index: int, vary: bool) -> list[Example]:
        """Few-shot examples for sample i: the file's order for i=0; with ``vary``, variant i.

        Variant i does not depend on k (k=1's sample is k=3's sample 0, k=3's samples are
        k=5's first three), so changing k reuses every cached answer it can.
        """
        if not vary or sample_index == 0:
            return list(self.examples)
        variants = self._variants(sample_index + 1)
        if sample_index >= len(variants):
            self.check_variants(sample_index + 1)
        return [self.examples[j] for j in variants[sample_index]]

    def _variants(self, k: int) -> list[tuple[int, ...]]:
        if not self._variants_done:  # prefix-stable, so computed once for the most k can be
            self._variant_cache = distinct_variants(self.examples, MAX_VARIANTS, self.name)
            self._variants_done = True
        return self._variant_cache[:k]

    def item_text(self, text: str) -> str:
        """What of an item goes into the prompt's slot: its text on one line, control-token markup defused."""
        return defuse_markup(one_line(text))

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
        msgs = [
            {
                "role": "system",
                "content": self.instruction.strip() + "\nAnswer with one of: " + ", ".join(self.labels) + ".",
            }
        ]
        for ex in self.examples_for(sample_index, vary):
            msgs.append({"role": "user", "content": one_line(ex.text)})
            msgs.append({"role": "assistant", "content": ex.label})
        msgs.append({"role": "user", "content": self.item_text(text)})
        return msgs

    # -- parsing -------------------------------------------------------------------
    def parse(self, answer: Optional[str]) -> Optional[str]:
        """Map an answer to a label, or None when it is not exactly a label or alias."""
        if answer is None:
            return None
        stripped = answer.strip()
        if self.answer_marker:
            return self._after_marker(stripped)
        if stripped.startswith("{"):  # a structured-outputs answer (teacher.constrain: json_schema): {"label": ...}
            try:
                doc = json.loads(stripped)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("label"), str):
                return self._lookup.get(normalise_answer(doc["label"]))
        first = stripped.splitlines()[0] if stripped else ""
        return self._lookup.get(normalise_answer(first))

    def _after_marker(self, answer: str) -> Optional[str]:
        """The label on the last line that starts with the answer marker; None if there is no such line."""
        marker = (self.answer_marker or "").strip().lower()
        for line in reversed(answer.splitlines()):
            text = line.strip().lstrip("*#> ").strip()
            if text.lower().startswith(marker):
                return self._lookup.get(normalise_answer(text[len(marker) :].strip(" :*.")))
        return None

    def template_hash(self) -> str:
        """Hash of everything in the template that shapes a request."""
        blob = repr(
            (
                self.labels,
                self.instruction,
                [(e.text, e.label) for e in self.examples],
                self.input_prefix,
                self.output_prefix,
                self.completion_template,
            )
            + ((self.answer_marker,) if self.answer_marker else ())
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def label_template_from(raw: dict[str, Any], p: Path) -> PromptTemplate:
    """Validate a labelling template mapping; errors name the file and the field."""
    allowed = {
        "name",
        "labels",
        "instruction",
        "examples",
        "input_prefix",
        "output_prefix",
        "aliases",
        "completion_template",
        "answer_marker",
    }
    unknown = set(raw) - allowed
    if unknown:
        raise PromptError(f"{p}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    for req in ("name", "labels", "instruction"):
        if not raw.get(req):
            raise PromptError(f"{p}: field '{req}' is required")
    labels = raw["labels"]
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise PromptError(f"{p}: field 'labels' must be a list of at least two non-empty strings")
    if len({normalise_answer(x) for x in labels}) != len(labels):
        raise PromptError(f"{p}: field 'labels' has duplicates after normalisation")
    examples = []
    for i, ex in enumerate(raw.get("examples") or []):
        if not isinstance(ex, dict) or set(ex) != {"text", "label"}:
            raise PromptError(f"{p}: examples[{i}] must have exactly 'text' and 'label'")
        if ex["label"] not in labels:
            raise PromptError(f"{p}: examples[{i}].label {ex['label']!r} is not in labels {labels}")
        examples.append(Example(text=str(ex["text"]), label=ex["label"]))
    keys = ("input_prefix", "output_prefix", "completion_template", "answer_marker")
    kwargs: dict[str, Any] = {k: raw[k] for k in keys if k in raw}
    try:
        return PromptTemplate(
            name=raw["name"],
            labels=labels,
            instruction=raw["instruction"],
            examples=examples,
            aliases=dict(raw.get("aliases") or {}),
            source=str(p),
            **kwargs,
        )
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"{p}: completion_template: {e}") from None
