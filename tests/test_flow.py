"""The annotate flow through Prefect, on the fake teacher (fast) and on the real local teacher."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from distill.cli import main as cli_main
from distill.config import TeacherConfig, config_from_dict
from flows.annotate import annotate_flow
from tests.fake_openai import FAKE_PRICES

SUMMARY_KEYS = {
    "items",
    "votes",
    "invalid_votes",
    "abstained",
    "requests_sent",
    "requests_cached",
    "tokens_in",
    "tokens_out",
    "wall_s",
    "teacher_accuracy_voted",
    "teacher_macro_f1_voted",
    "teacher_accuracy_single",
}


def write_data(tmp_path, n_pool=30, n_gold=20):
    pool = pd.DataFrame(
        {
            "ticket_id": [f"p{i}" for i in range(n_pool)],
            "body": [f"{'good' if i % 2 else 'bad'} pool {i}" for i in range(n_pool)],
        }
    )
    pool.loc[3, "body"] = ""  # empty: set aside and counted
    pool.loc[5, "body"] = "good film [offlabel]"  # invalid votes
    pool.to_csv(tmp_path / "pool.csv", index=False)
    gold = pd.DataFrame(
        {
            "ticket_id": [f"g{i}" for i in range(n_gold)],
            "body": [f"{'good' if i % 2 else 'bad'} gold {i}" for i in range(n_gold)],
            "label": ["positive" if i % 2 else "negative" for i in range(n_gold)],
        }
    )
    gold.loc[0, "label"] = "positive"  # the teacher will get this one wrong
    gold.to_json(tmp_path / "gold.jsonl", orient="records", lines=True)


def fake_cfg(tmp_path, prompt, base_url, **teacher):
    return config_from_dict(
        {
            "run_name": "flow",
            "workdir": str(tmp_path / "runs"),
            "prompt": str(prompt),
            "data": {
                "pool_path": str(tmp_path / "pool.csv"),
                "gold_path": str(tmp_path / "gold.jsonl"),
                "text_column": "body",
                "id_column": "ticket_id",
                "gold_teacher_limit": 10,
                "chunk_rows": 8,
            },
            "teacher": {"local": False, "base_url": base_url, "samples": 3, **teacher},
            "client": {"cache_path": str(tmp_path / "cache.sqlite")},
            "pricing": FAKE_PRICES,
        }
    )


def test_flow_on_fake_teacher_writes_votes_summary_and_artifact(tmp_path, fake_teacher, binary_prompt, prefect_api):
    write_data(tmp_path)
    cfg = fake_cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    s = annotate_flow(cfg, show_progress=False)
    assert SUMMARY_KEYS <= set(s)
    assert s["items"] == 29 and s["data_pool"]["empty_text"] == 1
    assert s["votes"] == 29 * 3 and s["invalid_votes"] == 3 and s["abstained"] == 1
    assert s["requests_sent"] == len(fake_teacher.received) == (29 + 10) * 3
    assert s["tokens_in"] == fake_teacher.tokens_in
    assert s["gold_items_scored"] == 10
    # teacher is right on every gold item except g0 (if drawn): accuracy is 1.0 or 0.9
    assert s["teacher_accuracy_voted"] in (1.0, 0.9) and s["teacher_accuracy_single"] == s["teacher_accuracy_voted"]
    parts = sorted((tmp_path / "runs" / "flow" / "votes" / "pool").glob("*.parquet"))
    assert len(parts) == 4  # 29 items in shards of 8
    df = pd.concat([pq.read_table(p).to_pandas() for p in parts])
    assert {"id", "text", "votes", "label", "confidence", "n_valid_votes", "abstain_reason"} <= set(df.columns)
    assert len(df) == 29 and df.set_index("id").loc["p5", "abstain_reason"] == "no valid votes"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:  # the newest: other tests on this server publish the same key
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["annotation-summary"])),
            sort=ArtifactSort.CREATED_DESC,
        )
    assert arts and "teacher_accuracy_voted" in arts[0].data

    # a second run re-sends nothing
    fake_teacher.reset_counts()
    s2 = annotate_flow(cfg, show_progress=False)
    assert s2["requests_sent"] == 0 and s2["items"] == 29
    assert s2["teacher_items_per_s"] == s["teacher_items_per_s"] and "earlier run" in s2["teacher_speed_source"]


@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_identical_requests_are_sent_once_and_probabilities_come_from_logprobs(
    tmp_path, fake_teacher, binary_prompt, prefect_api, mode
):
    """Repeated texts and k prompt variants: the server never receives the same body twice."""
    texts = ["good plot", "bad plot", "good cast [unsure]", "bad cast [nologprobs]"]
    pool = pd.DataFrame({"ticket_id": [f"p{i}" for i in range(12)], "body": [texts[i % 4] for i in range(12)]})
    pool.to_csv(tmp_path / "pool.csv", index=False)
    gold = pd.DataFrame(
        {"ticket_id": ["g0", "g1"], "body": ["good gold", "bad gold"], "label": ["positive", "negative"]}
    )
    gold.to_json(tmp_path / "gold.jsonl", orient="records", lines=True)
    cfg = fake_cfg(tmp_path, binary_prompt, fake_teacher.base_url, mode=mode)  # shards of 8 items: 8 + 4
    s = annotate_flow(cfg, show_progress=False)
    assert len(fake_teacher.received) == len(set(fake_teacher.received)) == (4 + 2) * 3
    # repeats within a shard share one request; the second shard's repeats are answered from the cache
    assert s["requests_deduplicated"] == (8 - 4) * 3 and s["requests_cached"] == 4 * 3
    assert s["requests_sent"] == (4 + 2) * 3
    # k=3 distinct prompts per item: three different bodies for the same text
    assert len({b for b in fake_teacher.received if "good plot" in b}) == 3
    assert s["aggregation"] == "mean_probability" and s["probability_source"] == "mixed"
    assert s["samples_with_logprobs"] == s["valid_votes"] - 3 * 3  # the [nologprobs] text, 3 items x 3 samples
    df = pd.concat(
        pd.read_parquet(p) for p in sorted((tmp_path / "runs" / "flow" / "votes" / "pool").glob("*.parquet"))
    )
    unsure = df[df["text"] == "good cast [unsure]"].iloc[0]
    assert unsure["label"] == "positive" and unsure["confidence"] == pytest.approx(0.6 / 0.98)
    assert list(unsure["label_dist"]) == pytest.approx([0.6 / 0.98, 0.38 / 0.98])
    plain = df[df["text"] == "bad cast [nologprobs]"].iloc[0]
    assert plain["prob_source"] == "votes" and plain["confidence"] == 1.0
    assert df.groupby("text")["label"].nunique().max() == 1  # repeated texts share their answers
    # the aggregation is not in the cache key: switching it re-aggregates cached answers, sends nothing
    fake_teacher.reset_counts()
    s2 = annotate_flow(
        type(cfg).model_validate({**cfg.model_dump(), "vote": {"aggregation": "majority"}}), show_progress=False
    )
    assert s2["requests_sent"] == 0 and s2["aggregation"] == "majority"
    assert s2["probability_source"] == s["probability_source"]  # the soft targets still come from the log-probabilities


def test_a_grown_source_annotates_only_its_new_items_and_says_what_reuse_saved(
    tmp_path, fake_teacher, binary_prompt, prefect_api
):
    """The nightly case: yesterday's items come from the cache, only today's are sent."""
    write_data(tmp_path, n_pool=20)
    cfg = fake_cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    first = annotate_flow(cfg, show_progress=False)
    assert first["items_new"] == 19 and first["items_reused"] == 0  # one empty text set aside
    write_data(tmp_path, n_pool=30)  # the source grew by 10 items
    fake_teacher.reset_counts()
    s = annotate_flow(cfg, show_progress=False)
    assert s["items_new"] == 10 and s["items_reused"] == 19 and s["items"] == 29
    assert len(fake_teacher.received) == 10 * 3  # only the new items were asked (gold is cached too)
    per_item = s["teacher_usd_per_item"]
    assert per_item > 0 and s["reuse_saved_usd"] == pytest.approx(19 * per_item)


def test_a_budgeted_night_asks_only_about_its_new_choice(tmp_path, fake_teacher, binary_prompt, prefect_api):
    write_data(tmp_path, n_pool=30)
    cfg = fake_cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    cfg = type(cfg).model_validate({**cfg.model_dump(), "selection": {"strategy": "random", "max_new_items": 8}})
    first = annotate_flow(cfg, show_progress=False)
    assert first["items"] == 8 and first["items_selected"] == 8 and first["items_deferred"] == 21
    fake_teacher.reset_counts()
    second = annotate_flow(cfg, show_progress=False)  # the next night: 8 more, yesterday's 8 from the cache
    assert second["items"] == 16 and second["items_labelled_before"] == 8 and second["items_reused"] == 8
    assert second["items_new"] == 8 and len(fake_teacher.received) == 8 * 3


def test_cli_summary_json_and_clear_errors(tmp_path, fake_teacher, binary_prompt, prefect_api, capsys):
    write_data(tmp_path)
    cfg = fake_cfg(tmp_path, binary_prompt, fake_teacher.base_url)
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    out = tmp_path / "s.json"
    assert (
        cli_main(["annotate", str(p), "--no-progress", "--summary-json", str(out), "--set", "teacher.samples=1"]) == 0
    )
    s = json.loads(out.read_text())
    assert SUMMARY_KEYS <= set(s) and s["votes"] == 29
    # a wrong column name is reported with the file and column, exit code 2
    assert cli_main(["annotate", str(p), "--set", "data.text_column=nope"]) == 2
    err = capsys.readouterr().err
    assert "pool.csv" in err and "'nope'" in err
    assert cli_main(["annotate", str(p), "--set", "teacher.samples=zero"]) == 2
    assert "teacher.samples" in capsys.readouterr().err


def test_missing_api_key_env_is_a_clear_error(tmp_path, binary_prompt, prefect_api, capsys, monkeypatch):
    write_data(tmp_path)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cfg = fake_cfg(tmp_path, binary_prompt, "http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR")
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    assert cli_main(["annotate", str(p), "--no-progress"]) == 2
    assert "NO_SUCH_KEY_VAR" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_on_the_real_local_teacher(tmp_path, prefect_api):
    """About 20 items through the real llama.cpp server with SmolLM2, started and stopped by distill."""
    from tests.conftest import REPO

    texts = [
        "An absolute triumph, moving and funny.",
        "A tedious, badly acted mess.",
        "One of the best films of the year.",
        "I walked out after twenty minutes of boredom.",
        "Gorgeous photography and a wonderful cast.",
        "The plot is stupid and the jokes fall flat.",
    ]
    pool = pd.DataFrame({"id": [f"p{i}" for i in range(14)], "text": [texts[i % 6] + f" ({i})" for i in range(14)]})
    pool.to_parquet(tmp_path / "pool.parquet")
    gold = pd.DataFrame({"id": [f"g{i}" for i in range(6)], "text": texts, "label": ["positive", "negative"] * 3})
    gold.to_parquet(tmp_path / "gold.parquet")
    cfg = config_from_dict(
        {
            "run_name": "e2e",
            "workdir": str(tmp_path / "runs"),
            "prompt": str(REPO / "prompts/sentiment_binary.yaml"),
            "data": {"pool_path": str(tmp_path / "pool.parquet"), "gold_path": str(tmp_path / "gold.parquet")},
            "teacher": {"local": True, "samples": 3, "max_tokens": 3},
            "client": {"cache_path": str(tmp_path / "cache.sqlite"), "concurrency": 2},
        }
    )
    before = llama_servers()
    s = annotate_flow(cfg, show_progress=False)
    assert llama_servers() <= before  # the server distill started is stopped again
    assert s["items"] == 14 and s["votes"] == 42
    assert s["requests_sent"] == (14 + 6) * 3 and s["requests_cached"] == 0
    assert s["tokens_in"] > 0 and s["tokens_out"] > 0
    assert s["invalid_votes"] <= 4  # the few-shot prompt keeps SmolLM2 on the label set
    assert s["teacher_accuracy_voted"] >= 4 / 6  # easy, unambiguous gold


def llama_servers() -> set[int]:
    """llama.cpp servers started by this test process: other runs on a shared machine start and stop their own."""
    import os
    from pathlib import Path

    out = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"llama-server" in (d / "cmdline").read_bytes().split(b"\0")[0]:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid():
                    out.add(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


@pytest.mark.slow
def test_teacher_start_status_stop(capsys):
    """`distill teacher start|status|stop` manage one long-lived local server, health-checked."""
    from tasks.teacher import local_server as local_teacher

    assert cli_main(["teacher", "status"]) == 1
    assert cli_main(["teacher", "start"]) == 0
    try:
        st = local_teacher.read_state()
        assert st is not None and local_teacher.healthy(st.base_url)
        import psutil  # the server has no authentication: it listens on loopback only

        listening = [
            c.laddr for c in psutil.Process(st.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
        assert cli_main(["teacher", "status"]) == 0
        assert cli_main(["teacher", "start"]) == 0 and "already running" in capsys.readouterr().out
        # a flow with the same model reuses it instead of starting another
        with local_teacher.local_teacher(TeacherConfig(startup_timeout_s=60)) as url:
            assert url == st.base_url
        assert local_teacher.healthy(st.base_url)
    finally:
        assert cli_main(["teacher", "stop"]) == 0
    assert local_teacher.read_state() is None and not local_teacher.healthy(st.base_url)
