"""Aggregate the generate task's k teacher texts per item into their medoid, shard by shard, and count what it found.

The medoid itself (which sample, by what similarity, which samples are invalid) is
tasks/generate/medoid.py; here it runs over the annotation's Parquet parts and writes the
aggregated parts the student trains on, with the columns the vote writes for labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.generate.medoid import INVALID_REASONS, medoid_frame, medoid_stats, sample_invalid_reason
from tasks.results.generate import MedoidStats
from tasks.templates.generation import effective_finish_reason


def _write(df: pd.DataFrame, dst: Path) -> str:
    tmp = dst.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(dst)
    return str(dst)


def frames(paths: list[str]) -> pd.DataFrame:
    frames = [pq.read_table(p).to_pandas() for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _effective_finishes(ann: pd.DataFrame, k: int) -> list[list[Optional[str]]]:
    """Each sample's finish reason as it bears on the kept text (see ``effective_finish_reason``)."""
    if "finish_reasons" not in ann:
        return [[None] * k for _ in range(len(ann))]
    answers = ann["answers"] if "answers" in ann else [[None] * k] * len(ann)
    return [
        [effective_finish_reason(a, v, fr) for a, v, fr in zip(ans, vs, frs)]
        for ans, vs, frs in zip(answers, ann["votes"], ann["finish_reasons"])
    ]


def medoid_shards(ann_paths: list[str], out_dir: str, k: int, similarity: str, max_words: Optional[int]) -> list[str]:
    """Aggregate each annotation shard's k texts per item into its medoid; every item is kept (abstentions too).

    Columns added, as the vote adds them for labels: ``label`` (the medoid text, None when
    the item abstains), ``confidence`` (its agreement: mean similarity to the other valid
    samples), ``medoid_sample``, ``n_valid_votes``, ``n_votes``, ``invalid_reasons``, ``abstain_reason``.
    """
    od = Path(out_dir)
    od.mkdir(parents=True, exist_ok=True)
    outs = []
    for p in ann_paths:
        ann = pq.read_table(p).to_pandas()
        fins = _effective_finishes(ann, k)
        long = [
            {"item_id": i, "sample": j, "text": v, "finish_reason": fr}
            for i, (vs, frs) in enumerate(zip(ann["votes"], fins))
            for j, (v, fr) in enumerate(zip(vs, frs))
        ]
        med = medoid_frame(
            pd.DataFrame(long, columns=["item_id", "sample", "text", "finish_reason"]),
            k=k,
            method=similarity,
            max_words=max_words,
        )
        med = med.set_index("item_id").reindex(range(len(ann)))
        out = ann.copy()
        out["sample_valid"] = [
            [sample_invalid_reason(v, fr, max_words) is None for v, fr in zip(vs, frs)]
            for vs, frs in zip(ann["votes"], fins)
        ]
        for src, dst in (
            ("text", "label"),
            ("agreement", "confidence"),
            ("medoid_sample", "medoid_sample"),
            ("n_valid", "n_valid_votes"),
            ("invalid_reasons", "invalid_reasons"),
            ("abstain_reason", "abstain_reason"),
        ):
            out[dst] = pd.Series(med[src].tolist(), index=out.index, dtype=object)
        out["n_votes"] = k
        outs.append(_write(out, od / Path(p).name))
    return outs


def medoid_summary(voted_paths: list[str], k: int) -> MedoidStats:
    """Items, samples, invalid samples by reason, abstentions and mean agreement."""
    df = frames(voted_paths)
    if df.empty:
        return MedoidStats()
    st = medoid_stats(df.rename(columns={"label": "text", "confidence": "agreement"}))
    return MedoidStats(
        items=int(st["items"]),
        votes=int(st["items"]) * k,
        invalid_votes=int(st["samples_invalid"]),
        abstained=int(st["items_abstained"]),
        mean_agreement=float(st["mean_agreement"]),
        **{f"samples_invalid_{r}": int(st[f"samples_invalid_{r}"]) for r in INVALID_REASONS},
    )
