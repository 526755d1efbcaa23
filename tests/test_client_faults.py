"""The client against a fake server that injects every fault the issue lists."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from distill.config import config_from_dict
from tasks.teacher.cache import ResponseCache
from tasks.teacher.shard import annotate_shard
from tasks.templates.load import load_prompt
from tests.conftest import shard_settings
from tests.fake_openai import FAKE_PRICES

SECRET = "sk-test-DO-NOT-LEAK-123"
MARKERS = ["429", "500", "502html", "html200", "slow", "drop", "badjson", "offlabel", "dead", "401"]


def make_items(tmp_path):
    rows = []
    for i in range(24):
        rows.append({"id": f"n{i}", "text": f"{'good' if i % 2 else 'awful'} film number {i}"})
    for m in MARKERS:
        for j in range(2):
            rows.append({"id": f"{m}-{j}", "text": f"{'good' if j else 'poor'} film [{m}] {j}"})
    df = pd.DataFrame(rows)
    p = tmp_path / "shard.parquet"
    df.to_parquet(p)
    return p, df


def make_cfg(tmp_path, prompt, base_url, teacher=None, **client):
    return config_from_dict(
        {
            "run_name": "t",
            "workdir": str(tmp_path / "runs"),
            "prompt": str(prompt),
            "data": {"pool_path": "unused"},
            "teacher": {
                "local": False,
                "base_url": base_url,
                "samples": 2,
                "variation": "temperature",
                "temperature": 0.7,
                "api_key_env": "FAKE_KEY",
                **(teacher or {}),
            },
            "client": {
                "concurrency": 8,
                "timeout_s": 0.5,
                "max_attempts": 4,
                "backoff_base_s": 0.01,
                "backoff_max_s": 0.05,
                "cache_path": str(tmp_path / "cache.sqlite"),
                **client,
            },
            "pricing": FAKE_PRICES,
        }
    )


def test_every_fault_ends_annotated_or_explicitly_failed(tmp_path, fake_teacher, binary_prompt, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_KEY", SECRET)
    in_path, items = make_items(tmp_path)
    cfg = make_cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    tpl = load_prompt(str(binary_prompt))
    out = tmp_path / "ann.parquet"
    res = annotate_shard(
        str(in_path), str(out), shard_settings(cfg, tpl, fake_teacher.base_url, SECRET, "run1"), show_progress=False
    )
    df = pq.read_table(out).to_pandas().set_index("id")

    assert len(df) == len(items)  # nothing lost
    for rid, row in df.iterrows():
        st = list(row["sample_status"])
        if rid.startswith(("dead", "401")):
            assert st == ["failed", "failed"], rid
            errs = list(row["sample_errors"])
            assert all(e for e in errs)
            if rid.startswith("dead"):
                assert all("gave up after 4 attempts" in e and "HTTP 500" in e for e in errs)
            else:
                assert all("HTTP 401" in e and "not retryable" in e for e in errs)
        elif rid.startswith("offlabel"):
            assert st == ["invalid", "invalid"]
            assert list(row["answers"]) == [" banana", " banana"]  # raw answer kept
            assert list(row["votes"]) == [None, None]
        else:
            assert st == ["ok", "ok"], (rid, st, list(row["sample_errors"]))
            want = "positive" if "good" in items.set_index("id").loc[rid, "text"] else "negative"
            assert list(row["votes"]) == [want, want]

    s = res.client
    # the client's counts match what the server saw
    assert s.requests_sent == len(fake_teacher.received)
    assert s.tokens_in == fake_teacher.tokens_in and s.tokens_out == fake_teacher.tokens_out
    assert s.requests_ok == sum(fake_teacher.delivered_ok.values())
    assert s.requests_failed == 2 * 2 * 2  # dead and 401 items: 2 items x 2 samples each
    # 401 is not retried, [dead] is tried max_attempts times
    n401 = sum(1 for b in fake_teacher.received if "[401]" in b)
    ndead = sum(1 for b in fake_teacher.received if "[dead]" in b)
    assert n401 == 4 and ndead == 4 * 4
    assert s.status_counts["http_429"] == 4 and s.status_counts["timeout"] == 4
    assert s.status_counts["bad_json"] == 8  # malformed JSON and the HTML page with status 200

    # the ledger agrees, attempt by attempt
    cache = ResponseCache(cfg.client.cache_path)
    tot = cache.ledger_totals("run1")
    assert tot["attempts"] == s.requests_sent and tot["ok"] == s.requests_ok
    assert tot["tokens_in"] == s.tokens_in and tot["tokens_out"] == s.tokens_out
    # errors are never cached
    n_cached = cache.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert n_cached == s.requests_ok
    cache.close()

    # the key went out in the header and nowhere else
    assert all(h == f"Bearer {SECRET}" for h in fake_teacher.auth_headers)
    for f in [cfg.client.cache_path, str(out)]:
        assert SECRET.encode() not in open(f, "rb").read()
    assert SECRET not in caplog.text

    # a rerun re-sends only what failed before
    fake_teacher.reset_counts()
    out.unlink()
    res2 = annotate_shard(
        str(in_path), str(out), shard_settings(cfg, tpl, fake_teacher.base_url, SECRET, "run2"), show_progress=False
    )
    assert res2.client.requests_cached == s.requests_ok
    assert all("[dead]" in b or "[401]" in b for b in fake_teacher.received)


def test_requests_per_minute_limit_is_respected(tmp_path, fake_teacher, binary_prompt):
    import time

    p = tmp_path / "s.parquet"
    pd.DataFrame({"id": [str(i) for i in range(30)], "text": [f"good {i}" for i in range(30)]}).to_parquet(p)
    cfg = make_cfg(tmp_path, binary_prompt, fake_teacher.base_url, requests_per_minute=1200)  # 20/s, burst 20
    cfg.teacher.samples = 1
    t0 = time.monotonic()
    annotate_shard(
        str(p),
        str(tmp_path / "o.parquet"),
        shard_settings(cfg, load_prompt(str(binary_prompt)), fake_teacher.base_url),
        show_progress=False,
    )
    assert time.monotonic() - t0 >= 0.45  # 20 at once, 10 more at 20/s
    assert len(fake_teacher.received) == 30


def test_n_choices_in_one_request(tmp_path, fake_teacher, binary_prompt):
    p = tmp_path / "s.parquet"
    pd.DataFrame({"id": ["a", "b"], "text": ["good one", "bad one"]}).to_parquet(p)
    cfg = make_cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    cfg.teacher.supports_n = True
    cfg.teacher.samples = 3
    out = tmp_path / "o.parquet"
    annotate_shard(
        str(p),
        str(out),
        shard_settings(cfg, load_prompt(str(binary_prompt)), fake_teacher.base_url),
        show_progress=False,
    )
    assert len(fake_teacher.received) == 2  # one request per item carrying n=3
    df = pq.read_table(out).to_pandas()
    assert [list(v) for v in df["votes"]] == [["positive"] * 3, ["negative"] * 3]


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_chat_and_completion_modes(tmp_path, fake_teacher, binary_prompt, mode):
    p = tmp_path / "s.parquet"
    pd.DataFrame({"id": ["a"], "text": ["good one"]}).to_parquet(p)
    cfg = make_cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    cfg.teacher.mode = mode
    out = tmp_path / "o.parquet"
    annotate_shard(
        str(p),
        str(out),
        shard_settings(cfg, load_prompt(str(binary_prompt)), fake_teacher.base_url),
        show_progress=False,
    )
    assert list(pq.read_table(out).to_pandas()["votes"][0]) == ["positive", "positive"]
    assert ("messages" in fake_teacher.received[0]) == (mode == "chat")


def test_votes_across_teachers(tmp_path, fake_teacher, binary_prompt, monkeypatch):
    """variation: teachers spreads the k samples over several teachers (two endpoints here)."""
    from tests.fake_openai import FakeOpenAI

    second = FakeOpenAI().start()
    try:
        p = tmp_path / "s.parquet"
        pd.DataFrame({"id": ["a", "b"], "text": ["good one", "bad one"]}).to_parquet(p)
        cfg = make_cfg(
            tmp_path,
            binary_prompt,
            fake_teacher.base_url,
            teacher={
                "variation": "teachers",
                "samples": 3,
                "members": [{"model": "big"}, {"model": "contrarian", "base_url": second.base_url}, {"model": "small"}],
            },
        )
        out = tmp_path / "o.parquet"
        members = [(fake_teacher.base_url, None), (second.base_url, None), (fake_teacher.base_url, None)]
        annotate_shard(
            str(p),
            str(out),
            shard_settings(cfg, load_prompt(str(binary_prompt)), fake_teacher.base_url, members=members),
            show_progress=False,
        )
        df = pq.read_table(out).to_pandas()
        assert [list(v) for v in df["votes"]] == [
            ["positive", "negative", "positive"],
            ["negative", "positive", "negative"],
        ]
        assert len(fake_teacher.received) == 4 and len(second.received) == 2
        assert {json.loads(b)["model"] for b in fake_teacher.received} == {"big", "small"}
    finally:
        second.stop()


def test_teachers_variation_needs_members(tmp_path, binary_prompt):
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.members"):
        make_cfg(tmp_path, binary_prompt, "http://127.0.0.1:1/v1", teacher={"variation": "teachers"})


@pytest.mark.parametrize("read_headers", [True, False])
def test_provider_rate_limit_headers_pace_before_the_429(tmp_path, binary_prompt, fake_teacher, read_headers):
    """A provider that allows 6 requests a second and says so in x-ratelimit-* headers: distill waits for the reset."""
    fake_teacher.window_requests, fake_teacher.window_s = 6, 0.5
    rows = pd.DataFrame({"id": [f"i{i}" for i in range(20)], "text": [f"good film {i}" for i in range(20)]})
    shard = tmp_path / f"shard-{read_headers}.parquet"
    rows.to_parquet(shard)
    cfg = make_cfg(
        tmp_path,
        binary_prompt,
        fake_teacher.base_url,
        teacher={"samples": 1, "variation": "prompt_variants"},
        rate_limit_headers=read_headers,
        max_attempts=10,
        timeout_s=5,
    )
    run = shard_settings(cfg, load_prompt(cfg.prompt), fake_teacher.base_url)
    res = annotate_shard(str(shard), str(tmp_path / f"out-{read_headers}.parquet"), run, show_progress=False)
    df = pq.read_table(res.path).to_pandas()
    assert all(list(s) == ["ok"] for s in df["sample_status"])  # the same answers either way
    too_many = fake_teacher.statuses["429"]
    print(f"429s with rate_limit_headers={read_headers}: {too_many}")
    if read_headers:
        # concurrency 8 against a window of 6: the first burst can overshoot before any answer has told the limit
        assert too_many <= 2, f"{too_many} 429s with the headers read"
    else:
        assert too_many >= 5, f"only {too_many} 429s without the headers: the comparison says nothing"
