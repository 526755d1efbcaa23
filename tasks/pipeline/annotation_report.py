"""The annotation summary: counts, agreement, tokens, time and teacher quality on gold.

Why teacher quality is scored here: "the student is as good as the teacher" only means
something if the teacher itself was measured on human gold, single answer and voted, with
the abstentions counted as misses (coverage is reported beside it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.parquet as pq
from sklearn.metrics import accuracy_score, f1_score

from tasks.classify.aggregate import NO_LABEL, is_missing as _missing, or_no_label


def _iter_frames(paths: list[str], columns: list[str]):
    for p in paths:
        yield pq.read_table(p, columns=columns).to_pandas()


def vote_stats(voted_paths: list[str], k: int) -> dict[str, Any]:
    """Counts over voted shards: items, votes, invalid/failed votes, abstentions, agreement, probability sources."""
    cols = ["votes", "sample_status", "label", "confidence", "abstain_reason", "low_agreement", "sample_probs",
            "entropy", "prob_source"]
    s: dict[str, Any] = {"items": 0, "votes": 0, "valid_votes": 0, "invalid_votes": 0, "failed_votes": 0,
                         "abstained": 0, "abstained_tie": 0, "abstained_no_valid": 0, "failed_items": 0,
                         "low_agreement": 0, "samples_with_logprobs": 0}
    hist: Counter = Counter()
    dist: Counter = Counter()
    entropy_sum, entropy_n = 0.0, 0  # a running mean: nothing kept per item
    sources: Counter = Counter()
    for df in _iter_frames(voted_paths, cols):
        s["items"] += len(df)
        for st, probs in zip(df["sample_status"], df["sample_probs"]):
            s["votes"] += len(st)
            for x, p in zip(st, probs):
                if x == "ok":
                    s["valid_votes"] += 1
                    s["samples_with_logprobs"] += p is not None
                elif x == "invalid":
                    s["invalid_votes"] += 1
                else:
                    s["failed_votes"] += 1
        for lab, conf, reason, low, ent, src in zip(df["label"], df["confidence"], df["abstain_reason"],
                                                    df["low_agreement"], df["entropy"], df["prob_source"]):
            hist[_bin(conf, k)] += 1
            if _missing(lab):
                s["abstained"] += 1
                if not _missing(reason) and reason.startswith("tie"):
                    s["abstained_tie"] += 1
                else:
                    s["abstained_no_valid"] += 1
                if reason == "all requests failed":
                    s["failed_items"] += 1
            else:
                dist[lab] += 1
                sources[src] += 1
                if not _missing(ent):
                    entropy_sum += float(ent)
                    entropy_n += 1
            if low:
                s["low_agreement"] += 1
    s["invalid_rate"] = s["invalid_votes"] / s["votes"] if s["votes"] else 0.0
    s["agreement_histogram"] = dict(sorted(hist.items()))
    s["teacher_label_distribution"] = dict(sorted(dist.items()))
    s["mean_label_entropy"] = entropy_sum / entropy_n if entropy_n else None
    # what the aggregation used: items whose distribution came from log-probabilities, from votes, or both
    n_lp, n_ok = s["samples_with_logprobs"], s["valid_votes"]
    used = {k: v for k, v in sources.items() if v}
    s["probability_source"] = ("logprobs" if set(used) == {"logprobs"} else
                               "vote shares" if set(used) <= {"votes"} else "mixed")
    s["probability_source_method"] = (
        f"{n_lp:,} of {n_ok:,} valid samples carried the teacher's log-probabilities; item distributions from "
        + ", ".join(f"{'vote shares' if k == 'votes' else k} {v:,}" for k, v in sorted(used.items())))
    return s


def _bin(conf: float, k: int) -> str:
    """Histogram bin of a confidence: 'j/k' for vote shares, a tenth (e.g. '0.8-0.9') for probabilities."""
    j = conf * k
    if abs(j - round(j)) < 1e-9:
        return f"{round(j)}/{k}"
    lo = min(9, int(conf * 10))
    return f"{lo / 10:.1f}-{(lo + 1) / 10:.1f}"


def gold_scores(voted_paths: list[str], labels: list[str]) -> dict[str, Any]:
    """Teacher accuracy and macro-F1 against human gold: voted label and sample 0 alone."""
    gold, voted, single, conf = [], [], [], []
    for df in _iter_frames(voted_paths, ["label_gold", "label", "votes", "confidence", "n_votes"]):
        gold += df["label_gold"].tolist()
        conf += [_bin(c, n) for c, n in zip(df["confidence"], df["n_votes"])]
        voted += or_no_label(df["label"].tolist())
        single += or_no_label([v[0] for v in df["votes"]])
    if not gold:
        return {}
    kw = dict(labels=labels, average="macro", zero_division=0)
    by_agree: dict[str, str] = {}
    for share in sorted(set(conf)):
        idx = [i for i, c in enumerate(conf) if c == share]
        acc = sum(voted[i] == gold[i] for i in idx) / len(idx)
        by_agree[share] = f"{acc:.3f} (n={len(idx)})"
    return {
        "gold_items_scored": len(gold),
        "teacher_accuracy_voted": float(accuracy_score(gold, voted)),
        "teacher_macro_f1_voted": float(f1_score(gold, voted, **kw)),
        "teacher_coverage_voted": sum(v != NO_LABEL for v in voted) / len(gold),
        "teacher_accuracy_single": float(accuracy_score(gold, single)),
        "teacher_macro_f1_single": float(f1_score(gold, single, **kw)),
        "gold_label_distribution": dict(sorted(Counter(gold).items())),
        "teacher_label_distribution_on_gold": dict(sorted(Counter(voted).items())),
        "teacher_accuracy_by_agreement": by_agree,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.001:
            return f"{v:.3g}"  # per-item costs and energies are tiny; keep their digits
        return f"{v:.4f}" if v < 10 else f"{v:,.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items())
    return str(v)


def markdown_summary(summary: dict[str, Any], title: str = "distill annotation summary") -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, dict) and k in ("data_pool", "data_gold", "status_counts"):
            continue
        lines.append(f"| {k} | {_fmt(v)} |")
    for k in ("data_pool", "data_gold"):
        if isinstance(summary.get(k), dict):
            d = summary[k]
            lines.append(f"| {k} | rows {d.get('rows_read')}, items {d.get('items')}, empty {d.get('empty_text')}, "
                         f"dup ids {d.get('duplicate_ids')}, dup texts {d.get('duplicate_texts')}, "
                         f"bad utf-8 {d.get('invalid_utf8')} |")
    return "\n".join(lines) + "\n"


def terminal_summary(summary: dict[str, Any]) -> str:
    keys = ["items", "votes", "invalid_votes", "failed_votes", "abstained", "low_agreement", "requests_sent",
            "requests_cached", "tokens_in", "tokens_out", "wall_s", "teacher_items_per_s", "gold_items_scored",
            "teacher_accuracy_single", "teacher_accuracy_voted", "teacher_macro_f1_voted", "teacher_coverage_voted",
            "teacher_speed_source", "teacher_accuracy_by_agreement", "agreement_histogram", "teacher_label_distribution",
            "teacher_label_distribution_on_gold", "gold_label_distribution", "plan_requests", "plan_usd", "teacher_usd",
            "teacher_usd_failed_attempts", "teacher_kwh", "teacher_gco2", "teacher_usd_per_item", "stage_seconds"]
    width = max(len(k) for k in keys)
    out = []
    for k in keys:
        if k in summary:
            out.append(f"  {k:<{width}}  {_fmt(summary[k])}")
    return "\n".join(out)
