"""The local teacher's requests/s against what this machine allows, setting by setting.

The same requests (dev items of the demo data, k prompt variants each, exactly as a run
renders them) go to the real llama.cpp server (SmolLM2-135M via llama-cpp-python) under
each setting, one after another in one process, in rounds, so every setting sees the same
machine load; each setting's best round is reported:

- default: one server, 2 threads, requests sample-major (all items' variant 0, then
  variant 1, ...) so consecutive prompts share their few-shot prefix, which llama.cpp
  keeps in its KV cache; log-probabilities on (what a run does)
- item_major: the same server, requests item by item (the k variants of one item in a
  row), so consecutive prompts differ from the first example on: no shared prefix
- item_major_state_cache: item-major with llama-cpp-python's prompt-state cache
  (``--cache true``), which restores a saved prefix instead of recomputing it
- no_logprobs: the default without log-probabilities (what they cost)
- max_tokens_1: the default with max_tokens 1 (one generated token: llama-cpp-python
  sorts the whole vocabulary once per generated token when log-probabilities are asked,
  so the stop token's own step is not free)
- threads_1: one server with 1 thread
- two_servers: 2 servers of 1 thread each (2 sequences decoded in parallel; the client
  alternates requests between them)

Each setting's answers are compared with the default's: a faster setting only counts if
it gives the same answers.

    .venv/bin/python bench/teacher_throughput.py [--items 60] [--samples 3] [--rounds 2]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()

SETTINGS = {
    "default": {"servers": 1, "threads": 2, "order": "sample", "logprobs": True, "extra": ()},
    "item_major": {"servers": 1, "threads": 2, "order": "item", "logprobs": True, "extra": ()},
    "item_major_state_cache": {"servers": 1, "threads": 2, "order": "item", "logprobs": True,
                               "extra": ("--cache", "true")},
    "no_logprobs": {"servers": 1, "threads": 2, "order": "sample", "logprobs": False, "extra": ()},
    "max_tokens_1": {"servers": 1, "threads": 2, "order": "sample", "logprobs": True, "extra": (), "max_tokens": 1},
    "threads_1": {"servers": 1, "threads": 1, "order": "sample", "logprobs": True, "extra": ()},
    "two_servers": {"servers": 2, "threads": 1, "order": "sample", "logprobs": True, "extra": ()},
}


def build_requests(config: str, items: int, samples: int, logprobs: bool, order: str,  # type: ignore[no-untyped-def]
                   max_tokens: int | None = None):
    import pandas as pd

    from distill.config import load_config
    from tasks.annotate import plan_shard
    from tasks.prompting import load_prompt

    sets = [f"teacher.samples={samples}", f"teacher.logprobs={str(logprobs).lower()}"]
    cfg = load_config(config, sets + ([f"teacher.max_tokens={max_tokens}"] if max_tokens else []))
    texts = pd.read_parquet(Path(cfg.data.pool_path).with_name("dev.parquet"))["text"].tolist()[:items]
    plan = plan_shard(texts, cfg, load_prompt(cfg.prompt))
    reqs = plan.requests  # sample-major, as a run sends them
    if order == "item":
        by_key = {r.keys[0]: r for r in reqs}
        seen: set[str] = set()
        reqs = []
        for s in sorted(plan.samples, key=lambda s: (s.item_index, s.sample_index)):
            if s.key not in seen:
                seen.add(s.key)
                reqs.append(by_key[s.key])
    # keys differ between settings (logprobs are in them): compare answers by (item, variant)
    ident: dict[str, tuple[int, int]] = {}
    for s in plan.samples:
        ident.setdefault(s.key, (s.item_index, s.sample_index))
    return reqs, ident


async def send(urls: list[str], reqs, per_url_concurrency: int) -> tuple[float, dict[str, str]]:  # type: ignore[no-untyped-def]
    from tasks.cache import ResponseCache
    from tasks.teacher_client import TeacherClient

    parts = [reqs[i::len(urls)] for i in range(len(urls))]
    caches = [ResponseCache(":memory:") for _ in urls]
    t0 = time.perf_counter()

    async def one(url: str, part, cache) -> dict:  # type: ignore[no-untyped-def]
        async with TeacherClient(url, None, cache, "bench", concurrency=per_url_concurrency, timeout_s=120,
                                 max_attempts=2) as cl:
            return await cl.run(part)

    outs = await asyncio.gather(*(one(u, p, c) for u, p, c in zip(urls, parts, caches)))
    el = time.perf_counter() - t0
    texts = {k: o.text for out in outs for k, o in out.items()}
    return el, texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--items", type=int, default=60)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="setting names to run (default first, always)")
    a = ap.parse_args()
    from tasks import local_teacher as lt

    names = [n for n in SETTINGS if not a.only or n in a.only or n == "default"]
    best: dict[str, float] = {}
    answers: dict[str, dict] = {}
    n_req = 0
    for rnd in range(a.rounds):
        for name in (names if rnd % 2 == 0 else [names[0]] + names[:0:-1]):
            st = SETTINGS[name]
            reqs, ident = build_requests(a.config, a.items, a.samples, st["logprobs"], st["order"], st.get("max_tokens"))
            n_req = len(reqs)
            servers = [lt.start_server(None, 2048, st["threads"], "teacher", 120, write_state=False,
                                       extra_args=tuple(st["extra"])) for _ in range(st["servers"])]
            try:
                # warm-up: the model's first request pays for loading pages and building graphs
                asyncio.run(send([s.base_url for s in servers], reqs[:2 * st["servers"]], 1))
                el, texts = asyncio.run(send([s.base_url for s in servers], reqs, 2 if st["servers"] == 1 else 1))
            finally:
                for s in servers:
                    lt._kill(s.pid)
            rps = n_req / el
            best[name] = max(best.get(name, 0.0), rps)
            answers[name] = {ident[k]: v for k, v in texts.items()}
            print(f"round {rnd + 1} {name:<24} {rps:6.2f} req/s ({n_req} requests in {el:.1f} s)", flush=True)
    base = answers["default"]
    result = {}
    print(f"\n{'setting':<24} {'req/s (best)':>12} {'vs default':>10} {'same answers':>13}")
    for name in names:
        same = sum(answers[name].get(k) == v for k, v in base.items()) / len(base)
        result[name] = {"requests_per_s": round(best[name], 3), "vs_default": round(best[name] / best["default"], 3),
                        "same_answers": round(same, 4), **{k: v for k, v in SETTINGS[name].items() if k != "extra"},
                        "extra_args": list(SETTINGS[name]["extra"])}
        print(f"{name:<24} {best[name]:12.2f} {best[name] / best['default']:9.2f}x {100 * same:12.1f}%")
    same_fast = [n for n in names if result[n]["same_answers"] == 1.0]
    fastest = max(same_fast, key=lambda n: result[n]["requests_per_s"])
    print(f"\nfastest setting with the default's answers: {fastest}")
    print(json.dumps({"requests": n_req, "items": a.items, "samples": a.samples, "rounds": a.rounds,
                      "settings": result, "fastest_same_answers": fastest}))


if __name__ == "__main__":
    main()
