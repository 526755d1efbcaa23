"""Tonight's teacher budget: the champion's least sure items, a ledger across nights, nothing dropped."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.data import select
from tasks.data.readers import write_shards


def pool(tmp_path, n=20):
    df = pd.DataFrame({"id": [f"i{k}" for k in range(n)], "text": [f"text {k}" for k in range(n)]})
    return [str(p) for p in write_shards(iter([df]), tmp_path / "in", 8)]


def ids(paths):
    return sorted(i for p in paths for i in pq.read_table(p).column("id").to_pylist())


def test_uncertainty_takes_the_least_sure_and_the_ledger_grows_night_by_night(tmp_path, monkeypatch):
    shards = pool(tmp_path)
    # the champion is surest of low-numbered items: i19, i18, ... are the least sure
    monkeypatch.setattr(select, "champion_scores", lambda texts, uri: [1 - int(t.split()[1]) / 100 for t in texts])
    run = tmp_path / "run"
    s1 = select.select_items(
        shards, run, strategy="uncertainty", max_new=5, seed=0, model_uri="models:/m@champion", chunk_rows=8
    )
    assert ids(s1.pool_shards) == sorted(f"i{k}" for k in range(15, 20))
    assert (s1.selected, s1.deferred, s1.labelled_before) == (5, 15, 0) and "least sure" in s1.method
    deferred = pd.read_parquet(s1.deferred_file)
    assert len(deferred) == 15 and deferred["reason"].str.contains("not chosen tonight").all()
    # a crash before the annotation finished: the rerun keeps tonight's choice, it does not pay for a second one
    again = select.select_items(
        shards, run, strategy="uncertainty", max_new=5, seed=0, model_uri="models:/m@champion", chunk_rows=8
    )
    assert ids(again.pool_shards) == ids(s1.pool_shards) and "interrupted attempt" in again.method
    select.commit_selection(run)
    s2 = select.select_items(
        shards, run, strategy="uncertainty", max_new=5, seed=0, model_uri="models:/m@champion", chunk_rows=8
    )
    assert s2.labelled_before == 5 and s2.selected == 5  # last night's items stay, five new ones join
    assert ids(s2.pool_shards) == sorted(f"i{k}" for k in range(10, 20))


def test_without_a_champion_uncertainty_falls_back_to_random_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(select, "champion_scores", lambda texts, uri: None)
    s = select.select_items(
        pool(tmp_path),
        tmp_path / "run",
        strategy="uncertainty",
        max_new=4,
        seed=1,
        model_uri="models:/m@champion",
        chunk_rows=8,
    )
    assert s.selected == 4 and "no model at models:/m@champion yet" in s.method
    r = select.select_items(
        pool(tmp_path),
        tmp_path / "run2",
        strategy="random",
        max_new=4,
        seed=1,
        model_uri="models:/m@champion",
        chunk_rows=8,
    )
    assert r.selected == 4 and r.method.startswith("random")


def test_all_changes_nothing(tmp_path):
    shards = pool(tmp_path)
    s = select.select_items(shards, tmp_path / "run", strategy="all", max_new=None, seed=0, model_uri="", chunk_rows=8)
    assert s.pool_shards == shards and s.selected == 20 and s.deferred == 0


def test_selection_needs_a_budget():
    from distill.config import SelectionConfig

    with pytest.raises(ValueError, match="max_new_items is required"):
        SelectionConfig(strategy="uncertainty")
