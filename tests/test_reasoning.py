"""Reasoning teachers: chain-of-thought answers read from their marked last line, hidden reasoning tokens priced."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from distill.config import config_from_dict
from tasks.accounting.pricing import resolve_prices
from tasks.teacher.shard import annotate_shard
from tasks.templates.load import load_prompt
from tests.conftest import shard_settings
from tests.fake_openai import FAKE_PRICES, REASONING_TOKENS


@pytest.fixture
def cot_prompt(tmp_path):
    p = tmp_path / "cot.yaml"
    p.write_text(
        "name: cot\nlabels: [positive, negative]\n"
        'instruction: "Think step by step, then give the sentiment on a last line: Answer, then the label."\n'
        "answer_marker: 'Answer:'\n"
        "examples:\n  - {text: a good one, label: positive}\n  - {text: a bad one, label: negative}\n"
    )
    return p


def test_only_the_marked_last_line_counts(cot_prompt):
    t = load_prompt(cot_prompt)
    assert t.parse("It starts negative, but the ending is warm.\nAnswer: positive") == "positive"
    assert t.parse("Mostly positive words, yet the verdict is harsh.\n**Answer:** negative.") == "negative"
    assert t.parse("positive") is None  # a label without the marked line: the reasoning never answered
    assert t.parse("Answer: positive\nOn reflection...\nAnswer: negative") == "negative"  # the last marked line
    assert t.parse("Answer: mixed") is None


def test_cot_answers_vote_and_their_reasoning_stays_in_the_cache(tmp_path, cot_prompt, fake_teacher):
    fake_teacher.fixed_answer = "The review says good things, though one word is negative.\nAnswer: positive"
    shard = tmp_path / "s.parquet"
    pd.DataFrame({"id": ["a"], "text": ["good film"]}).to_parquet(shard)
    cfg = config_from_dict(
        {
            "run_name": "c",
            "prompt": str(cot_prompt),
            "data": {"pool_path": str(shard)},
            "teacher": {"local": False, "base_url": fake_teacher.base_url, "samples": 1, "max_tokens": 256},
            "client": {"cache_path": str(tmp_path / "cache.sqlite")},
            "pricing": {"free": True},
        }
    )
    res = annotate_shard(
        str(shard),
        str(tmp_path / "o.parquet"),
        shard_settings(cfg, load_prompt(cot_prompt), fake_teacher.base_url),
        show_progress=False,
    )
    df = pq.read_table(res.path).to_pandas()
    assert list(df["votes"][0]) == ["positive"] and df["sample_probs"][0][0] is None  # from the vote, not logprobs
    assert "one word is negative" in df["answers"][0][0]  # the reasoning is kept with the answer, not as a label


def test_reasoning_tokens_are_counted_priced_and_sent_with_the_right_cap(tmp_path, binary_prompt, fake_teacher):
    shard = tmp_path / "s.parquet"
    pd.DataFrame({"id": [f"i{i}" for i in range(6)], "text": [f"good film {i}" for i in range(6)]}).to_parquet(shard)
    cfg = config_from_dict(
        {
            "run_name": "r",
            "prompt": str(binary_prompt),
            "data": {"pool_path": str(shard)},
            "teacher": {
                "local": False,
                "base_url": fake_teacher.base_url,
                "mode": "chat",
                "samples": 1,
                "max_tokens": 64,
                "reasoning_effort": "low",
            },
            "client": {"cache_path": str(tmp_path / "cache.sqlite")},
            "pricing": FAKE_PRICES,
        }
    )
    run = shard_settings(
        cfg, load_prompt(binary_prompt), fake_teacher.base_url, prices=resolve_prices(cfg.teacher, cfg.pricing)
    )
    res = annotate_shard(str(shard), str(tmp_path / "o.parquet"), run, budget_left_usd=1.0, show_progress=False)
    sent = [json.loads(b) for b in fake_teacher.received]
    assert all(
        b["reasoning_effort"] == "low" and b["max_completion_tokens"] == 64 and "max_tokens" not in b for b in sent
    )
    assert res.client.tokens_reasoning == REASONING_TOKENS * 6
    assert res.client.tokens_out == fake_teacher.tokens_out  # the hidden reasoning is in the output tokens billed
    want = (fake_teacher.tokens_in * 1.0 + fake_teacher.tokens_out * 2.0) / 1e6
    assert res.spend.spent_usd == pytest.approx(want, rel=1e-9)
