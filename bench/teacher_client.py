"""Teacher-client throughput: distill's client vs a bare aiohttp loop vs AsyncOpenAI.

A loopback server (another process) answers every request after a fixed latency L, so
the most any client can do at concurrency C is C/L requests per second. distill's
client runs with everything on: response cache (sqlite, a miss and an insert per
request), rate limiter (limits set high but active), retries armed, answers parsed into
the label set. Targets from issue 2: at C=64, L=100 ms, distill >= 95% of C/L; at C=256,
distill >= 85% of the bare aiohttp loop and >= 5x AsyncOpenAI.

    .venv/bin/python bench/teacher_client.py [--latency 0.1] [--seconds 8] [--repeats 3]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from distill.config import ClientConfig  # noqa: E402
from tasks.teacher.cache import ResponseCache, request_key  # noqa: E402
from tasks.teacher.client import Endpoint, TeacherClient, TeacherRequest  # noqa: E402
from tasks.teacher.ratelimit import RateLimiter  # noqa: E402
from tasks.templates.label import PromptTemplate  # noqa: E402

SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 3, "stop": ["\n"], "seed": 0}


def prompts(n: int, tag: str) -> list[str]:
    return [f"Review: benchmark item {tag}-{i}\nSentiment:" for i in range(n)]


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--port", str(port), "--latency", str(latency)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            req = urllib.request.Request(url + "/completions", b'{"prompt":"x"}', {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=2).read()
            return proc, url
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("bench server did not start")


async def bare_aiohttp(url: str, c: int, ps: list[str]) -> float:
    sem = asyncio.Semaphore(c)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c)) as s:

        async def one(p: str) -> None:
            async with sem:
                async with s.post(url + "/completions", json={"model": "m", "prompt": p, **SAMPLING}) as r:
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in ps))
        return len(ps) / (time.perf_counter() - t0)


async def async_openai(url: str, c: int, ps: list[str]) -> float:
    import httpx
    import openai

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=c, max_keepalive_connections=c))
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", http_client=http, max_retries=0)
    sem = asyncio.Semaphore(c)

    async def one(p: str) -> None:
        async with sem:
            await client.completions.create(model="m", prompt=p, **SAMPLING)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in ps))
    el = time.perf_counter() - t0
    await client.close()
    return len(ps) / el


async def distill_client(url: str, c: int, ps: list[str], cache_path: str) -> float:
    tpl = PromptTemplate(name="bench", labels=["positive", "negative"], instruction="x", examples=[])
    reqs = []
    for p in ps:
        key = request_key("m", p, SAMPLING)
        reqs.append(TeacherRequest([key], "/completions", {"model": "m", "prompt": p, **SAMPLING}, 50))
    cache = ResponseCache(cache_path)
    limiter = RateLimiter(requests_per_minute=10_000_000, tokens_per_minute=1_000_000_000)
    client = TeacherClient(
        Endpoint(url, "bench-key"),
        cache,
        "bench",
        ClientConfig(concurrency=c, timeout_s=30, max_attempts=5),
        limiter=limiter,
    )
    t0 = time.perf_counter()
    async with client:
        out = await client.run(reqs)
    labels = [tpl.parse(o.text) for o in out.values()]
    el = time.perf_counter() - t0
    cache.close()
    assert len(labels) == len(ps) and all(x == "positive" for x in labels), "bench answers not parsed"
    assert client.stats.requests_sent == len(ps), "cache must miss on every bench request"
    return len(ps) / el


def run(name: str, coro_fn, *args) -> float:  # type: ignore[no-untyped-def]
    return asyncio.run(coro_fn(*args))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--seconds", type=float, default=8.0, help="size each run to about this long at the limit")
    ap.add_argument("--openai-requests", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    proc, url = start_server(a.latency)
    results: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in (64, 256):
                limit = c / a.latency
                n = int(limit * a.seconds)  # long runs: the ramp-up and the last round are a small share
                best = {"distill": 0.0, "bare_aiohttp": 0.0, "async_openai": 0.0}
                for rep in range(a.repeats):  # interleaved repeats; best of each
                    best["bare_aiohttp"] = max(
                        best["bare_aiohttp"], run("bare", bare_aiohttp, url, c, prompts(n, f"b{c}{rep}"))
                    )
                    best["distill"] = max(
                        best["distill"],
                        run(
                            "distill",
                            distill_client,
                            url,
                            c,
                            prompts(n, f"d{c}{rep}"),
                            os.path.join(tmp, f"cache-{c}-{rep}.sqlite"),
                        ),
                    )
                    if rep == 0:
                        best["async_openai"] = run("openai", async_openai, url, c, prompts(a.openai_requests, f"o{c}"))
                r = {k: round(v, 1) for k, v in best.items()}
                r.update(
                    {
                        "concurrency": c,
                        "latency_s": a.latency,
                        "limit_rps": limit,
                        "distill_vs_limit": round(best["distill"] / limit, 3),
                        "bare_vs_limit": round(best["bare_aiohttp"] / limit, 3),
                        "distill_vs_bare": round(best["distill"] / best["bare_aiohttp"], 3),
                        "distill_vs_openai": round(best["distill"] / best["async_openai"], 2),
                    }
                )
                results[f"c{c}"] = r
                print(
                    f"C={c:<4} L={a.latency * 1000:.0f}ms limit {limit:7.0f} req/s | distill {r['distill']:7.1f} "
                    f"({r['distill_vs_limit']:.1%} of limit) | bare aiohttp {r['bare_aiohttp']:7.1f} "
                    f"| AsyncOpenAI {r['async_openai']:6.1f} | distill/bare {r['distill_vs_bare']:.2f} "
                    f"| distill/openai {r['distill_vs_openai']:.1f}x",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(10)
    results["targets"] = {
        "c64_distill_ge_95pct_of_limit": results["c64"]["distill_vs_limit"] >= 0.95,
        "c256_distill_ge_85pct_of_bare": results["c256"]["distill_vs_bare"] >= 0.85,
        "c256_distill_ge_5x_openai": results["c256"]["distill_vs_openai"] >= 5,
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
