"""Aggregate the k teacher samples of each item into one label: majority vote or mean probability.

Why these rules: confidence is measured over *all* k samples (an invalid answer or a
failed request is a vote for nothing, not a vote to ignore), so one valid answer among
three failures reads as 1/3, not 100%. Ties abstain with the reason written down, never
broken at random: a coin flip would be a label nobody gave. Items below ``min_agreement``
keep their label and are flagged for the trainer to weigh.

``majority``: the label with most votes, confidence = its share of the k samples.
``mean_probability``: each valid sample contributes its label distribution read from the
teacher's log-probabilities (tasks/teacher/label_probs.py), or a one-hot vote where the endpoint
gave none; invalid and failed samples contribute nothing; the k contributions are
averaged, the label is the argmax and the confidence its probability. Either way the
item keeps ``label_dist``, the teacher's distribution over the label set (its mean
log-probabilities over the valid samples, one-hot votes where a sample had none): what
soft-label training learns from, whichever rule picked the label. So majority can keep
the teacher's own greedy answers as labels while the student still learns how sure the
teacher was. Beside it: its entropy, and where the probabilities came from
(``logprobs``, ``votes`` or ``mixed``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.results.classify import VoteStats

NO_LABEL = "<none>"  # how an abstention is shown beside real labels in metrics


def is_missing(x: object) -> bool:
    """None or NaN: Parquet round trips through pandas may turn a missing label into NaN."""
    return x is None or (isinstance(x, float) and x != x)


def or_no_label(xs: Sequence[object]) -> list[str]:
    return [NO_LABEL if is_missing(x) else str(x) for x in xs]


@dataclass(frozen=True)
class VoteResult:
    label: Optional[str]
    confidence: float  # majority: top count / k; mean_probability: the label's mean probability over k
    n_valid_votes: int
    n_votes: int
    abstain_reason: Optional[str]
    low_agreement: bool
    label_dist: Optional[list[float]] = None  # over the label set, normalised over the valid samples
    entropy: Optional[float] = None  # of label_dist, in nats
    prob_source: Optional[str] = None  # "logprobs", "votes" or "mixed" (some samples had no log-probabilities)


def majority_vote(
    votes: Sequence[Optional[str]], min_agreement: float = 0.0, failed: Sequence[bool] | None = None
) -> VoteResult:
    """Majority vote over ``votes`` (None = invalid or failed sample); see the module docstring."""
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


def mean_probability(
    votes: Sequence[Optional[str]],
    probs: Sequence[Optional[Sequence[float]]],
    labels: list[str],
    min_agreement: float = 0.0,
    failed: Sequence[bool] | None = None,
) -> VoteResult:
    """Average the k samples' label distributions; see the module docstring for the rules."""
    k = len(votes)
    idx = {lab: i for i, lab in enumerate(labels)}
    total = [0.0] * len(labels)
    n_valid = n_lp = 0
    for v, p in zip(votes, probs):
        if v is None:
            continue
        n_valid += 1
        if p is not None and len(p) == len(labels):
            n_lp += 1
            for i, x in enumerate(p):
                total[i] += float(x)
        else:
            total[idx[v]] += 1.0
    if not n_valid:
        all_failed = failed is not None and len(failed) == k and all(failed)
        return VoteResult(None, 0.0, 0, k, "all requests failed" if all_failed else "no valid votes", True)
    source = "logprobs" if n_lp == n_valid else ("votes" if n_lp == 0 else "mixed")
    mean = [x / k for x in total]
    dist = [x / n_valid for x in total]
    top = max(mean)
    leaders = sorted(labels[i] for i, x in enumerate(mean) if top - x <= 1e-9)
    ent = _entropy(dist)
    if len(leaders) > 1:
        return VoteResult(None, top, n_valid, k, "tie between " + " and ".join(leaders), True, dist, ent, source)
    return VoteResult(leaders[0], top, n_valid, k, None, top < min_agreement, dist, ent, source)


def _entropy(dist: Sequence[float]) -> float:
    import math

    return float(-sum(p * math.log(p) for p in dist if p > 0))


def _with_distribution(r: VoteResult, dist: VoteResult) -> VoteResult:
    """A majority result carrying the teacher's label distribution (from :func:`mean_probability`)."""
    if dist.label_dist is None:
        return r
    return VoteResult(
        r.label,
        r.confidence,
        r.n_valid_votes,
        r.n_votes,
        r.abstain_reason,
        r.low_agreement,
        dist.label_dist,
        dist.entropy,
        dist.prob_source,
    )


VOTE_COLUMNS = [
    "label",
    "confidence",
    "n_valid_votes",
    "n_votes",
    "abstain_reason",
    "low_agreement",
    "label_dist",
    "entropy",
    "prob_source",
]


def vote_frame(
    ann: pd.DataFrame, min_agreement: float, labels: Optional[list[str]] = None, aggregation: str = "majority"
) -> pd.DataFrame:
    """Add the aggregation's columns to one annotation shard (columns: votes, sample_status, ...)."""
    labels = labels if labels is not None else sorted({v for vs in ann["votes"] for v in vs if v is not None})
    probs = ann["sample_probs"] if "sample_probs" in ann else [[None] * len(v) for v in ann["votes"]]
    res = []
    for v, st, p in zip(ann["votes"], ann["sample_status"], probs):
        failed = [s == "failed" for s in st]
        mp = mean_probability(list(v), [None if q is None else list(q) for q in p], labels, min_agreement, failed)
        res.append(
            mp
            if aggregation == "mean_probability"
            else _with_distribution(majority_vote(list(v), min_agreement, failed), mp)
        )
    out = ann.copy()
    for c in VOTE_COLUMNS:  # object dtype: keep None as None (pandas would turn it into NaN)
        out[c] = pd.Series([getattr(r, c) for r in res], index=out.index, dtype=object)
    return out


def vote_shards(
    ann_paths: list[str],
    out_dir: str,
    min_agreement: float,
    labels: Optional[list[str]] = None,
    aggregation: str = "majority",
) -> list[str]:
    """Aggregate each annotation shard into a voted shard; streams shard by shard."""
    from pathlib import Path

    od = Path(out_dir)
    od.mkdir(parents=True, exist_ok=True)
    outs = []
    for p in ann_paths:
        df = vote_frame(pq.read_table(p).to_pandas(), min_agreement, labels, aggregation)
        dst = od / Path(p).name
        tmp = dst.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        tmp.replace(dst)
        outs.append(str(dst))
    return outs


def vote_stats(voted_paths: list[str], k: int) -> VoteStats:
    """Counts over voted shards: items, votes, invalid/failed votes, abstentions, agreement, probability sources."""
    cols = [
        "votes",
        "sample_status",
        "label",
        "confidence",
        "abstain_reason",
        "low_agreement",
        "sample_probs",
        "entropy",
        "prob_source",
    ]
    s = VoteStats()
    hist: Counter = Counter()
    dist: Counter = Counter()
    entropy_sum, entropy_n = 0.0, 0  # a running mean: nothing kept per item
    sources: Counter = Counter()
    for df in (pq.read_table(p, columns=cols).to_pandas() for p in voted_paths):
        s.items += len(df)
        for st, probs in zip(df["sample_status"], df["sample_probs"]):
            s.votes += len(st)
            for x, p in zip(st, probs):
                if x == "ok":
                    s.valid_votes += 1
                    s.samples_with_logprobs += p is not None
                elif x == "invalid":
                    s.invalid_votes += 1
                else:
                    s.failed_votes += 1
        for lab, conf, reason, low, ent, src in zip(
            df["label"], df["confidence"], df["abstain_reason"], df["low_agreement"], df["entropy"], df["prob_source"]
        ):
            hist[agreement_bin(conf, k)] += 1
            if is_missing(lab):
                s.abstained += 1
                if not is_missing(reason) and reason.startswith("tie"):
                    s.abstained_tie += 1
                else:
                    s.abstained_no_valid += 1
                if reason == "all requests failed":
                    s.failed_items += 1
            else:
                dist[lab] += 1
                sources[src] += 1
                if not is_missing(ent):
                    entropy_sum += float(ent)
                    entropy_n += 1
            if low:
                s.low_agreement += 1
    s.invalid_rate = s.invalid_votes / s.votes if s.votes else 0.0
    s.agreement_histogram = dict(sorted(hist.items()))
    s.teacher_label_distribution = dict(sorted(dist.items()))
    s.mean_label_entropy = entropy_sum / entropy_n if entropy_n else None
    # what the aggregation used: items whose distribution came from log-probabilities, from votes, or both
    n_lp, n_ok = s.samples_with_logprobs, s.valid_votes
    used = {k: v for k, v in sources.items() if v}
    s.probability_source = (
        "logprobs" if set(used) == {"logprobs"} else "vote shares" if set(used) <= {"votes"} else "mixed"
    )
    s.probability_source_method = (
        f"{n_lp:,} of {n_ok:,} valid samples carried the teacher's log-probabilities; item distributions from "
        + ", ".join(f"{'vote shares' if k == 'votes' else k} {v:,}" for k, v in sorted(used.items()))
    )
    return s


def agreement_bin(conf: float, k: int) -> str:
    """Histogram bin of a confidence: 'j/k' for vote shares, a tenth (e.g. '0.8-0.9') for probabilities."""
    j = conf * k
    if abs(j - round(j)) < 1e-9:
        return f"{round(j)}/{k}"
    lo = min(9, int(conf * 10))
    return f"{lo / 10:.1f}-{(lo + 1) / 10:.1f}"
