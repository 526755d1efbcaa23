import asyncio
import email.utils
import random
import time

import pytest

from tasks.teacher.cache import CachedAnswer, ResponseCache, request_key
from tasks.teacher.ratelimit import RateLimiter, TokenBucket, estimate_tokens
from tasks.teacher.responses import backoff_delay, parse_retry_after, redact

SP = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 3, "stop": ["\n"], "seed": 0}


def test_cache_key_covers_what_changes_the_request():
    k = request_key("m", "prompt", SP)
    assert k == request_key("m", "prompt", dict(reversed(list(SP.items()))))  # order-free
    assert k != request_key("m2", "prompt", SP)
    assert k != request_key("m", "prompt!", SP)
    assert k != request_key("m", "prompt", {**SP, "temperature": 0.7})
    assert k != request_key("m", "prompt", {**SP, "seed": 1})
    assert k != request_key("m", "prompt", {**SP, "logprobs": 5})
    assert k != request_key("m", "prompt", SP, endpoint="https://other.example/v1")  # another server
    # the choices of one n-request differ from each other and from a one-answer request
    assert len({k, request_key("m", "prompt", SP, 0), request_key("m", "prompt", SP, 1)}) == 3
    assert len(k) == 64


def test_cache_keeps_raw_logprobs_and_migrates_old_files(tmp_path):
    import sqlite3

    old = tmp_path / "old.sqlite"  # a cache file from before log-probabilities were stored
    db = sqlite3.connect(old)
    db.execute(
        "CREATE TABLE responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, text TEXT NOT NULL, "
        "finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL NOT NULL)"
    )
    db.execute("INSERT INTO responses VALUES ('old', '{}', ' negative', 'stop', 5, 1, 0)")
    db.commit()
    db.close()
    c = ResponseCache(old)
    lp = {"tokens": [" positive"], "token_logprobs": [-0.1], "top_logprobs": [{" positive": -0.1, " negative": -2.4}]}
    c.put_success(
        [("new", CachedAnswer(" positive", "stop", 10, 1, logprobs=lp))],
        {"prompt": "p"},
        "run",
        attempt=1,
        http_status=200,
        latency_s=0.1,
    )
    c.close()
    c = ResponseCache(old)
    assert c.get("new").logprobs == lp and c.get("old").logprobs is None and c.get("old").text == " negative"


def test_cache_roundtrip_and_wal(tmp_path):
    c = ResponseCache(tmp_path / "c.sqlite")
    assert c.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.put_success(
        [("k1", CachedAnswer(" positive", "stop", 10, 1))],
        {"prompt": "p"},
        "run",
        attempt=2,
        http_status=200,
        latency_s=0.1,
    )
    c.put_attempt(
        "k1",
        "run",
        1,
        status="http_500",
        http_status=500,
        latency_s=0.05,
        prompt_tokens=None,
        completion_tokens=None,
        error="boom",
    )
    c.close()
    c = ResponseCache(tmp_path / "c.sqlite")  # persisted across connections
    assert c.get("k1").text == " positive"
    assert c.get("missing") is None
    assert set(c.get_many(["k1", "nope"])) == {"k1"}
    assert c.ledger_totals("run") == {"attempts": 2, "ok": 1, "tokens_in": 10, "tokens_out": 1}


def test_bucket_arithmetic_with_fake_clock():
    now = [0.0]
    b = TokenBucket(per_minute=120, burst_s=1.0, clock=lambda: now[0])  # 2/s, capacity 2
    assert b.capacity == 2 and b.wait_time(1) == 0
    b.take(2)
    assert b.wait_time(1) == pytest.approx(0.5)
    now[0] = 0.25
    assert b.wait_time(1) == pytest.approx(0.25)
    now[0] = 10.0
    assert b.level <= b.capacity and b.wait_time(2) == 0  # refill is capped


def test_token_reservation_reconciles():
    now = [0.0]
    lim = RateLimiter(None, tokens_per_minute=6000, clock=lambda: now[0])  # 100 tok/s, capacity 100
    b = lim.tokens
    b.take(80)
    lim.reconcile(est_tokens=80, actual_tokens=30)  # 50 unused tokens come back
    assert b.level == pytest.approx(70)
    b.take(70)
    lim.reconcile(est_tokens=10, actual_tokens=60)  # overrun of 50 is charged
    assert b.level == pytest.approx(-50)
    assert b.wait_time(10) == pytest.approx(0.6)
    lim.reconcile(10, None)  # no usage reported: the reservation stands
    assert b.level == pytest.approx(-50)


def test_oversized_request_waits_for_full_bucket_not_forever():
    now = [0.0]
    b = TokenBucket(per_minute=60, clock=lambda: now[0])  # 1/s, capacity 1
    b.take(1)
    assert b.wait_time(50) == pytest.approx(1.0)


def test_rpm_limit_paces_real_requests():
    async def go():
        lim = RateLimiter(requests_per_minute=600, tokens_per_minute=None)  # 10/s, burst 10
        t0 = time.monotonic()
        for _ in range(15):
            await lim.acquire(1)
        return time.monotonic() - t0

    el = asyncio.run(go())
    assert 0.4 <= el < 1.5  # 10 at once, 5 more at 10/s


def test_estimate_tokens():
    assert estimate_tokens(400, 3) == 104
    assert estimate_tokens(400, 3, n=3) == 110


def test_retry_after_parsing():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after(date) <= 31


def test_backoff_is_jittered_capped_and_floored_by_retry_after():
    rng = random.Random(0)
    ds = [backoff_delay(a, 0.5, 4.0, None, rng) for a in range(1, 10) for _ in range(20)]
    assert all(0 <= d <= 4.0 for d in ds) and len(set(ds)) > 50
    assert all(backoff_delay(1, 0.5, 4.0, 7.0, rng) >= 7.0 for _ in range(10))


def test_redact():
    assert redact("Bearer sk-123 failed", ["sk-123"]) == "Bearer *** failed"


def test_reset_headers_in_openai_format():
    from tasks.teacher.ratelimit import parse_reset

    assert parse_reset("6m0s") == 360.0 and parse_reset("1.5s") == 1.5 and parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1h2m3s") == 3723.0 and parse_reset("2") == 2.0
    assert parse_reset("soon") is None and parse_reset(None) is None and parse_reset("5x") is None


def test_provider_limits_wait_for_the_reset_when_nothing_is_left():
    from tasks.teacher.ratelimit import ProviderLimits

    now = [100.0]
    p = ProviderLimits(clock=lambda: now[0])
    p.update(
        {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "2s"}
    )
    assert p._wait(10) == 0.0
    asyncio.run(p.acquire(10))  # takes the last request of the window
    assert p.requests_left == 0 and p._wait(10) == pytest.approx(2.0)
    now[0] += 2.5  # the window has reset and no answer said more: it holds the limit again, for as long as before
    assert p._wait(10) == 0.0 and p.requests_left == 3
    for _ in range(3):
        asyncio.run(p.acquire(10))
    assert p._wait(10) == pytest.approx(2.0)
    # an answer from the same window saying more is left (it left the server before ours arrived) does not raise it
    p.update({"x-ratelimit-remaining-requests": "9", "x-ratelimit-reset-requests": "1s"})
    assert p.requests_left == 0
    t = ProviderLimits(clock=lambda: now[0])
    t.update({"x-ratelimit-remaining-tokens": "5", "x-ratelimit-reset-tokens": "1s"})
    assert t._wait(10) == pytest.approx(1.0) and t._wait(5) == 0.0  # 10 estimated tokens do not fit the 5 left
