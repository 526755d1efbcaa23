"""The Batch API transport against the fake's /v1/files and /v1/batches: answers, prices, failures, kills, the cap.

What each test holds: every item is answered (or failed with its reason), nothing is sent
online, no line is processed twice by the provider (``batch_lines``: a body counted twice
was paid twice), and the spend is the batch price of what the fake reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from distill.config import config_from_dict
from tasks.accounting.pricing import resolve_prices
from tasks.teacher.cache import ResponseCache
from tasks.teacher.shard import annotate_shard, submit_shard
from tasks.templates.load import load_prompt
from tests.conftest import REPO, shard_settings
from tests.fake_openai import item_text

PRICES = {"models": {"teacher": {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "batch_discount": 0.5}}}


def _cfg(tmp_path: Path, prompt: Path, base_url: str, transport: str = "batch", **batch):
    return config_from_dict(
        {
            "run_name": "batch",
            "workdir": str(tmp_path / "runs"),
            "prompt": str(prompt),
            "data": {"pool_path": str(tmp_path / "pool.jsonl")},
            "teacher": {
                "local": False,
                "base_url": base_url,
                "samples": 2,
                "variation": "prompt_variants",
                "transport": transport,
                "batch": {"poll_interval_s": 0.01, "poll_max_interval_s": 0.05, **batch},
            },
            "client": {
                "cache_path": str(tmp_path / "cache.sqlite"),
                "timeout_s": 5,
                "backoff_base_s": 0.01,
                "backoff_max_s": 0.05,
                "max_attempts": 3,
            },
            "pricing": PRICES,
            "energy": {"measure": False},
        }
    )


def _shard(tmp_path: Path, texts: list[str], name: str = "shard") -> Path:
    p = tmp_path / f"{name}.parquet"
    pd.DataFrame({"id": [f"i{i}" for i in range(len(texts))], "text": texts}).to_parquet(p)
    return p


def _annotate(cfg, shard: Path, out: Path, **kw):
    template = load_prompt(cfg.prompt)
    run = shard_settings(cfg, template, cfg.teacher.base_url, prices=resolve_prices(cfg.teacher, cfg.pricing))
    return annotate_shard(str(shard), str(out), run, show_progress=False, **kw)


TEXTS = [f"{'good' if i % 2 else 'bad'} film number {i}" for i in range(20)]


def test_batch_answers_everything_at_half_the_online_price(tmp_path, binary_prompt, fake_teacher):
    shard = _shard(tmp_path, TEXTS)
    res = _annotate(_cfg(tmp_path, binary_prompt, fake_teacher.base_url), shard, tmp_path / "out.parquet")
    df = pq.read_table(res.path).to_pandas()
    assert res.path.endswith("out.parquet") and len(df) == 20
    assert all(list(s) == ["ok", "ok"] for s in df["sample_status"])
    assert [v[0] for v in df["votes"]] == ["positive" if i % 2 else "negative" for i in range(20)]
    assert all(p[0] is not None for p in df["sample_probs"])  # log-probabilities came through the batch too
    assert fake_teacher.received == []  # nothing went online
    assert fake_teacher.batches_created == 1 and res.client.batches_submitted == 1
    assert set(fake_teacher.batch_lines.values()) == {1} and len(fake_teacher.batch_lines) == 40
    # the spend is the batch price (half of 1.0/2.0 per 1M) of exactly what the fake reported
    want = (fake_teacher.batch_tokens_in * 0.5 + fake_teacher.batch_tokens_out * 1.0) / 1e6
    assert res.spend.spent_usd == pytest.approx(want, rel=1e-9)
    # the same items online, on a fresh cache: twice the money, the same answers
    online_dir = tmp_path / "online"
    online_dir.mkdir()
    fake_teacher.tokens_in = fake_teacher.tokens_out = 0
    ocfg = _cfg(online_dir, binary_prompt, fake_teacher.base_url, transport="online")
    ores = _annotate(ocfg, shard, online_dir / "out.parquet")
    assert ores.spend.spent_usd == pytest.approx(2 * res.spend.spent_usd, rel=1e-9)
    assert [list(v) for v in pq.read_table(ores.path).to_pandas()["votes"]] == [list(v) for v in df["votes"]]
    # the ledger: every attempt of the batch run is marked batch, every answer in the cache too
    cache = ResponseCache(tmp_path / "cache.sqlite")
    try:
        assert {t for (t,) in cache.db.execute("SELECT DISTINCT transport FROM attempts")} == {"batch"}
        assert {t for (t,) in cache.db.execute("SELECT DISTINCT transport FROM responses")} == {"batch"}
        assert cache.db.execute("SELECT state FROM batch_jobs").fetchall() == [("collected",)]
    finally:
        cache.close()
    # a rerun answers from the cache, priced at what it was bought for
    again = _annotate(_cfg(tmp_path, binary_prompt, fake_teacher.base_url), shard, tmp_path / "out2.parquet")
    assert again.client.requests_cached == 40 and fake_teacher.batches_created == 1
    assert again.spend.answers_usd == pytest.approx(res.spend.answers_usd)


def test_requests_that_fail_inside_a_batch_go_into_the_next_one(tmp_path, binary_prompt, fake_teacher):
    texts = ["good film [500]", "bad film [dead]", "bad film [401]", "good film plain", "bad film [429]"]
    cfg = _cfg(tmp_path, binary_prompt, fake_teacher.base_url, max_rounds=3)
    res = _annotate(cfg, _shard(tmp_path, texts), tmp_path / "out.parquet")
    df = pq.read_table(res.path).to_pandas().set_index("text")
    assert df.loc["good film [500]", "sample_status"].tolist() == ["ok", "ok"]  # 500 twice, then answered: round 3
    assert df.loc["bad film [429]", "sample_status"].tolist() == ["ok", "ok"]  # round 2
    assert df.loc["good film plain", "sample_status"].tolist() == ["ok", "ok"]
    dead = df.loc["bad film [dead]"]
    assert dead["sample_status"].tolist() == ["failed", "failed"]
    assert "not answered in 3 batches" in dead["sample_errors"][0]
    auth = df.loc["bad film [401]"]
    assert auth["sample_status"].tolist() == ["failed", "failed"] and "HTTP 401" in auth["sample_errors"][0]
    # each request went once per round it needed, never again after it was answered
    per_text = {}
    for body, n in fake_teacher.batch_lines.items():
        text = item_text(json.loads(body)).removeprefix("Review: ")
        per_text[text] = per_text.get(text, 0) + n
    assert per_text == {
        "good film [500]": 6,
        "bad film [dead]": 6,
        "bad film [401]": 2,
        "good film plain": 2,
        "bad film [429]": 4,
    }
    assert fake_teacher.batches_created == 3 and res.client.batches_collected == 3


@pytest.mark.parametrize("marker", ["batch_expired", "batch_failed", "batch_cancelled"])
def test_expired_failed_and_cancelled_batches_are_retried_not_lost(tmp_path, binary_prompt, fake_teacher, marker):
    texts = [f"good film {i}" for i in range(4)] + [f"bad film [{marker}]"]
    res = _annotate(
        _cfg(tmp_path, binary_prompt, fake_teacher.base_url), _shard(tmp_path, texts), tmp_path / "out.parquet"
    )
    df = pq.read_table(res.path).to_pandas()
    assert all(list(s) == ["ok", "ok"] for s in df["sample_status"])
    assert fake_teacher.batches_created == 2
    # an expired batch answered the unmarked lines before it expired: they are not asked again
    plain = [n for b, n in fake_teacher.batch_lines.items() if marker not in b]
    assert plain and set(plain) == {1}
    cache = ResponseCache(tmp_path / "cache.sqlite")
    try:
        kinds = {k for (k,) in cache.db.execute("SELECT status FROM attempts WHERE status != 'ok'")}
    finally:
        cache.close()
    status = marker.split("_")[1]
    assert kinds == {f"batch_{status}"}  # the lost round is in the ledger, by what became of the batch


@pytest.mark.system
@pytest.mark.parametrize(
    "point",
    ["batch:written", "batch:uploaded", "batch:created", "batch:submitted", "batch:finished", "batch:downloaded"],
)
def test_killed_at_any_point_of_a_batch_rerun_submits_nothing_twice(tmp_path, binary_prompt, fake_teacher, point):
    cfg = _cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    shard, out = _shard(tmp_path, TEXTS), tmp_path / "out.parquet"
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps({"config": json.loads(cfg.model_dump_json()), "in_path": str(shard), "out_path": str(out)})
    )
    env = {**os.environ, "DISTILL_FAILPOINT": point, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-m", "tests.batch_child", str(args)], env=env, cwd=REPO, timeout=120)
    assert child.returncode == -9, f"the child was not killed at {point}"
    assert not out.exists()
    res = _annotate(cfg, shard, out)
    df = pq.read_table(res.path).to_pandas()
    assert all(list(s) == ["ok", "ok"] for s in df["sample_status"])
    assert fake_teacher.batches_created == 1  # re-attached, never submitted again
    assert set(fake_teacher.batch_lines.values()) == {1} and len(fake_teacher.batch_lines) == 40
    uploads = [f for f in fake_teacher.files.values() if f["purpose"] == "batch"]
    assert len(uploads) == 1  # the file uploaded before the kill was found, not uploaded again
    assert fake_teacher.received == []


def test_the_cap_is_never_crossed_by_a_batch(tmp_path, binary_prompt, fake_teacher):
    """A batch cannot be stopped halfway: one whose worst case could cross the cap is not submitted."""
    cfg = _cfg(tmp_path, binary_prompt, fake_teacher.base_url, max_requests=10, max_in_flight=1)
    template = load_prompt(cfg.prompt)
    prices = resolve_prices(cfg.teacher, cfg.pricing)
    run = shard_settings(cfg, template, cfg.teacher.base_url, prices=prices)
    # less than one batch of 10 requests could cost at its worst case (prompt bytes + max_tokens at the batch price):
    # the first batch is cut to what fits; once real usage is known the reservations tighten, until the cap
    cap = 0.0004
    res = annotate_shard(
        str(_shard(tmp_path, TEXTS)), str(tmp_path / "out.parquet"), run, budget_left_usd=cap, show_progress=False
    )
    assert res.budget_exhausted and res.path.endswith(".partial.parquet")
    assert res.spend.spent_usd <= cap
    assert 0 < fake_teacher.batches_created < 4 and res.client.not_sent_budget > 0
    df = pq.read_table(res.path).to_pandas()
    sent = sum(list(s).count("ok") for s in df["sample_status"])
    assert sent == sum(fake_teacher.batch_lines.values())  # what is marked answered is exactly what was paid


def test_a_run_that_stops_waiting_leaves_its_batches_to_the_next(tmp_path, binary_prompt, fake_teacher):
    fake_teacher.hold_batches.set()  # a slow batch: stays in_progress
    cfg = _cfg(tmp_path, binary_prompt, fake_teacher.base_url, max_wait_s=0.3)
    shard = _shard(tmp_path, TEXTS)
    first = _annotate(cfg, shard, tmp_path / "out.parquet")
    assert first.batch_pending and first.path.endswith(".partial.parquet") and first.client.batch_pending == 40
    assert fake_teacher.batches_created == 1
    fake_teacher.hold_batches.clear()
    second = _annotate(cfg, shard, tmp_path / "out.parquet")
    assert not second.batch_pending and second.path.endswith("out.parquet")
    assert fake_teacher.batches_created == 1 and set(fake_teacher.batch_lines.values()) == {1}
    assert second.client.batches_collected == 1 and second.client.batches_submitted == 0


def test_submit_pass_puts_every_shard_at_the_provider_before_waiting(tmp_path, binary_prompt, fake_teacher):
    cfg = _cfg(tmp_path, binary_prompt, fake_teacher.base_url, max_in_flight=2)
    template = load_prompt(cfg.prompt)
    run = shard_settings(cfg, template, cfg.teacher.base_url, prices=resolve_prices(cfg.teacher, cfg.pricing))
    shards = [_shard(tmp_path, TEXTS[i::3], name=f"s{i}") for i in range(3)]
    fake_teacher.hold_batches.set()
    subs = [submit_shard(str(s), str(tmp_path / f"o{i}.parquet"), run) for i, s in enumerate(shards)]
    assert [s.client.batches_submitted for s in subs] == [1, 1, 0]  # max_in_flight across the ledger, not per shard
    fake_teacher.hold_batches.clear()
    results = [_annotate(cfg, s, tmp_path / f"o{i}.parquet") for i, s in enumerate(shards)]
    assert all(not r.batch_pending for r in results)
    assert [r.client.batches_submitted for r in results] == [0, 0, 1]
    assert fake_teacher.batches_created == 3 and set(fake_teacher.batch_lines.values()) == {1}


@pytest.mark.system
def test_distill_run_through_batches_waits_stops_and_the_next_run_collects(
    tmp_path, fake_teacher, binary_prompt, prefect_api, monkeypatch, capsys
):
    """The CLI end to end: a run that stops waiting exits 75 with the way on; the rerun collects, trains, registers."""
    import yaml

    from distill.cli import EXIT_BATCHES_PENDING
    from distill.cli import main as cli_main
    from tests.test_distill_flow import cfg_dict, write_data

    monkeypatch.chdir(tmp_path)
    write_data(tmp_path, 48, 24)
    teacher = {
        "local": False,
        "base_url": fake_teacher.base_url,
        "samples": 2,
        "variation": "prompt_variants",
        "transport": "batch",
        "batch": {"poll_interval_s": 0.05, "poll_max_interval_s": 0.2, "max_wait_s": 1.0, "max_requests": 40},
    }
    raw = cfg_dict(tmp_path, binary_prompt, teacher)
    raw["pricing"] = PRICES
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    out = tmp_path / "s.json"
    assert cli_main(["plan", str(p)]) == 0
    plan = capsys.readouterr().out
    assert "through the provider's Batch API" in plan and "online it would be" in plan
    fake_teacher.hold_batches.set()
    assert cli_main(["run", str(p), "--no-progress", "--summary-json", str(out)]) == EXIT_BATCHES_PENDING
    err = capsys.readouterr().err
    assert "distill: waiting:" in err and "run the same command again" in err
    s = json.loads(out.read_text())
    assert s["stopped"] == "batches_pending" and s["batch_pending"] > 0 and s["batches_submitted"] >= 2
    submitted = fake_teacher.batches_created
    assert submitted == 4  # every shard's batches submitted up front (max_in_flight 4), none answered yet
    fake_teacher.hold_batches.clear()
    assert cli_main(["run", str(p), "--no-progress", "--summary-json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["promoted"] is True
    assert len(fake_teacher.received) == 2  # the preflight probe, online: one item (k=2) before any batch
    assert set(fake_teacher.batch_lines.values()) == {1}  # 0 requests paid twice
    assert not set(fake_teacher.received) & set(fake_teacher.batch_lines)  # the probe's item is not batched again
    # the bill, over the two runs: the batch price of what the batches answered, the online price of the probe
    f = fake_teacher
    want = (f.batch_tokens_in * 0.5 + f.batch_tokens_out * 1.0) / 1e6
    want += ((f.tokens_in - f.batch_tokens_in) * 1.0 + (f.tokens_out - f.batch_tokens_out) * 2.0) / 1e6
    first = json.loads((tmp_path / "runs" / "dag" / "batches_pending.json").read_text())["teacher_usd"]
    assert first + s["teacher_usd"] == pytest.approx(want, rel=1e-6)
