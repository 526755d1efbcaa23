"""Which pool items tonight's teacher budget goes to: all of them, a random few, or those the champion is least sure of.

Why: a nightly run over a source that keeps growing has a budget, and the items worth a
teacher's answer are those the current model gets wrong, not those it already knows.
With ``selection.strategy: uncertainty`` the run asks the teacher about at most
``max_new_items`` items it has not had labelled before, those the champion (loaded from
the registry by alias) gives the lowest score; ``random`` draws as many at random (the
baseline the uncertainty bench compares against). Every item labelled before stays in
the training set (its answers come from the cache). The items not chosen tonight are
never dropped silently: they are counted and written to ``input/pool_deferred.parquet``
with the reason, and remain candidates for the next night.

The run keeps a ledger of the ids it has had labelled (``selection/labelled_ids.parquet``
in its folder). Tonight's choice is written first to ``selection/pending.parquet`` and
merged into the ledger only once the annotation finished, so a run that crashes is
rerun with the same choice instead of paying for a second one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.readers import write_shards
from tasks.results.data import Selection


def _read_ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist() if path.exists() else []


def _write(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(path)


def champion_scores(texts: list[str], model_uri: str, batch: int = 512) -> Optional[list[float]]:
    """The champion's score (its top label's probability) per text, or None when there is no champion yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError):
        return None
    scores: list[float] = []
    for i in range(0, len(texts), batch):
        scores += model.predict(pd.DataFrame({"text": texts[i:i + batch]}))["score"].astype(float).tolist()
    return scores


def select_items(pool_shards: list[str], run_dir: Path, *, strategy: str, max_new: Optional[int], seed: int,
                 model_uri: str, chunk_rows: int) -> Selection:
    """Choose tonight's items (see the module docstring); 'all' changes nothing."""
    if strategy == "all":
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in pool_shards)
        return Selection(pool_shards, 0, n, 0, None, "all pool items")
    assert max_new is not None
    sel_dir = run_dir / "selection"
    ledger = set(_read_ids(sel_dir / "labelled_ids.parquet"))
    pool = pd.concat([pq.read_table(p).to_pandas() for p in pool_shards], ignore_index=True)
    candidates = pd.DataFrame(pool[~pool["id"].isin(list(ledger))])
    pending = sel_dir / "pending.parquet"
    if pending.exists():  # an earlier attempt tonight chose these and did not finish: keep its choice
        chosen = set(_read_ids(pending)) & set(candidates["id"])
        method = f"{strategy}, as chosen by the interrupted attempt tonight ({len(chosen):,} items)"
    else:
        chosen, method = _choose(candidates, strategy, max_new, seed + len(ledger), model_uri)
        _write(pd.DataFrame({"id": sorted(chosen)}), pending)
    keep = pd.DataFrame(pool[pool["id"].isin(list(ledger)) | pool["id"].isin(list(chosen))])
    deferred = pd.DataFrame(candidates[~candidates["id"].isin(list(chosen))])
    deferred_file = None
    out_dir = run_dir / "input" / "pool_selected"
    if len(deferred):
        deferred_file = str(run_dir / "input" / "pool_deferred.parquet")
        _write(pd.DataFrame({"id": deferred["id"], "reason": f"not chosen tonight ({method})"}), Path(deferred_file))
    shards = [str(p) for p in write_shards(iter([keep]), out_dir, chunk_rows)] if len(keep) else []
    labelled_before = len(ledger & set(pool["id"]))  # pool ids are unique (the loader sets repeats aside)
    return Selection(shards, labelled_before, len(chosen), len(deferred), deferred_file, method)


def _choose(candidates: pd.DataFrame, strategy: str, n: int, seed: int, model_uri: str) -> tuple[set[str], str]:
    ids = candidates["id"].tolist()
    if len(ids) <= n:
        return set(ids), f"{strategy}: all {len(ids):,} new items fit in max_new_items={n}"
    rng = random.Random(seed)
    if strategy == "uncertainty":
        scores = champion_scores(candidates["text"].tolist(), model_uri)
        if scores is not None:
            tie = [rng.random() for _ in ids]
            order = sorted(range(len(ids)), key=lambda i: (scores[i], tie[i]))
            picked = [ids[i] for i in order[:n]]
            return set(picked), (f"uncertainty: the {n:,} of {len(ids):,} new items {model_uri} is least sure of "
                                 f"(score <= {scores[order[n - 1]]:.3f})")
        note = f"uncertainty, but no model at {model_uri} yet: {n:,} of {len(ids):,} new items at random"
        return set(rng.sample(ids, n)), note
    return set(rng.sample(ids, n)), f"random: {n:,} of {len(ids):,} new items"


def commit_selection(run_dir: Path) -> None:
    """Merge tonight's choice into the ledger once the items are annotated (see the module docstring)."""
    sel_dir = run_dir / "selection"
    pending = sel_dir / "pending.parquet"
    if not pending.exists():
        return
    ids = sorted(set(_read_ids(sel_dir / "labelled_ids.parquet")) | set(_read_ids(pending)))
    _write(pd.DataFrame({"id": ids}), sel_dir / "labelled_ids.parquet")
    pending.unlink()
