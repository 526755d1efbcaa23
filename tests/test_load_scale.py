"""Issue 11, under load, in small: the plan's calibration reads a small table, not the whole cache; memory stays flat.

bench/million.py runs the full-size version (a million items through the CLI). Here:
``model_history`` read from its small table gives the figures of the former json_extract scan, on a
fresh cache and on a file written before the indexed columns existed; the plan of the same
items takes about as long on a cache with 100,000 other answers as on an empty one
(measured side by side); and the peak RSS of ``distill annotate`` over 20,000 items stays
within 15% of a 2,000-item run, against a fast fake teacher in its own process.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

import pytest

from tasks.teacher.cache import (
    SCHEMA_VERSION,
    CachedAnswer,
    KeyMaker,
    ResponseCache,
    model_history_scan,
    request_key,
)

SP = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 4, "stop": ["\n"], "seed": 0, "logprobs": 5}


def _fill(cache: ResponseCache, n: int, seed: int = 0) -> None:
    """n answers of several models, caps, chat and completion prompts, some without usage, some estimated."""
    rng = random.Random(seed)
    cache.autoflush = False
    for i in range(n):
        model = rng.choice(["m1", "m2", "m3"])
        cap = rng.choice([4, 4, 60])
        if rng.random() < 0.3:
            req = {
                "model": model,
                "max_tokens": cap,
                "messages": [
                    {"role": "system", "content": "sys é" * rng.randint(1, 4)},
                    {"role": "user", "content": f"item {i} " * rng.randint(1, 9)},
                ],
            }
        else:
            req = {"model": model, "max_tokens": cap, "prompt": f"Review: item {i} ünï " * rng.randint(1, 9)}
        pt = None if rng.random() < 0.1 else rng.randint(10, 200)
        src = rng.choice(["reported", "reported", "counted", "estimated", None])
        n_choices = rng.choice([1, 1, 3])
        entries = [
            (
                f"k{i}-{j}",
                CachedAnswer(" positive", "stop", pt if j == 0 else None, rng.randint(1, cap) if j == 0 else None, src),
            )
            for j in range(n_choices)
        ]
        cache.put_success(entries, req, "run", attempt=1, http_status=200, latency_s=rng.random())
        if rng.random() < 0.05:
            cache.put_attempt(
                f"k{i}-0",
                "run",
                2,
                status="http_500",
                http_status=500,
                latency_s=rng.random(),
                prompt_tokens=None,
                completion_tokens=None,
                error="boom",
                model=model,
            )
        if i % 5000 == 0:
            cache.flush()
    cache.flush()
    cache.autoflush = True


def _same(a: dict, b: dict) -> bool:
    for k in b:
        x, y = a[k], b[k]
        if isinstance(y, float) and isinstance(x, float):
            if abs(x - y) > 1e-9 * max(1.0, abs(y)):
                return False
        elif x != y:
            return False
    return True


def test_model_history_reads_an_index_and_equals_the_full_scan(tmp_path):
    c = ResponseCache(tmp_path / "c.sqlite")
    _fill(c, 6000)
    for model in ("m1", "m2", "m3", "absent"):
        for cap in (None, 4, 60, 128):
            assert _same(c.model_history(model, cap), model_history_scan(c.db, model, cap)), (model, cap)
    assert c.model_history("m1", 4)["usage_n"] > 0
    # model_history reads the small history table, not the answers
    assert c.db.execute("SELECT COUNT(*) FROM history").fetchone()[0] <= 9
    # an answer replaced by a newer one for the same key (the same request) counts once, with its new figures
    for key in ("k5-0", "k7-0", "k8-0"):
        req = json.loads(c.db.execute("SELECT request FROM responses WHERE key=?", (key,)).fetchone()[0])
        c.put_success(
            [(key, CachedAnswer(" negative", "stop", 999, 7, "reported"))],
            req,
            "run",
            attempt=1,
            http_status=200,
            latency_s=0.3,
        )
        c.put_success(
            [
                (key, CachedAnswer(" negative", "stop", 5, 1, "estimated")),
                (key, CachedAnswer(" negative", "stop", None, 2, "reported")),
            ],
            req,
            "run",
            attempt=1,
            http_status=200,
            latency_s=0.3,
        )
    for model in ("m1", "m2"):
        for cap in (None, 4, 60):
            assert _same(c.model_history(model, cap), model_history_scan(c.db, model, cap)), (model, cap)
    c.close()


def test_a_cache_file_from_before_the_indexed_columns_keeps_working(tmp_path):
    """Columns added and filled once, the history table built; the answers stay readable, the figures unchanged."""
    path = tmp_path / "old.sqlite"
    c = ResponseCache(path)
    _fill(c, 2000, seed=1)
    c.close()
    db = sqlite3.connect(path)  # make it what the previous release wrote: no history, no columns, version 0
    db.execute("DROP TABLE history")
    for table, col in (
        ("responses", "model"),
        ("responses", "max_tokens"),
        ("responses", "prompt_chars"),
        ("attempts", "max_tokens"),
    ):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    db.execute("PRAGMA user_version=0")
    db.commit()
    before = {(m, cap): model_history_scan(db, m, cap) for m in ("m1", "m2") for cap in (None, 4, 60)}
    answers = {k: t for k, t in db.execute("SELECT key, text FROM responses")}
    db.close()

    c = ResponseCache(path)
    assert c.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    got = c.get_many(list(answers))
    assert {k: a.text for k, a in got.items()} == answers
    for (m, cap), fig in before.items():
        assert _same(c.model_history(m, cap), fig), (m, cap)
    # rows written after the migration count too
    c.put_success(
        [("new", CachedAnswer(" negative", "stop", 50, 2, "reported"))],
        {"model": "m1", "max_tokens": 4, "prompt": "x" * 100},
        "run2",
        attempt=1,
        http_status=200,
        latency_s=0.5,
    )
    assert _same(c.model_history("m1", 4), model_history_scan(c.db, "m1", 4))
    c.close()
    ResponseCache(path).close()  # a second open does not migrate again (nor fail)


def test_key_maker_gives_the_request_keys():
    for choice in (None, 0, 2):
        for ep in ("", "http://127.0.0.1:1/v1"):
            m = KeyMaker("teacher", SP, choice, ep)
            for prompt in ('Review: é "x" \\ \u2028\nSentiment:', [{"role": "user", "content": "a\tb"}], ""):
                assert m(prompt) == request_key("teacher", prompt, SP, choice, ep)


def _plan_seconds(cfg, shards, template, prices, counter, repeats: int = 3) -> tuple[float, dict]:
    from tasks.teacher.plan import make_plan

    best, plan = float("inf"), {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = make_plan(
            shards,
            template=template,
            teacher=cfg.teacher,
            client=cfg.client,
            pricing=cfg.pricing,
            max_usd=cfg.budget.max_usd,
            prices=prices,
            counter=counter,
        ).as_dict()
        best = min(best, time.perf_counter() - t0)
    return best, plan


def test_plan_time_does_not_grow_with_the_cache(tmp_path, binary_prompt):
    """The same 2,000-item plan on an empty cache and on one holding 100,000 other answers, side by side."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.config import config_from_dict
    from tasks.accounting.pricing import resolve_prices
    from tasks.teacher.tokenizer import counter_for
    from tasks.templates.load import load_prompt
    from tests.fake_openai import FAKE_PRICES

    shard = tmp_path / "part-00000.parquet"
    pq.write_table(
        pa.table({"id": [f"i{i}" for i in range(2000)], "text": [f"good item {i}" for i in range(2000)]}), shard
    )
    big = tmp_path / "big.sqlite"
    c = ResponseCache(big)
    c.autoflush = False
    req = {
        "model": "teacher",
        "max_tokens": 4,
        "prompt": "Review: an earlier item, with a prompt of some length\n" * 8,
        **SP,
    }
    blob = json.dumps(req)
    rows = [
        (f"other{i}", blob, " positive", "stop", 120, 1, 0.0, "reported", None, "teacher", 4, len(req["prompt"]))
        for i in range(100_000)
    ]
    with c.db:
        c.db.execute("BEGIN")
        c.db.executemany(
            "INSERT INTO responses(key,request,text,finish_reason,prompt_tokens,completion_tokens,created,"
            "usage_source,logprobs,model,max_tokens,prompt_chars) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        c.db.executemany(
            "INSERT INTO attempts(run_id,key,attempt,status,http_status,latency_s,prompt_tokens,"
            "completion_tokens,created,model,usage_source,max_tokens) VALUES (?,?,1,'ok',200,0.2,120,1,0,"
            "'teacher','reported',4)",
            [("old", r[0]) for r in rows],
        )
        c.db.execute("PRAGMA user_version=0")  # written behind the cache's back: the next open rebuilds its history
    c.close()
    ResponseCache(big).close()

    def cfg_for(cache: Path):
        return config_from_dict(
            {
                "run_name": "p",
                "workdir": str(tmp_path / "runs"),
                "prompt": str(binary_prompt),
                "data": {"pool_path": str(shard)},
                "teacher": {"local": False, "base_url": "http://127.0.0.1:9/v1", "samples": 1},
                "client": {"cache_path": str(cache)},
                "pricing": FAKE_PRICES,
            }
        )

    small_cfg, big_cfg = cfg_for(tmp_path / "empty.sqlite"), cfg_for(big)
    template = load_prompt(small_cfg.prompt)
    prices = resolve_prices(small_cfg.teacher, small_cfg.pricing)
    counter = counter_for(small_cfg.teacher)
    t_small, p_small = _plan_seconds(small_cfg, [str(shard)], template, prices, counter)
    t_big, p_big = _plan_seconds(big_cfg, [str(shard)], template, prices, counter)
    assert p_small["requests_to_send"] == p_big["requests_to_send"] == 2000
    assert "earlier answers" in p_big["tokens_out_method"]  # the big cache's history was used
    # the former scan took several times the whole plan here (about 1 s for these 100,000 rows)
    assert t_big < 1.5 * t_small + 0.1, (t_small, t_big)


@pytest.mark.system
def test_annotate_memory_is_flat_from_2k_to_20k_items(tmp_path, prefect_api):
    """Peak RSS of ``distill annotate`` (CLI, k=1, C=64) over 20,000 items within 15% of 2,000 items."""
    import argparse
    import os

    from bench.million import ENV, get_json, run_annotate, start_teacher, write_config, write_pool
    from tests.conftest import REPO

    teacher, troot = start_teacher()
    try:
        env = {
            **os.environ,
            **ENV,
            "PREFECT_API_URL": prefect_api,
            "PYTHONPATH": str(REPO),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        }
        a = argparse.Namespace(chunk_rows=2000, k=1, concurrency=64)
        peaks = {}
        for name, n in (("small", 2000), ("large", 20_000)):
            folder = tmp_path / name
            folder.mkdir()
            write_pool(folder / "pool.jsonl", n)
            write_config(folder, name, folder / "pool.jsonl", troot + "/v1", a)
            r = run_annotate(name, folder, folder / "pool.jsonl", troot + "/v1", a, env=env)
            assert r["summary"]["requests_sent"] == n
            peaks[name] = r["peak_rss_mb"]
        assert get_json(troot + "/stats")["received"] >= 22_000
    finally:
        teacher.terminate()
        teacher.wait(10)
    assert peaks["large"] <= 1.15 * peaks["small"], peaks


def test_hash_set_answers_as_a_python_set_across_merges():
    """The loader's duplicate finder: same membership as ``set`` before, at and after each merge into the array."""
    from tasks.data.hashset import HashSet64

    rng = random.Random(7)
    members = [rng.getrandbits(64) for _ in range(5000)] + [0, 2**64 - 1]
    hs, ref = HashSet64(batch=300), set()
    for i, h in enumerate(members):
        assert (h in hs) == (h in ref), i
        hs.add(h)
        ref.add(h)
        hs.add(h)  # twice: no double count
        assert h in hs and len(hs) == len(ref)
    absent = [rng.getrandbits(64) for _ in range(2000)]
    assert [a in hs for a in absent] == [a in ref for a in absent]
    assert hs._sorted.nbytes == 8 * len(hs._sorted) and len(hs._sorted) >= len(ref) - 300  # flat 8 bytes a member


def test_heap_freeze_is_scoped_and_keeps_collecting_new_cycles() -> None:
    """The bulk loops' gc.freeze hands the frozen objects back on exit, also on an error, and
    garbage cycles made inside the block are still collected (nothing leaks)."""
    import gc
    import weakref

    from distill.runtime import long_lived_heap_frozen

    class Node:
        pass

    before = gc.get_freeze_count()
    with long_lived_heap_frozen():
        assert gc.get_freeze_count() > before
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle only the collector can free
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == before

    @long_lived_heap_frozen()
    def fails() -> None:
        raise ValueError("boom")

    try:
        fails()
    except ValueError:
        pass
    assert gc.get_freeze_count() == before
