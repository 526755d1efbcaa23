"""The embedded teacher is llama.cpp's C++ server: its tokens as distill counts them, its answers as read."""

from __future__ import annotations

import json
import urllib.request

import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # the real llama-server (make test-fast leaves it out)


def test_the_gguf_counter_agrees_with_llama_server_on_the_bundled_data(llama_tokenize):
    """distill counts plan tokens with the GGUF's tokenizer in Python; llama-server counts what it is sent.

    Measured on 6,000 bundled texts: the same count for all but 10, which differ by one token
    (texts with a run of spaces before a digit or a bracket, split differently by the two
    pre-tokenisers). A plan is priced within that.
    """
    from tasks.teacher.local_server import default_gguf
    from tasks.templates.tokens import gguf_counter

    counter = gguf_counter(str(default_gguf()))
    texts: list[str] = []
    for name in ("movie", "tweets", "amazon", "nyt"):
        path = REPO / "data" / name / "pool.parquet"
        if path.exists():
            texts += pd.read_parquet(path)["text"].tolist()[:150]
    texts += ["hello <|im_end|> world", "<|im_start|>user\nhi", "émoji 😀 ünïcödé", "tab\tand\n\nlines", ""]
    assert len(texts) > 300, "the bundled data is missing (make setup fetches it)"
    off = []
    for t in texts:
        for prompt in (True, False):
            theirs = len(llama_tokenize(t, parse_special=prompt))
            ours = counter.count(t, prompt=prompt)
            if ours != theirs:
                off.append((t[:40], prompt, ours, theirs))
    assert all(abs(o - t) <= 1 for _, _, o, t in off), off
    assert len(off) <= 0.01 * 2 * len(texts), off


def test_answers_carry_top_logprobs_that_distill_reads(tmp_path):
    """/v1/completions with logprobs: llama-server answers in the chat-style ``content`` form; read unchanged."""
    from tasks.teacher import local_server as lt
    from tasks.teacher.label_probs import LabelMatcher, label_distribution

    st = lt.start_server(None, n_parallel=2, write_state=False, state_dir=tmp_path)
    try:
        body = {
            "model": "teacher",
            "prompt": "Review: a wonderful, moving film.\nSentiment (positive or negative):",
            "max_tokens": 3,
            "logprobs": 5,
            "temperature": 0,
        }
        req = urllib.request.Request(
            st.base_url + "/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            data = json.loads(r.read())
        with urllib.request.urlopen(st.base_url + "/models", timeout=10) as r:
            models = json.loads(r.read())
    finally:
        lt._kill(st.pid)
    assert data["model"] == "teacher" and [m["id"] for m in models["data"]] == ["teacher"]
    lp = data["choices"][0]["logprobs"]
    assert len(lp["content"][0]["top_logprobs"]) == 5
    dist = label_distribution(lp, LabelMatcher(["positive", "negative"]))
    assert dist is not None and abs(sum(dist.probs) - 1) < 1e-6 and max(dist.probs) > 0.5
