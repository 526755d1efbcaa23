"""Majority vote over the k teacher samples of each item.

Why these rules: the vote share is the label's confidence, measured over *all* k samples
(an invalid answer or a failed request is a vote for nothing, not a vote to ignore), so
one valid answer among three failures reads as 1/3, not 100%. Ties abstain with the
reason written down, never broken at random: a coin flip would be a label nobody gave.
Items below ``min_agreement`` keep their label and are flagged for the trainer to weigh.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prefect import task


NO_LABEL = "<none>"  # how an abstention is shown beside real labels in metrics


def is_missing(x: object) -> bool:
    """None or NaN: Parquet round trips through pandas may turn a missing label into NaN."""
    return x is None or (isinstance(x, float) and x != x)


def or_no_label(xs: Sequence[object]) -> list[str]:
    return [NO_LABEL if is_missing(x) else str(x) for x in xs]


@dataclass(frozen=True)
class VoteResult:
    label: Optional[str]
    confidence: float  # top count / k
    n_valid_votes: int
    n_votes: int
    abstain_reason: Optional[str]
    low_agreement: bool


def majority_vote(votes: Sequence[Optional[str]], min_agreement: float = 0.0,
                  failed: Sequence[bool] | None = None) -> VoteResult:
    """Vote ``votes`` (None = invalid or failed sample); see the module docstring for the rules."""
    k = len(votes)
    valid = [v for v in votes if v is not None]
    if not valid:
        all_failed = failed is not None and len(failed) == k and all(failed)
        reason = "all requests failed" if all_failed else "no valid votes"
        return VoteResult(None, 0.0, 0, k, reason, True)
    counts = Counter(valid).most_common()
    top = counts[0][1]
    leaders = sorted(lab for lab, c in counts if c == top)
    if len(leaders) > 1:
        return VoteResult(None, top / k, len(valid), k, "tie between " + " and ".join(leaders), True)
    conf = top / k
    return VoteResult(leaders[0], conf, len(valid), k, None, conf < min_agreement)


VOTE_COLUMNS = ["label", "confidence", "n_valid_votes", "n_votes", "abstain_reason", "low_agreement"]


def vote_frame(ann: pd.DataFrame, min_agreement: float) -> pd.DataFrame:
    """Add vote columns to one annotation shard (columns: votes, sample_status, ...)."""
    res = [
        majority_vote(list(v), min_agreement, [s == "failed" for s in st])
        for v, st in zip(ann["votes"], ann["sample_status"])
    ]
    out = ann.copy()
    for c in VOTE_COLUMNS:  # object dtype: keep None as None (pandas would turn it into NaN)
        out[c] = pd.Series([getattr(r, c) for r in res], index=out.index, dtype=object)
    return out


def vote_shards(ann_paths: list[str], out_dir: str, min_agreement: float) -> list[str]:
    """Vote each annotation shard into a voted shard; streams shard by shard."""
    from pathlib import Path

    od = Path(out_dir)
    od.mkdir(parents=True, exist_ok=True)
    outs = []
    for p in ann_paths:
        df = vote_frame(pq.read_table(p).to_pandas(), min_agreement)
        dst = od / Path(p).name
        tmp = dst.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        tmp.replace(dst)
        outs.append(str(dst))
    return outs


@task(name="vote", task_run_name="vote-{name}")
def vote_task(ann_paths: list[str], out_dir: str, min_agreement: float, name: str = "pool") -> list[str]:
    return vote_shards(ann_paths, out_dir, min_agreement)
