"""What every prompt template shares: the file, the item's slot, defused markup and distinct few-shot variants.

Why a module of its own: a labelling template (tasks/templates/label.py) and a writing one
(tasks/templates/generation.py) render an item the same way (its text on one line,
control-token markup defused, spliced into a frame rendered once) and vary their few-shot
examples by the same rule; both build on this module and neither imports the other.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_VARIANTS = 32  # teacher.samples is at most 32
_CANDIDATES = 3000  # orders considered per subset size when there are more (n >= 7 examples)


class SlotTemplate:
    """A completion template compiled once; the item's text spliced into its pre-rendered frame.

    Why: rendering jinja per item was most of ``distill plan`` on a million items (about 0.1
    ms a render). When the template uses ``text`` only as a bare ``{{ text }}`` (no filter,
    test or assignment, which jinja's syntax tree shows), the output is the frame rendered
    once per sample with a sentinel in the slot, with the item's text put where the sentinel
    was: the same string jinja would give. Any other use of ``text`` renders with jinja.
    Pickled as its source (a compiled jinja template is not picklable), so a template can be
    handed to a shard that runs in another process (Dask) and is compiled again there.
    """

    SENTINEL = "\x00\x01distill-slot\x01\x00"

    def __init__(self, source: str) -> None:
        self.source = source
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self.jinja = env.from_string(source)
        self.bare = _text_only_printed(env.parse(source))
        self._frames: dict[Any, list[str]] = {}

    def __getstate__(self) -> dict[str, str]:
        return {"source": self.source}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["source"])  # type: ignore[misc]

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

    printed = {
        id(n)
        for out in tree.find_all(nodes.Output)
        for n in out.nodes
        if isinstance(n, nodes.Name) and n.name == "text"
    }
    return all(id(n) in printed for n in tree.find_all(nodes.Name) if n.name == "text")


class PromptError(ValueError):
    """A prompt template file is invalid; the message names the file and field."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


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


# Chat and control tokens written as text. llama.cpp's server tokenizes a prompt with special tokens parsed
# (its /tokenize endpoint shows the same: tests/test_hostile_data.py), so "<|im_end|>" or "</s>" in an item would become
# the real control token and end the item's turn, or the document, from inside the data.
_MARKUP = re.compile(
    r"<\|[^<>|\s]{0,48}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|<(?:bos|eos|pad|unk)>", re.IGNORECASE
)


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


def read_template_file(path: str) -> tuple[dict[str, Any], Path]:
    """The template file's mapping and where it was found; errors name the file."""
    p = resolve_prompt_path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PromptError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PromptError(f"{p}: top level must be a mapping")
    return raw, p


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
        subsets = sorted(
            itertools.combinations(range(n), size), key=lambda s: -len({examples[i].label for i in s} & all_labels)
        )
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
