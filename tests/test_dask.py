"""Annotation shards on a Dask LocalCluster of two workers: the results of one process, and the cap held."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest

from distill.config import config_from_dict
from flows.annotate import annotate_flow
from tasks.accounting.budget import BudgetExhausted
from tests.fake_openai import FAKE_PRICES

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")


def cfg(tmp_path, prompt, url, name, runtime, **over):
    pool = pd.DataFrame(
        {"id": [f"p{i}" for i in range(40)], "text": [f"{'good' if i % 3 else 'bad'} item {i}" for i in range(40)]}
    )
    pool.to_parquet(tmp_path / "pool.parquet")
    raw = {
        "run_name": name,
        "workdir": str(tmp_path / "runs"),
        "prompt": str(prompt),
        "data": {"pool_path": str(tmp_path / "pool.parquet"), "chunk_rows": 10},
        "teacher": {"local": False, "base_url": url, "samples": 2},
        "client": {"cache_path": str(tmp_path / f"{name}.sqlite"), "concurrency": 2, "requests_per_minute": 6000},
        "pricing": FAKE_PRICES,
        "energy": {"measure": False},
        "runtime": runtime,
        **over,
    }
    return config_from_dict(raw)


def labels(tmp_path, name):
    d = tmp_path / "runs" / name / "votes" / "pool"
    df = pd.concat(pd.read_parquet(p) for p in sorted(d.glob("*.parquet")))
    return df.set_index("id")[["label", "confidence"]].sort_index()


DASK = {"task_runner": "dask", "dask_workers": 2}


def test_dask_shards_give_the_results_of_one_process(tmp_path, fake_teacher, binary_prompt, prefect_api):
    local = annotate_flow(cfg(tmp_path, binary_prompt, fake_teacher.base_url, "local", {}), show_progress=False)
    dask = annotate_flow(cfg(tmp_path, binary_prompt, fake_teacher.base_url, "dask", DASK), show_progress=False)
    assert local["items"] == dask["items"] == 40 and dask["requests_sent"] == local["requests_sent"] == 80
    pd.testing.assert_frame_equal(labels(tmp_path, "local"), labels(tmp_path, "dask"))
    assert dask["teacher_usd"] == pytest.approx(local["teacher_usd"])


def test_parallel_shards_hold_the_cap_and_a_rerun_pays_nothing_twice(
    tmp_path, fake_teacher, binary_prompt, prefect_api
):
    full = annotate_flow(cfg(tmp_path, binary_prompt, fake_teacher.base_url, "probe", {}), show_progress=False)
    cap = full["teacher_usd"] * 0.5  # half of what the whole run costs
    c = cfg(tmp_path, binary_prompt, fake_teacher.base_url, "capped", DASK, budget={"max_usd": cap})
    fake_teacher.reset_counts()
    with pytest.raises(BudgetExhausted) as e:
        annotate_flow(c, show_progress=False)
    assert e.value.summary["teacher_usd"] <= cap  # four shards spent at once, together under the cap
    db = sqlite3.connect(tmp_path / "capped.sqlite")
    paid = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    first = set(fake_teacher.received)
    assert 0 < paid < 80 and list((tmp_path / "runs" / "capped" / "annotations" / "pool").glob("*.partial.parquet"))
    # the same run with room for the rest completes; what was paid for comes from the cache
    fake_teacher.reset_counts()
    done = annotate_flow(
        c.model_copy(update={"budget": c.budget.model_copy(update={"max_usd": full["teacher_usd"] * 2})}),
        show_progress=False,
    )
    assert done["items"] == 40 and not set(fake_teacher.received) & first
    assert done["requests_sent"] + paid == 80
    assert json.loads((tmp_path / "runs" / "capped" / "budget_stop.json").read_text())["stopped"] == "budget"
