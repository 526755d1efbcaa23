"""The load stage: validate the pool and gold files and write them as Parquet shards.

Why a stage of its own: every later stage reads shards from disk, never big Python lists
passed through Prefect results; and the data report (empty texts, repeated ids, invalid
UTF-8, rows set aside) is produced once, up front, before any request is paid for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from distill.config import DataConfig
from distill.runtime import long_lived_heap_frozen
from tasks.data.remote import public
from tasks.data.readers import DataError, iter_items, write_shards
from tasks.results.data import DataReport
from tasks.templates.tokens import TokenCounter


MARGIN_TOKENS = 32  # what joining the item to the prompt around it, and a chat template, may add


class ContextGuard:
    """Whether an item's prompt fits the teacher's context; cut (or refuse) the text when it does not.

    Why at load, and why this way: a prompt longer than the context fails on the server the
    same way at every attempt, so it is settled once, before any request, and counted.
    Tokenizing every text of a million-item pool would cost minutes, so two bounds come
    first: every token of a byte-level or byte-fallback tokenizer covers at least one byte,
    so a text whose UTF-8 bytes (plus the prompt's own bytes) fit is certain to fit, and a
    text of n characters has at most 4n bytes. Only texts past those bounds are counted
    with the teacher's tokenizer (loaded the first time one is needed); without it (a
    remote teacher and no teacher.tokenizer) the count is the 4-characters-per-token
    estimate, and a server that still refuses answers "context length exceeded", which
    the client takes as final. No state grows with the number of items.
    """

    def __init__(self, template: Any, ctx_tokens: int, max_tokens: int, policy: str,
                 counter_factory: Callable[[], TokenCounter]) -> None:
        self.template = template
        self.ctx = ctx_tokens
        self.max_tokens = max_tokens
        self.policy = policy
        self._counter_factory = counter_factory
        self._counter: Optional[TokenCounter] = None
        self._avail: Optional[int] = None
        # the prompts without the item, completion and chat (a run may use either; the longer one rules)
        self._completion = template.render_completion("")
        self._chat = template.render_chat("")
        chat_bytes = sum(len(m["content"].encode("utf-8")) + 8 for m in self._chat)
        overhead_bytes = max(len(self._completion.encode("utf-8")), chat_bytes)
        self.cheap_avail = ctx_tokens - max_tokens - overhead_bytes - MARGIN_TOKENS
        self.counted = 0  # texts counted with the tokenizer (the rest were settled by the bounds)

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = self._counter_factory()
        return self._counter

    @property
    def avail(self) -> int:
        """Tokens left for the item: the context less the answer, the prompt around the item and a margin."""
        if self._avail is None:
            c = self.counter
            overhead = max(c.count(self._completion, prompt=True), c.count_prompt({"messages": self._chat}))
            self._avail = self.ctx - self.max_tokens - overhead - MARGIN_TOKENS
            if self._avail < 1:
                raise DataError(f"the prompt alone ({overhead} tokens) and teacher.max_tokens={self.max_tokens} leave "
                                f"no room for an item in the teacher's context of {self.ctx} tokens")
        return self._avail

    def __call__(self, text: str) -> tuple[Optional[str], Optional[str]]:
        # the bound in bytes: the prompt around the item in bytes until the tokenizer is loaded, then in tokens
        bound = self.cheap_avail if self._avail is None else self._avail
        if len(text) * 4 <= bound:  # at most 4 bytes per character: certain to fit
            return text, None
        item = self.template.item_text(text)
        nbytes = len(item.encode("utf-8", "surrogatepass"))
        if nbytes <= bound or nbytes <= self.avail:  # (self.avail loads the tokenizer, once)
            return text, None
        self.counted += 1
        n = self.counter.count(item)
        if n <= self.avail:
            return text, None
        if self.policy == "reject":
            return None, (f"text of {n} tokens does not fit the teacher's context ({self.avail} tokens left for an "
                          f"item of {self.ctx}; data.overlong: reject)")
        cut = self._cut(item)
        return cut, f"cut from {n} to {self.counter.count(cut)} tokens to fit the teacher's context of {self.ctx}"

    def _cut(self, item: str) -> str:
        """The longest head of ``item`` (ending at a word where one is near) whose tokens fit."""
        lo, hi = 0, min(len(item), self.avail * 32)  # no token covers more than 32 characters here
        while lo < hi:  # the longest prefix that fits: O(log n) counts of at most the prefix
            mid = (lo + hi + 1) // 2
            if self.counter.count(item[:mid]) <= self.avail:
                lo = mid
            else:
                hi = mid - 1
        head = item[:lo]
        space = head.rfind(" ")
        if lo < len(item) and space >= lo * 0.9:
            head = head[:space]
        return head.rstrip()


def _write_rejected(rows: list[dict], path: Path) -> Optional[str]:
    if not rows:
        if path.exists():
            path.unlink()
        return None
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), path)
    return str(path)


@dataclass
class PreparedInputs:
    """The pool (and gold) as Parquet shards, with what loading found and set aside."""

    pool_shards: list[str]
    pool_report: DataReport
    pool_rejected: Optional[str]  # the file of pool rows set aside, with reasons
    gold_shards: list[str] = field(default_factory=list)
    gold_report: Optional[DataReport] = None
    gold_rejected: Optional[str] = None


@long_lived_heap_frozen()
def prepare_inputs(data: DataConfig, *, labels: Optional[list[str]], out_dir: Path,
                   guard: Optional[ContextGuard] = None) -> PreparedInputs:
    """Write pool shards (and the seeded gold subset for scoring the teacher) under ``out_dir``.

    With a ``guard`` (the teacher's context is known), texts whose prompt would not fit are
    cut or set aside per ``data.overlong``; ``labels`` checks the gold labels.
    """
    d = data
    pool_report = DataReport(path=public(d.pool_path))
    rejected: list[dict] = []
    chunks = iter_items(d.pool_path, d.text_column, d.id_column, d.chunk_rows, limit=d.pool_limit,
                        report=pool_report, rejected=rejected, fit=guard, storage_options=d.storage_options)
    out = PreparedInputs([str(p) for p in write_shards(chunks, out_dir / "pool", d.chunk_rows)], pool_report,
                         _write_rejected(rejected, out_dir / "pool_rejected.parquet"))
    if d.gold_path:
        gold_report = DataReport(path=public(d.gold_path))
        g_rej: list[dict] = []
        frames = list(iter_items(d.gold_path, d.text_column, d.id_column, d.chunk_rows,
                                 label_column=d.gold_label_column, labels=labels, report=gold_report,
                                 rejected=g_rej, fit=guard, storage_options=d.storage_options))
        gold = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "text", "label"])
        gold = gold.rename(columns={"label": "label_gold"})
        if d.gold_teacher_limit is not None and len(gold) > d.gold_teacher_limit:
            idx = sorted(random.Random(d.seed).sample(range(len(gold)), d.gold_teacher_limit))
            gold = gold.iloc[idx].reset_index(drop=True)
        out.gold_shards = ([str(p) for p in write_shards(iter([gold]), out_dir / "gold", d.chunk_rows)]
                           if len(gold) else [])
        out.gold_report = gold_report
        out.gold_rejected = _write_rejected(g_rej, out_dir / "gold_rejected.parquet")
    return out
