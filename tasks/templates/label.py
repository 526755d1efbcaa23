"""Prompt templates: load a YAML template, render it per item and sample, parse answers.

Why here and not in the client: rendering decides what is sent (and so the cache key),
parsing decides what an answer means. Parsing is deliberately *not* part of the cache
key, so a better parser re-parses cached answers for free. Parsing is strict: an answer
that is not one of the configured labels (or a declared alias) is an invalid vote, kept
with its raw text, never mapped to a label by guesswork.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import jinja2
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_VARIANTS = 32  # teacher.samples is at most 32
_CANDIDATES = 3000  # orders considered per subset size when there are more (n >= 7 examples)

DEFAULT_COMPLETION_TEMPLATE = """{{ instruction }}

{% for ex in examples %}{{ input_prefix }}{{ ex.text }}
{{ output_prefix }}{{ ex.label }}

{% endfor %}{{ input_prefix }}{{ text }}
{{ output_prefix }}"""


class SlotTemplate:
    """A completion template compiled once; the item's text spliced into its pre-rendered frame.

    Why: rendering jinja per item was most of ``distill plan`` on a million items (about 0.1
    ms a render). When the template uses ``text`` only as a bare ``{{ text }}`` (no filter,
    test or assignment, which jinja's syntax tree shows), the output is the frame rendered
    once per sample with a sentinel in the slot, with the item's text put where the sentinel
    was: the same string jinja would give. Any other use of ``text`` renders with jinja.
    """

    SENTINEL = "\x00\x01distill-slot\x01\x00"

    def __init__(self, source: str) -> None:
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self.jinja = env.from_string(source)
        self.bare = _text_only_printed(env.parse(source))
        self._frames: dict[Any, list[str]] = {}

    def render(self, frame_key: Any, text: str, **context: Any) -> str:
        """``frame_key`` names the context (it must change whenever the context does)."""
        if not self.bare:
            return self.jinja.render(text=text, **context)
        parts = self._frames.get(frame_key)
        if parts is None:
            parts = self._frames[frame_key] = self.jinja.render(text=self.SENTINEL, **context).split(self.SENTINEL)
        return text.join(parts)


def _text_only_printed(tree: Any) -> bool:
    from jinja2 import nodes

    printed = {id(n) for out in tree.find_all(nodes.Output) for n in out.nodes
               if isinstance(n, nodes.Name) and n.name == "text"}
    return all(id(n) in printed for n in tree.find_all(nodes.Name) if n.name == "text")


class PromptError(ValueError):
    """A prompt template file is invalid; the message names the file and field."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


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
                f"prompts, but this template's {len(self.examples)} few-shot example(s) give only {n} distinct variant(s) "
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
            sample_index if vary else 0, self.item_text(text),
            instruction=self.instruction.strip(),
            examples=self.examples_for(sample_index, vary),
            input_prefix=self.input_prefix,
            output_prefix=self.output_prefix,
        )

    def render_chat(self, text: str, sample_index: int = 0, vary: bool = False) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.instruction.strip() + "\nAnswer with one of: " + ", ".join(self.labels) + "."}]
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
        first = answer.strip().splitlines()[0] if answer.strip() else ""
        return self._lookup.get(normalise_answer(first))

    def template_hash(self) -> str:
        """Hash of everything in the template that shapes a request."""
        blob = repr((self.labels, self.instruction, [(e.text, e.label) for e in self.examples], self.input_prefix,
                     self.output_prefix, self.completion_template))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_PUNCT = re.compile(r"^[\s\"'`*.:;,!()\[\]-]+|[\s\"'`*.:;,!()\[\]-]+$")


def normalise_answer(s: str) -> str:
    """Lower-case and trim quotes, punctuation and whitespace at both ends (nothing inside)."""
    return _PUNCT.sub("", s).lower()


def one_line(text: str) -> str:
    """Collapse newlines so an item cannot fake the prompt's own 'Label:' lines.

    ``str.split()`` breaks on every Unicode line break (CR, LF, VT, FF, NEL, U+2028/2029,
    the file/group/record separators), so no item can start a line of its own: text that
    imitates the template (a newline, then the output prefix and a label, or a whole fake
    few-shot example) stays inside the item's line, after its input prefix.
    """
    return " ".join(text.split())


# Chat and control tokens written as text. llama.cpp tokenizes a prompt with special tokens parsed
# (llama-cpp-python: special=True when there is no suffix), so "<|im_end|>" or "</s>" in an item would become
# the real control token and end the item's turn, or the document, from inside the data.
_MARKUP = re.compile(r"<\|[^<>|\s]{0,48}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<(?:bos|eos|pad|unk)>",
                     re.IGNORECASE)


def has_markup(text: str) -> bool:
    """Whether ``text`` holds control-token markup (cheap test first: almost no real text does)."""
    return ("<" in text or "[" in text) and _MARKUP.search(text) is not None


def defuse_markup(text: str) -> str:
    """Put a space after the ``<`` (or ``[``) of every control-token string, so it tokenizes as plain text.

    Only texts that hold such markup change; every other text is returned as it is, so
    ordinary items render byte for byte as before (and keep their cache keys).
    """
    if not has_markup(text):
        return text
    return _MARKUP.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)


def prompt_hash(rendered: Any) -> str:
    return hashlib.sha256(repr(rendered).encode()).hexdigest()[:16]


def resolve_prompt_path(path: str) -> Path:
    p = Path(path)
    if p.exists():
        return p
    alt = REPO_ROOT / path
    if alt.exists():
        return alt
    alt = REPO_ROOT / "prompts" / path
    if alt.exists():
        return alt
    raise PromptError(f"prompt template not found: {path} (looked in ., {REPO_ROOT}, {REPO_ROOT / 'prompts'})")


def load_prompt(path: str) -> PromptTemplate:
    p = resolve_prompt_path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PromptError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PromptError(f"{p}: top level must be a mapping")
    if raw.get("task") == "generate":  # a writing prompt (task: generate): free text, a length limit, no labels
        from tasks.templates.generation import generation_template_from

        return generation_template_from(raw, p)  # type: ignore[return-value]
    allowed = {"name", "labels", "instruction", "examples", "input_prefix", "output_prefix", "aliases", "completion_template"}
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
    kwargs: dict[str, Any] = {k: raw[k] for k in ("input_prefix", "output_prefix", "completion_template") if k in raw}
    try:
        return PromptTemplate(
            name=raw["name"], labels=labels, instruction=raw["instruction"], examples=examples,
            aliases=dict(raw.get("aliases") or {}), source=str(p), **kwargs,
        )
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"{p}: completion_template: {e}") from None


def distinct_variants(examples: list[Example], k: int, seed: str) -> list[tuple[int, ...]]:
    """Up to ``k`` example orders (index tuples) whose rendered few-shot blocks are pairwise distinct.

    Why this order: variant 0 is the file's order (the one tuned on dev). Then the other
    orders of all the examples, best first by what small teachers are known to be
    sensitive to (Zhao et al. 2021, Lu et al. 2022): labels interleaved (fewest neighbours
    with the same label: grouped labels push a small model towards the last group's
    label; measured here, an order ending in two positives answered "positive" for 97% of
    items), then the last example's label spread evenly over the variants (recency bias
    cancels across the vote), then most positions changed from the variants already
    picked. Only when the orders run out come orders of subsets one example smaller,
    preferring subsets that keep every label. Identical examples make orders that render
    the same, so variants are told apart by content, never by index. Deterministic: ties
    are broken by a rank seeded with ``seed``.
    """
    n = len(examples)
    content = lambda order: tuple((examples[i].text, examples[i].label) for i in order)  # noqa: E731
    rng = random.Random(f"{seed}:variants")
    chosen: list[tuple[int, ...]] = [tuple(range(n))]
    seen = {content(chosen[0])}
    all_labels = {e.label for e in examples}
    for size in range(n, 0, -1):
        if len(chosen) >= k:
            break
        subsets = sorted(itertools.combinations(range(n), size),
                         key=lambda s: -len({examples[i].label for i in s} & all_labels))
        pool: list[tuple[int, ...]] = []
        for sub in subsets:
            pool.extend(_orders(sub, rng))
            if len(pool) >= _CANDIDATES:
                break
        cands = []
        for order in pool:
            c = content(order)
            if c not in seen:
                seen.add(c)
                cands.append(order)
        # each candidate's distance to its closest chosen order and how many chosen end on its last label,
        # updated as orders are chosen (so picking is linear in the candidates, not quadratic)
        grouped = {o: sum(examples[a].label == examples[b].label for a, b in zip(o, o[1:])) for o in cands}
        near = {o: min(_dist(o, c) for c in chosen) for o in cands}
        same_last = {o: sum(examples[c[-1]].label == examples[o[-1]].label for c in chosen) for o in cands}
        rank = {o: rng.random() for o in cands}
        while cands and len(chosen) < k:
            best = max(cands, key=lambda o: (-grouped[o], -same_last[o], near[o], rank[o]))
            chosen.append(best)
            cands.remove(best)
            for o in cands:
                near[o] = min(near[o], _dist(o, best))
                same_last[o] += examples[best[-1]].label == examples[o[-1]].label
    return chosen


def _orders(subset: tuple[int, ...], rng: random.Random) -> list[tuple[int, ...]]:
    """All orders of ``subset``, or a seeded sample of them when there are too many."""
    if math.factorial(len(subset)) <= _CANDIDATES:
        return list(itertools.permutations(subset))
    out = set()
    items = list(subset)
    while len(out) < _CANDIDATES:
        rng.shuffle(items)
        out.add(tuple(items))
    return sorted(out)


def _dist(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Positions at which two orders differ (a length difference counts per missing position)."""
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
