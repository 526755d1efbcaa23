"""teacher.constrain: the endpoint is asked to answer only with a label, in each server's own form."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from distill.config import ConfigError, TeacherConfig, TeacherMode, config_from_dict
from tasks.teacher.requests import constraint_params
from tasks.teacher.shard import annotate_shard
from tasks.templates.load import load_prompt
from tests.conftest import shard_settings

LABELS = ["positive", "negative"]


def test_each_form_names_exactly_the_labels():
    t = TeacherConfig(local=True, constrain="grammar")
    assert constraint_params(t, LABELS, TeacherMode.completion) == {
        "grammar": 'root ::= " "? ( "positive" | "negative" )'
    }
    t = TeacherConfig(local=True, constrain="guided_choice")
    assert constraint_params(t, LABELS, TeacherMode.completion) == {"guided_choice": [" positive", " negative"]}
    assert constraint_params(t, LABELS, TeacherMode.chat) == {"guided_choice": ["positive", "negative"]}
    t = TeacherConfig(local=False, base_url="http://x/v1", mode="chat", constrain="json_schema")
    schema = constraint_params(t, LABELS, TeacherMode.chat)["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == LABELS and schema["additionalProperties"] is False
    assert constraint_params(TeacherConfig(local=True), LABELS, TeacherMode.completion) == {}
    assert constraint_params(t, [], TeacherMode.chat) == {}  # a writing task: no label set


def test_structured_outputs_need_chat(tmp_path, binary_prompt):
    with pytest.raises(ConfigError, match="json_schema.*teacher.mode: chat"):
        config_from_dict(
            {
                "run_name": "c",
                "prompt": str(binary_prompt),
                "data": {"pool_path": "x.csv"},
                "teacher": {"local": False, "base_url": "http://x/v1", "constrain": "json_schema"},
            }
        )


def test_a_structured_answer_parses_to_its_label(binary_prompt):
    t = load_prompt(binary_prompt)
    assert t.parse('{"label": "positive"}') == "positive" and t.parse(' {"label":"Negative"}') == "negative"
    assert t.parse('{"label": "banana"}') is None and t.parse("{not json") is None


def test_the_constraint_is_sent_and_keys_the_cache(tmp_path, binary_prompt, fake_teacher):
    """Constrained answers are other answers: the constraint is in the request and in its cache key."""
    shard = tmp_path / "s.parquet"
    pd.DataFrame({"id": ["a", "b"], "text": ["good film", "bad film"]}).to_parquet(shard)

    def run(constrain: str, out: str):
        cfg = config_from_dict(
            {
                "run_name": "c",
                "workdir": str(tmp_path / "runs"),
                "prompt": str(binary_prompt),
                "data": {"pool_path": str(shard)},
                "teacher": {"local": False, "base_url": fake_teacher.base_url, "samples": 1, "constrain": constrain},
                "client": {"cache_path": str(tmp_path / "cache.sqlite")},
                "pricing": {"free": True},
            }
        )
        run = shard_settings(cfg, load_prompt(cfg.prompt), fake_teacher.base_url)
        return annotate_shard(str(shard), str(tmp_path / out), run, show_progress=False)

    run("none", "a.parquet")
    res = run("guided_choice", "b.parquet")
    assert res.client.requests_sent == 2 and res.client.requests_cached == 0  # not answered by unconstrained ones
    sent = [json.loads(b) for b in fake_teacher.received]
    assert ["guided_choice" in b for b in sent] == [False, False, True, True]
    assert sent[-1]["guided_choice"] == [" positive", " negative"]
    assert list(pq.read_table(res.path).to_pandas()["votes"].map(list)) == [["positive"], ["negative"]]


def test_structured_answers_take_their_probability_from_votes(tmp_path, binary_prompt, fake_teacher):
    """The log-probabilities of {"label": ...} are the JSON's tokens: no label distribution is read from them."""
    from tasks.teacher.client import Outcome
    from tasks.teacher.requests import plan_shard
    from tasks.teacher.shard import assemble
    from tests.fake_openai import fake_logprobs

    cfg = config_from_dict(
        {
            "run_name": "c",
            "prompt": str(binary_prompt),
            "data": {"pool_path": "x.csv"},
            "teacher": {"local": False, "base_url": "http://x/v1", "mode": "chat", "samples": 1},
        }
    )
    t = load_prompt(binary_prompt)
    plan = plan_shard(["good film"], cfg.teacher, t)
    key = plan.samples[0].key
    out = assemble(
        pd.DataFrame({"id": ["a"], "text": ["good film"]}),
        plan,
        {key: Outcome('{"label": "positive"}', cached=False, logprobs=fake_logprobs('{"', True, 0.9))},
        t,
        k=1,
    )
    assert list(out["votes"][0]) == ["positive"] and out["sample_probs"][0][0] is None


def test_openai_models_are_counted_with_tiktoken_offline(tmp_path, monkeypatch):
    """tiktoken's rank file comes from bpe-openai's package data (no download), checked by tiktoken's own hash."""
    import bpe_openai

    from tasks.teacher.tokenizer import counter_for
    from tasks.templates.tokens import openai_counter

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))  # an empty cache: nothing downloaded
    c = openai_counter("gpt-4o-mini")
    assert c is not None and c.exact and "o200k_base" in c.method
    texts = [
        "Hello, world!",
        "Le café coûte 3,50 € ☕",
        "def f(x):\n    return x ** 2",
        "   spaces   ",
        "日本語のテキスト",
    ]
    ref = bpe_openai.get_encoding("o200k_base")  # another implementation over the same ranks
    assert [c.count(t) for t in texts] == [len(ref.encode(t)) for t in texts]
    assert openai_counter("Qwen/Qwen2.5-7B-Instruct") is None  # not an OpenAI model: the estimate, which says so
    t = TeacherConfig(local=False, base_url="http://x/v1", model="gpt-4o-mini")
    assert counter_for(t).exact
    assert not counter_for(t.model_copy(update={"model": "llama3:8b"})).exact
