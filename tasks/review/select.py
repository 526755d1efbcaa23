"""Which items go to reviewers: the teacher's least confident, where teacher and student (or the k samples)
disagree, or a random draw.

Why these three: ``low_confidence`` spends reviewers on the labels most likely wrong (the
teacher's own probability); ``disagreement`` on the items where the student, trained on the
teacher, reads the text otherwise, or the teacher's k samples split; ``random`` is the
control every comparison needs. Items reviewed before are never sent again, and no choice
is padded: when fewer items qualify than asked for, fewer are sent and the count says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

STRATEGIES = ("low_confidence", "disagreement", "random")


@dataclass(frozen=True)
class ReviewItem:
    """One pool item as a reviewer gets it, with what the teacher (and the student) said."""

    id: str
    text: str
    teacher_label: Optional[str]  # None: the teacher abstained
    teacher_confidence: float
    samples_disagree: bool
    student_label: Optional[str] = None
    selected_by: str = ""


def candidates(votes_dir: Path) -> list[ReviewItem]:
    """The run's voted pool items: the teacher's label and confidence, and whether its k samples split."""
    parts = [p for p in sorted(votes_dir.glob("part-*.parquet")) if not p.name.endswith(".partial.parquet")]
    if not parts:
        raise FileNotFoundError(f"{votes_dir}: no voted pool shards (run `distill run` or `distill annotate` first)")
    out = []
    for p in parts:
        t = pq.read_table(p, columns=["id", "text", "votes", "label", "confidence"]).to_pydict()
        for i, text, votes, lab, conf in zip(t["id"], t["text"], t["votes"], t["label"], t["confidence"]):
            valid = {v for v in votes or [] if v is not None}
            out.append(ReviewItem(str(i), str(text), lab, float(conf or 0.0), len(valid) > 1))
    return out


def add_student(items: list[ReviewItem], model_dir: Optional[str], *, max_length: int = 128) -> list[ReviewItem]:
    """The run's student's label for each item (the disagreement strategy needs it; no student: unchanged)."""
    if not model_dir or not (Path(model_dir) / "labels.json").is_file():
        return items
    from tasks.classify.inference import StudentPredictor

    pred = StudentPredictor(model_dir, precision="fp32", max_length=max_length)
    proba = pred.predict_proba([it.text for it in items])
    return [replace(it, student_label=pred.labels[int(j)]) for it, j in zip(items, np.argmax(proba, axis=1))]


def _tie(item_id: str, seed: int) -> int:
    """A seeded, stable tie-break: the same items in the same order for the same seed."""
    return int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:12], 16)


def disagrees(it: ReviewItem) -> bool:
    vs_student = it.student_label is not None and it.student_label != it.teacher_label
    return vs_student or it.samples_disagree


def pick(
    items: list[ReviewItem], how: str, n: int, *, seed: int = 0, exclude: frozenset[str] = frozenset()
) -> list[ReviewItem]:
    """At most ``n`` items by strategy ``how``, none of ``exclude`` (reviewed before); ``selected_by`` says why."""
    if how not in STRATEGIES:
        raise ValueError(f"--select {how!r}: use one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise ValueError(f"--n {n}: ask for at least one item")
    pool = [it for it in items if it.id not in exclude]
    if how == "random":
        chosen = sorted(pool, key=lambda it: _tie(it.id, seed))
    else:
        if how == "disagreement":
            if all(it.student_label is None for it in pool) and not any(it.samples_disagree for it in pool):
                raise ValueError(
                    "--select disagreement: this run has no student to disagree with the teacher and its k samples "
                    "never split (k = 1): use low_confidence or random, or run `distill run` first"
                )
            pool = [it for it in pool if disagrees(it)]
        chosen = sorted(pool, key=lambda it: (it.teacher_confidence, _tie(it.id, seed)))
    return [replace(it, selected_by=how) for it in chosen[:n]]
