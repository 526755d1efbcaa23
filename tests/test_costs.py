"""Prices, the spend meter, the budget cap, the plan and the per-1M projection."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distill.cli import main as cli_main
from distill.config import ConfigError, ModelPrice, config_from_dict
from tasks.accounting.budget import SpendMeter
from tasks.accounting.carbon import grid_intensity, remote_teacher_energy
from tasks.accounting.costs import projection
from tasks.accounting.pricing import PricingError, load_table, resolve_price, resolve_prices
from tasks.results.accounting import TeacherPrice, figures_of
from tasks.teacher.shard import annotate_shard
from tasks.templates.load import load_prompt
from tasks.templates.tokens import heuristic_counter
from tests.conftest import REPO, shard_settings
from tests.fake_openai import FAKE_PRICES, FakeOpenAI


def base_cfg(tmp_path: Path, prompt: Path, base_url: str, **over):
    raw = {
        "run_name": "cost",
        "workdir": str(tmp_path / "runs"),
        "prompt": str(prompt),
        "data": {"pool_path": str(tmp_path / "pool.jsonl"), "chunk_rows": 1000},
        "teacher": {"local": False, "base_url": base_url, "samples": 2, "variation": "prompt_variants"},
        "client": {
            "concurrency": 4,
            "cache_path": str(tmp_path / "cache.sqlite"),
            "timeout_s": 5,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "max_attempts": 4,
        },
        "pricing": FAKE_PRICES,
        "energy": {"measure": False},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def write_pool(tmp_path: Path, n: int, name: str = "pool.jsonl", marker: str = "") -> Path:
    p = tmp_path / name
    p.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"{name}-{i}",
                    "text": f"{'good' if i % 3 else 'bad'} film {marker} number {i} "
                    + "with quite a few more words " * (i % 4),
                }
            )
            + "\n"
            for i in range(n)
        )
    )
    return p


def write_yaml(tmp_path: Path, raw: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


# --------------------------------------------------------------------------- prices


def test_token_price_arithmetic_fees_and_batch_rate():
    p = TeacherPrice("m", "tokens", input_per_mtok=2.5, output_per_mtok=10.0, per_request_usd=0.001, batch_discount=0.5)
    assert p.token_cost(1_000_000, 1_000_000, requests=0) == pytest.approx(12.5)
    assert p.token_cost(1000, 200, requests=3) == pytest.approx(0.0025 + 0.002 + 0.003)
    assert p.token_cost(None, None, requests=0) == 0.0
    b = p.batch_variant()
    assert b.batch and b.token_cost(1_000_000, 1_000_000, 0) == pytest.approx(6.25)
    assert TeacherPrice("h", "hourly", usd_per_hour=3.6).token_cost(10**6, 10**6) == 0.0  # priced by time


def test_a_price_entry_must_price_something():
    with pytest.raises(ValueError, match="no price"):
        ModelPrice()
    with pytest.raises(ValueError, match="not both"):
        ModelPrice(input_per_mtok=1, usd_per_hour=2)
    assert ModelPrice(free=True).free


def test_bundled_table_loads_and_run_overrides_win(tmp_path, binary_prompt):
    table = load_table(REPO / "configs/prices.yaml")
    assert table["gpt-4o-mini"].input_per_mtok == 0.15 and table["gpt-4"].output_per_mtok == 60
    cfg = config_from_dict(
        base_cfg(
            tmp_path,
            binary_prompt,
            "http://x/v1",
            pricing={
                "table": str(REPO / "configs/prices.yaml"),
                "models": {"gpt-4o-mini": {"input_per_mtok": 9, "output_per_mtok": 9}},
            },
        )
    )
    assert resolve_price("gpt-4o-mini", False, cfg.pricing).input_per_mtok == 9  # run override, no batch discount given
    gpt4o = resolve_price("gpt-4o", False, cfg.pricing)
    assert gpt4o.input_per_mtok == pytest.approx(2.5) and not gpt4o.batch  # the table's online price
    assert gpt4o.batch_variant().input_per_mtok == pytest.approx(1.25)  # what the batch transport bills
    local = resolve_price("teacher-x", True, cfg.pricing)
    assert local.kind == "hourly" and local.usd_per_hour == cfg.pricing.hardware_usd_per_hour
    with pytest.raises(PricingError, match="'mystery'.*pricing.free"):
        resolve_price("mystery", False, cfg.pricing)


def test_blanket_batch_pricing_is_refused_naming_the_transport(tmp_path, binary_prompt):
    """pricing.batch billed online requests at the batch rate (a cap that counted half): refused, with the way on."""
    with pytest.raises(ConfigError, match=r"pricing\.batch.*teacher\.transport: batch"):
        config_from_dict(base_cfg(tmp_path, binary_prompt, "http://x/v1", pricing={"batch": True}))


def test_bad_table_names_file_and_model(tmp_path):
    p = tmp_path / "prices.yaml"
    p.write_text("models:\n  good: {input_per_mtok: 1}\n  broken: {input_per_mtok: -1}\n")
    with pytest.raises(PricingError, match=r"prices.yaml: models.broken: input_per_mtok"):
        load_table(p)


def test_unpriced_model_fails_before_the_first_request(tmp_path, binary_prompt, fake_teacher, capsys, prefect_api):
    write_pool(tmp_path, 5)
    raw = base_cfg(tmp_path, binary_prompt, fake_teacher.base_url, teacher={"model": "mystery-model"})
    raw["pricing"] = {"table": str(REPO / "configs/prices.yaml")}
    p = write_yaml(tmp_path, raw)
    assert cli_main(["annotate", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mystery-model" in err and "No request was sent" in err
    assert fake_teacher.received == []
    assert cli_main(["plan", str(p)]) == 2
    # marked free, the same run goes ahead
    raw["pricing"]["free"] = True
    assert cli_main(["plan", str(write_yaml(tmp_path, raw))]) == 0


# --------------------------------------------------------------------------- the meter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_hourly_meter_counts_overlapping_requests_once():
    clock = Clock()
    m = SpendMeter([TeacherPrice("local", "hourly", usd_per_hour=3.6)], clock=clock)

    async def go() -> None:
        assert await m.acquire(0, 0.0) and await m.acquire(0, 0.0)  # two in flight from t=0
        clock.t = 10.0
        await m.settle(0, 0.0, prompt_tokens=None, completion_tokens=None, est_prompt=0, billed=True)
        clock.t = 20.0
        await m.settle(0, 0.0, prompt_tokens=None, completion_tokens=None, est_prompt=0, billed=True)
        clock.t = 30.0  # idle time is not charged
        assert await m.acquire(0, 0.0)
        clock.t = 35.0
        await m.settle(0, 0.0, prompt_tokens=None, completion_tokens=None, est_prompt=0, billed=True)

    asyncio.run(go())
    assert m.busy_seconds() == pytest.approx(25.0)
    assert m.spent_usd() == pytest.approx(3.6 * 25 / 3600)


def test_budget_refuses_a_request_that_would_cross_the_cap():
    price = TeacherPrice("m", "tokens", input_per_mtok=1e6, output_per_mtok=0)  # $1 per prompt token
    m = SpendMeter([price], limit_usd=10.0)

    async def go() -> list[bool]:
        got = []
        for _ in range(5):
            r = m.estimate(0, 3, 0)  # reserves 4 (3 + 1 margin)
            ok = await m.acquire(0, r)
            got.append(ok)
            if ok:
                await m.settle(0, r, prompt_tokens=3, completion_tokens=0, est_prompt=3, billed=True)
        return got

    assert asyncio.run(go()) == [True, True, True, False, False]  # 9 + a 4 reservation would cross 10
    assert m.spent_usd() == pytest.approx(9.0) and m.exhausted


def test_hourly_endpoints_on_one_server_share_its_busy_time():
    clock = Clock()
    local = TeacherPrice("local", "hourly", usd_per_hour=3.6)
    m = SpendMeter([local, local], servers=["http://a/v1", "http://a/v1"], clock=clock)

    async def go() -> None:
        assert await m.acquire(0, 0.0) and await m.acquire(1, 0.0)
        clock.t = 10.0
        await m.settle(0, 0.0, prompt_tokens=None, completion_tokens=None, est_prompt=0, billed=True, busy_s=10.0)
        await m.settle(1, 0.0, prompt_tokens=None, completion_tokens=None, est_prompt=0, billed=True, busy_s=10.0)

    asyncio.run(go())
    assert m.busy_seconds() == pytest.approx(10.0) and m.spent_usd() == pytest.approx(0.01)


def test_uncalibrated_budget_sends_one_request_until_usage_is_known():
    price = TeacherPrice("m", "tokens", input_per_mtok=1.0, output_per_mtok=1.0)
    m = SpendMeter([price], limit_usd=100.0)
    order: list[str] = []

    async def worker(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        assert await m.acquire(0, 0.001)
        order.append(f"start {name}")
        await asyncio.sleep(0.05)
        order.append(f"end {name}")
        await m.settle(
            0, 0.001, prompt_tokens=500, completion_tokens=1, est_prompt=100, billed=True
        )  # 5x the estimate: learned before the next starts

    async def go() -> None:
        await asyncio.gather(worker("a", 0), worker("b", 0.01), worker("c", 0.02))

    asyncio.run(go())
    assert order[:3] == ["start a", "end a", "start b"]  # b waited for a's usage
    assert m.prompt_ratio == pytest.approx(5.0) and m.ratio_known


def test_history_is_per_answer_when_one_request_returns_k(tmp_path):
    from tasks.teacher.cache import CachedAnswer, ResponseCache

    c = ResponseCache(tmp_path / "c.sqlite")
    req = {"model": "m", "prompt": "x" * 400, "n": 3}
    c.put_success(
        [
            ("k0", CachedAnswer("a", "stop", 100, 6, "reported")),
            ("k1", CachedAnswer("b", "stop", None, None, "reported")),
            ("k2", CachedAnswer("c", "stop", None, None, "reported")),
        ],
        req,
        "r",
        attempt=1,
        http_status=200,
        latency_s=0.5,
    )
    h = c.model_history("m")
    assert h["completion_tokens"] == pytest.approx(2.0)  # 6 tokens over 3 answers
    assert h["tokens_per_char"] == pytest.approx(100 / 400) and h["latency_s"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- usage of every attempt


def test_every_attempt_is_priced_retries_failures_and_missing_usage(tmp_path, binary_prompt, fake_teacher):
    rows = [{"id": f"n{i}", "text": f"good film {i}"} for i in range(6)]
    rows += [
        {"id": "b", "text": "bad film [billed500]"},
        {"id": "f", "text": "bad film [500]"},
        {"id": "bb", "text": "bad film [billedbad]"},
        {"id": "u", "text": "good film [nousage]"},
        {"id": "o", "text": "good film [offlabel]"},
    ]
    in_path = tmp_path / "shard.parquet"
    pd.DataFrame(rows).to_parquet(in_path)
    cfg = config_from_dict(base_cfg(tmp_path, binary_prompt, fake_teacher.base_url))
    price = resolve_prices(cfg.teacher, cfg.pricing)[0]
    res = annotate_shard(
        str(in_path),
        str(tmp_path / "out.parquet"),
        shard_settings(
            cfg,
            load_prompt(str(binary_prompt)),
            fake_teacher.base_url,
            None,
            "r1",
            prices=[price],
            counter=heuristic_counter(),
        ),
        show_progress=False,
    )
    # what the server reported (answers + the billed 500s) plus what distill had to estimate (no usage)
    counter = heuristic_counter()
    nousage = [json.loads(b) for b in fake_teacher.delivered_ok if "[nousage]" in b]
    est_in = sum(counter.count_prompt(b) for b in nousage)
    est_out = sum(counter.count_completion(" positive", "stop") for _ in nousage)
    assert len(nousage) == 2
    expected = price.token_cost(
        fake_teacher.tokens_in + fake_teacher.billed_in + est_in,
        fake_teacher.tokens_out + fake_teacher.billed_out + est_out,
        0,
    )
    assert fake_teacher.billed_in > 0
    assert res.spend.spent_usd == pytest.approx(expected, rel=1e-9)
    assert res.client.tokens_counted == est_in + est_out
    db = sqlite3.connect(cfg.client.cache_path)
    src = dict(db.execute("SELECT usage_source, COUNT(*) FROM attempts WHERE status='ok' GROUP BY 1").fetchall())
    assert src == {"reported": len(rows) * 2 - 2, "estimated": 2}
    billed_failures = db.execute(
        "SELECT COUNT(*) FROM attempts WHERE status='http_500' AND prompt_tokens > 0"
    ).fetchone()[0]
    unbilled = db.execute("SELECT COUNT(*) FROM attempts WHERE status='http_500' AND prompt_tokens IS NULL").fetchone()[
        0
    ]
    assert billed_failures == 2 and unbilled == 4  # [500] fails twice per sample, reports no usage
    bad = db.execute("SELECT COUNT(*) FROM attempts WHERE status='bad_response' AND prompt_tokens > 0").fetchone()[0]
    assert bad == 2  # 200 without choices but with usage: retried, and its usage billed


# --------------------------------------------------------------------------- the budget cap, end to end


def test_budget_cap_stops_within_one_request_and_a_rerun_continues(
    tmp_path, binary_prompt, fake_teacher, capsys, prefect_api
):
    write_pool(tmp_path, 40)
    raw = base_cfg(
        tmp_path,
        binary_prompt,
        fake_teacher.base_url,
        pricing={"models": {"teacher": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}},
        budget={"max_usd": 1.0},
    )
    out = tmp_path / "s.json"
    assert cli_main(["annotate", str(write_yaml(tmp_path, raw)), "--no-progress", "--summary-json", str(out)]) == 3
    err = capsys.readouterr().err
    assert "budget.max_usd=$1 reached" in err and "rerun with a higher budget.max_usd" in err
    s = json.loads(out.read_text())
    per_request_max = max(len(json.loads(b)["prompt"]) // 4 + 2 for b in fake_teacher.received) * 1000 / 1e6
    assert s["teacher_usd"] <= 1.0 + 1e-9
    assert s["teacher_usd"] >= 1.0 - per_request_max  # stopped within one request's cost of the cap
    assert s["teacher_usd"] == pytest.approx((fake_teacher.tokens_in + fake_teacher.tokens_out) * 1000 / 1e6)
    assert 0 < s["requests_ok"] < 80 and s["not_sent_budget"] > 0
    assert list((tmp_path / "runs/cost/annotations/pool").glob("*.partial.parquet"))  # partial results kept
    first_ok = set(fake_teacher.delivered_ok)

    fake_teacher.reset_counts()
    raw["budget"]["max_usd"] = 100.0
    assert cli_main(["annotate", str(write_yaml(tmp_path, raw)), "--no-progress", "--summary-json", str(out)]) == 0
    s2 = json.loads(out.read_text())
    assert s2["items"] == 40 and s2["votes"] == 80 and s2["requests_cached"] == len(first_ok)
    assert not (set(fake_teacher.received) & first_ok)  # nothing that had succeeded was sent again
    assert len(fake_teacher.received) == 80 - len(first_ok)
    assert not list((tmp_path / "runs/cost/annotations/pool").glob("*.partial.parquet"))


# --------------------------------------------------------------------------- the plan


def _word_tokens(text: str) -> int:
    import re

    return len(re.findall(r"\w+|[^\w\s]", text))


def _minilm_dir() -> str:
    from tasks.classify.train import resolve_student_path

    return resolve_student_path("auto")


@pytest.mark.parametrize("how", ["tokenizer", "calibrated"])
def test_plan_is_within_10_percent_of_the_run(tmp_path, binary_prompt, how, capsys, prefect_api):
    if how == "tokenizer":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_minilm_dir())
        srv = FakeOpenAI(count_tokens=lambda t: len(tok(t)["input_ids"])).start()
    else:
        srv = FakeOpenAI(count_tokens=_word_tokens).start()
    try:
        teacher = {"tokenizer": _minilm_dir()} if how == "tokenizer" else {}
        if how == "calibrated":  # an earlier run on other items teaches the plan this server's tokens per character
            write_pool(tmp_path, 30, "earlier.jsonl", marker="older")
            raw0 = base_cfg(
                tmp_path,
                binary_prompt,
                srv.base_url,
                run_name="earlier",
                data={"pool_path": str(tmp_path / "earlier.jsonl")},
            )
            assert cli_main(["annotate", str(write_yaml(tmp_path, raw0, "e.yaml")), "--no-progress"]) == 0
        write_pool(tmp_path, 60)
        raw = base_cfg(tmp_path, binary_prompt, srv.base_url, teacher=teacher)
        p = write_yaml(tmp_path, raw)
        plan_json = tmp_path / "plan.json"
        assert cli_main(["plan", str(p), "--json", str(plan_json)]) == 0
        plan = json.loads(plan_json.read_text())
        assert (
            ("tokenizer at" in plan["tokens_in_method"])
            if how == "tokenizer"
            else ("calibrated on" in plan["tokens_in_method"])
        )
        srv.reset_counts()
        out = tmp_path / "s.json"
        assert cli_main(["annotate", str(p), "--no-progress", "--summary-json", str(out)]) == 0
        s = json.loads(out.read_text())
        actual_tokens = srv.tokens_in + srv.tokens_out
        assert plan["requests_to_send"] == len(srv.received) == 120
        assert abs(plan["tokens_in"] + plan["tokens_out"] - actual_tokens) <= 0.10 * actual_tokens
        assert abs(plan["usd"] - s["teacher_usd"]) <= 0.10 * s["teacher_usd"]
        # and now everything is cached: the plan says nothing is left to send
        assert cli_main(["plan", str(p), "--json", str(plan_json)]) == 0
        assert json.loads(plan_json.read_text())["requests_to_send"] == 0
    finally:
        srv.stop()


def test_plan_refuses_a_max_tokens_that_cannot_hold_a_label(tmp_path):
    from tasks.teacher.plan import check_max_tokens
    from tasks.templates.base import PromptError
    from tasks.templates.tokens import hf_counter

    p = tmp_path / "p.yaml"
    p.write_text("name: x\nlabels: [fine, not fine at all]\ninstruction: i\n")
    t = load_prompt(str(p))
    counter = hf_counter(_minilm_dir())
    with pytest.raises(PromptError, match="cannot hold the label 'not fine at all' \\(4 tokens"):
        check_max_tokens(t, 2, counter)
    check_max_tokens(t, 4, counter)
    check_max_tokens(t, 1, heuristic_counter())  # no tokenizer of the teacher's: nothing to hold it against


# --------------------------------------------------------------------------- energy and the projection


def test_grid_intensity_and_remote_energy_estimate():
    gi = grid_intensity("USA")
    assert 100 < gi < 1000
    with pytest.raises(ValueError, match="XYZ"):
        grid_intensity("XYZ")
    e = remote_teacher_energy(1000, 5000, 0.0017, None, "USA")
    assert e.kwh == pytest.approx(1.7) and e.gco2 == pytest.approx(1.7 * gi) and e.method.startswith("estimated")
    e2 = remote_teacher_energy(1000, 5000, 0.0017, 0.01, "FRA")
    assert e2.kwh == pytest.approx(0.05) and "per 1k output tokens" in e2.method


def test_projection_per_million_items(tmp_path, binary_prompt):
    from tasks.accounting.costs import StudentSpeed
    from tasks.results.accounting import TeacherBill
    from tasks.results.teacher import TeacherSpeed

    cfg = config_from_dict(
        base_cfg(
            tmp_path,
            binary_prompt,
            "http://x/v1",
            teacher={"local": True},
            pricing={"hardware_usd_per_hour": 0.36},
            reference={
                "usd_per_hour": 3.6,
                "power_kw": 0.5,
                "teacher_throughput_factor": 10,
                "student_throughput_factor": 40,
            },
        )
    )
    bill = TeacherBill(
        teacher_usd=0.0,
        teacher_usd_method="m",
        teacher_requests_billed=0,
        teacher_attempts=0,
        teacher_usd_failed_attempts=0.0,
        teacher_busy_s=0.0,
        teacher_prices=[],
        teacher_self_hosted=True,
        teacher_tokens_counted=0,
        teacher_kwh=None,
        teacher_gco2=None,
        teacher_energy_s=0.0,
        teacher_kwh_method="m",
        teacher_gco2_method="m",
        teacher_grid_country="USA",
        teacher_grid_gco2_per_kwh=grid_intensity("USA"),
        teacher_kwh_per_item=1e-5,
        teacher_kwh_per_item_method="measured",
        teacher_usd_per_item=0.36 / 3600 / 2.0,
        teacher_usd_per_item_method="measured",
    )
    p = figures_of(
        projection(
            bill=bill,
            speed=TeacherSpeed(None, 2.0, "this run"),
            student=StudentSpeed(500.0, 4e-8, "m"),
            reference=cfg.reference,
            energy=cfg.energy,
            pricing=cfg.pricing,
            concurrency=2,
        )
    )
    assert p["teacher_hours_per_1m"] == pytest.approx(1e6 / 2 / 3600)
    assert p["teacher_usd_per_1m"] == pytest.approx(50.0)
    assert p["student_hours_per_1m"] == pytest.approx(1e6 / 500 / 3600)
    assert p["student_usd_per_1m"] == pytest.approx(0.2)
    assert p["cost_ratio_per_1m"] == pytest.approx(250.0) and p["time_ratio_per_1m"] == pytest.approx(250.0)
    assert p["co2_ratio_per_1m"] == pytest.approx(10.0 / 0.04)
    assert p["ref_teacher_hours_per_1m"] == pytest.approx(p["teacher_hours_per_1m"] / 10)
    assert p["ref_student_usd_per_1m"] == pytest.approx(p["student_hours_per_1m"] / 40 * 3.6)
    assert p["ref_teacher_kwh_per_1m"] == pytest.approx(p["teacher_hours_per_1m"] / 10 * 0.5)
    assert p["ref_cost_ratio_per_1m"] == pytest.approx(250.0 * 40 / 10)  # same $/h for both; factors 10 vs 40
    assert all(p[k] for k in ("teacher_usd_per_1m_method", "student_kwh_per_1m_method", "ref_teacher_method"))


def test_codecarbon_offline_measures_something():
    from tasks.accounting.carbon import measure_energy

    with measure_energy("unit", "USA", enabled=True, measure_power_secs=1) as r:
        s = 0
        for i in range(3_000_000):
            s += i
    assert r.kwh is not None and r.kwh > 0 and r.gco2 > 0
    assert r.method.startswith("estimated by codecarbon") and "OfflineEmissionsTracker" in r.method


def test_distill_run_stopped_by_budget_exits_3_and_tags_mlflow(
    tmp_path, binary_prompt, fake_teacher, capsys, prefect_api, monkeypatch
):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_pool(tmp_path, 30)
    pd.DataFrame(
        {
            "id": [f"g{i}" for i in range(8)],
            "text": [f"good gold {i}" if i % 2 else f"bad gold {i}" for i in range(8)],
            "label": ["positive" if i % 2 else "negative" for i in range(8)],
        }
    ).to_json(tmp_path / "gold.jsonl", orient="records", lines=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = base_cfg(
        tmp_path,
        binary_prompt,
        fake_teacher.base_url,
        data={"gold_path": str(tmp_path / "gold.jsonl")},
        pricing={"models": {"teacher": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}},
        budget={"max_usd": 0.5},
        tracking={"tracking_uri": uri},
    )
    out = tmp_path / "s.json"
    assert cli_main(["run", str(write_yaml(tmp_path, raw)), "--no-progress", "--summary-json", str(out)]) == 3
    assert "budget.max_usd=$0.5 reached" in capsys.readouterr().err
    s = json.loads(out.read_text())
    assert 0 < s["teacher_usd"] <= 0.5 and s["stopped"] == "budget"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["distill"], filter_string="tags.stopped = 'budget'")
    assert len(runs) == 1 and runs["metrics.teacher_usd"].iloc[0] == pytest.approx(s["teacher_usd"])


def test_history_is_scoped_to_the_answer_cap(tmp_path):
    """A summary plan must not be calibrated on one-word label answers of the same model."""
    from tasks.teacher.cache import CachedAnswer, ResponseCache

    c = ResponseCache(tmp_path / "c.sqlite")
    c.put_success(
        [("lab", CachedAnswer("pos", "stop", 100, 1, "reported"))],
        {"model": "m", "prompt": "x" * 400, "max_tokens": 4},
        "r",
        attempt=1,
        http_status=200,
        latency_s=0.2,
    )
    c.put_success(
        [("sum", CachedAnswer("a summary", "stop", 100, 40, "reported"))],
        {"model": "m", "prompt": "x" * 400, "max_tokens": 60},
        "r",
        attempt=1,
        http_status=200,
        latency_s=3.0,
    )
    labels, summaries, both = c.model_history("m", 4), c.model_history("m", 60), c.model_history("m")
    assert labels["completion_tokens"] == pytest.approx(1.0) and labels["latency_s"] == pytest.approx(0.2)
    assert summaries["completion_tokens"] == pytest.approx(40.0) and summaries["latency_s"] == pytest.approx(3.0)
    assert both["completion_tokens"] == pytest.approx(20.5) and both["latency_n"] == 2
    assert c.model_history("m", 128)["completion_tokens"] is None
