"""The local teacher's requests/s, server by server and setting by setting, side by side.

The same requests (dev items of the demo data, k prompt variants each, exactly as a run
renders them) go to the real SmolLM2-135M GGUF under each setting. This machine's speed
drifts by 2x within minutes, so the settings are run side by side: every setting has its
own server, started up front, and the requests are sent in small chunks, round-robin over
the settings (round r sends chunk r of every setting, in a rotated order), so a slow spell
hits all settings alike. A setting's requests/s is its requests over the sum of its chunks'
times.

- default: llama.cpp's C++ ``llama-server`` as distill starts it (2 slots, 2 threads,
  continuous batching, prompt cache), the client 2 requests in flight, sample-major order
  (all items' variant 0, then variant 1, ...) so a slot's next prompt shares its few-shot
  prefix with its last; log-probabilities on, max_tokens from the config
- slots_1 / slots_4: 1 or 4 slots (the client keeps as many requests in flight)
- item_major: requests item by item (the k variants of one item in a row): consecutive
  prompts differ from the first example on
- no_logprobs: without log-probabilities (what they cost now)
- other_build (with ``--other-build PATH``): the default's setting on another build of
  llama-server, e.g. one made with ``make setup LLAMA_NATIVE=ON`` (this CPU's AVX-512)
- python_server: llama-cpp-python's server as distill started it before (``--logits_all
  true``, 2 threads, 2 requests in flight); run only where llama-cpp-python[server] is
  installed (`make setup` no longer installs it: ``pip install 'llama-cpp-python[server]==0.3.36'``)

Each setting's answers are compared with the default's: a faster setting only counts if
it gives the same answers.

    .venv/bin/python bench/teacher_throughput.py [--items 100] [--samples 3] [--chunk 30]

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

SETTINGS: dict[str, dict] = {
    "default": {"server": "cpp", "slots": 2, "threads": 2, "order": "sample", "logprobs": True},
    "slots_1": {"server": "cpp", "slots": 1, "threads": 2, "order": "sample", "logprobs": True},
    "slots_4": {"server": "cpp", "slots": 4, "threads": 2, "order": "sample", "logprobs": True},
    "item_major": {"server": "cpp", "slots": 2, "threads": 2, "order": "item", "logprobs": True},
    "no_logprobs": {"server": "cpp", "slots": 2, "threads": 2, "order": "sample", "logprobs": False},
    "python_server": {"server": "python", "slots": 2, "threads": 2, "order": "sample", "logprobs": True},
}


def start_python_server(threads: int):  # type: ignore[no-untyped-def]
    """llama-cpp-python's server exactly as distill started it up to 2026-12-05 (for the comparison)."""
    import subprocess
    import time as _t

    from tasks.teacher import local_server as lt

    port = lt.free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(lt.default_gguf()), "--model_alias", "teacher"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)]
    cmd += ["--logits_all", "true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    st = lt.ServerState(proc.pid, port, "", "teacher", "", _t.time())
    deadline = _t.monotonic() + 120
    while not lt.healthy(st.base_url, timeout=1.0):
        if proc.poll() is not None or _t.monotonic() > deadline:
            raise RuntimeError("llama-cpp-python's server did not start")
        _t.sleep(0.3)
    return st


def build_requests(
    config: str,
    items: int,
    samples: int,
    logprobs: bool,
    *,
    order: str,
    max_tokens: int | None = None,
):
    import pandas as pd

    from distill.config import load_config
    from tasks.teacher.requests import plan_shard
    from tasks.templates.load import load_prompt

    sets = [f"teacher.samples={samples}", f"teacher.logprobs={str(logprobs).lower()}"]
    cfg = load_config(config, sets + ([f"teacher.max_tokens={max_tokens}"] if max_tokens else []))
    texts = pd.read_parquet(Path(cfg.data.pool_path).with_name("dev.parquet"))["text"].tolist()[:items]
    plan = plan_shard(texts, cfg.teacher, load_prompt(cfg.prompt))
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
    from distill.config import ClientConfig
    from tasks.teacher.cache import ResponseCache
    from tasks.teacher.client import Endpoint, TeacherClient

    parts = [reqs[i :: len(urls)] for i in range(len(urls))]
    caches = [ResponseCache(":memory:") for _ in urls]
    t0 = time.perf_counter()

    async def one(url: str, part, cache) -> dict:  # type: ignore[no-untyped-def]
        async with TeacherClient(
            Endpoint(url), cache, "bench", ClientConfig(concurrency=per_url_concurrency, timeout_s=120, max_attempts=2)
        ) as cl:
            return await cl.run(part)

    outs = await asyncio.gather(*(one(u, p, c) for u, p, c in zip(urls, parts, caches)))
    el = time.perf_counter() - t0
    texts = {k: o.text for out in outs for k, o in out.items()}
    return el, texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=30, help="requests per setting per round")
    ap.add_argument("--only", nargs="*", help="setting names to run (default always)")
    ap.add_argument("--other-build", help="another llama-server binary, run as setting other_build")
    a = ap.parse_args()
    if a.other_build:
        SETTINGS["other_build"] = {**SETTINGS["default"], "binary": a.other_build}
    import importlib.util

    from tasks.teacher import local_server as lt

    names = [n for n in SETTINGS if not a.only or n in a.only or n == "default"]
    if importlib.util.find_spec("llama_cpp") is None and "python_server" in names:
        print("llama-cpp-python is not installed: python_server left out", flush=True)
        names.remove("python_server")
    plans = {
        n: build_requests(
            a.config,
            a.items,
            a.samples,
            SETTINGS[n]["logprobs"],
            order=SETTINGS[n]["order"],
            max_tokens=SETTINGS[n].get("max_tokens"),
        )
        for n in names
    }
    servers: dict[str, list] = {}
    try:
        for n in names:
            st = SETTINGS[n]
            if st["server"] == "python":
                servers[n] = [start_python_server(st["threads"])]
            else:
                servers[n] = [
                    lt.start_server(
                        None,
                        n_ctx=2048,
                        n_threads=st["threads"],
                        n_parallel=st["slots"],
                        alias="teacher",
                        startup_timeout_s=120,
                        write_state=False,
                        binary=Path(st["binary"]) if st.get("binary") else None,
                        extra_args=tuple(st.get("extra", ())),
                    )
                ]
            asyncio.run(send([servers[n][0].base_url], plans[n][0][:2], 1))  # warm-up: pages in, graphs built
        n_req = len(plans["default"][0])
        spent = {n: 0.0 for n in names}
        texts: dict[str, dict] = {n: {} for n in names}
        rounds = -(-n_req // a.chunk)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                urls = [s.base_url for s in servers[n]]
                chunk = plans[n][0][r * a.chunk : (r + 1) * a.chunk]
                el, got = asyncio.run(send(urls, chunk, max(2, SETTINGS[n]["slots"])))
                spent[n] += el
                texts[n].update(got)
            print(
                f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {(r + 1) * a.chunk / spent[n]:.2f}" for n in names),
                flush=True,
            )
    finally:
        for group in servers.values():
            for s in group:
                lt._kill(s.pid)
    answers = {n: {plans[n][1][k]: v for k, v in texts[n].items()} for n in names}
    base = answers["default"]
    result = {}
    print(f"\n{'setting':<26} {'req/s':>7} {'vs default':>10} {'same answers':>13}")
    for n in names:
        rps = n_req / spent[n]
        same = sum(answers[n].get(k) == v for k, v in base.items()) / len(base)
        result[n] = {
            "requests_per_s": round(rps, 3),
            "vs_default": round(spent["default"] / spent[n], 3),
            "same_answers": round(same, 4),
            "seconds": round(spent[n], 1),
            **SETTINGS[n],
        }
        print(f"{n:<26} {rps:7.2f} {result[n]['vs_default']:9.2f}x {100 * same:12.1f}%")
    same_fast = [n for n in names if result[n]["same_answers"] == 1.0]
    fastest = max(same_fast, key=lambda n: result[n]["requests_per_s"])
    print(f"\nfastest setting with the default's answers: {fastest}")
    print(
        json.dumps(
            {
                "requests": n_req,
                "items": a.items,
                "samples": a.samples,
                "chunk": a.chunk,
                "settings": result,
                "fastest_same_answers": fastest,
            }
        )
    )


if __name__ == "__main__":
    main()
