"""100,000 items through the fake's Batch API, then the same items online: batches, time, memory, money.

The fake teacher (tests/fake_openai.py --full) runs in another process and reports what it
answered and the usage it billed (/_stats). distill runs here as a run does: the items in
shards, a first pass that submits every shard's batches (up to max_in_flight), then each
shard collected. Then the same items online, on a fresh cache. What it checks (issue 19):
the batch run's USD is half the online run's, to the cent, by the fake's own usage; no
request was processed twice; the peak RSS of the distill process.

    .venv/bin/python bench/batch_transport.py [--items 100000] [--shard-items 10000]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from distill.config import config_from_dict  # noqa: E402
from tasks.accounting.pricing import resolve_prices  # noqa: E402
from tasks.results.teacher import ShardTotals  # noqa: E402
from tasks.teacher.shard import annotate_shard, submit_shard  # noqa: E402
from tasks.templates.load import load_prompt  # noqa: E402
from tests.conftest import shard_settings, write_binary_prompt  # noqa: E402

PRICES = {"models": {"teacher": {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "batch_discount": 0.5}}}


def start_fake() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--port", str(port), "--latency", "0", "--full"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(400):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=2).read()
            return proc, f"http://127.0.0.1:{port}/v1"
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("the fake teacher did not start")


def stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/_stats", timeout=30).read())


def run(folder: Path, url: str, shards: list[Path], transport: str, prompt: Path) -> dict:
    cfg = config_from_dict(
        {
            "run_name": transport,
            "workdir": str(folder / "runs"),
            "prompt": str(prompt),
            "data": {"pool_path": str(shards[0])},
            "teacher": {
                "local": False,
                "base_url": url,
                "samples": 1,
                "transport": transport,
                "batch": {"poll_interval_s": 0.2, "poll_max_interval_s": 1.0, "max_requests": 50_000},
            },
            "client": {"cache_path": str(folder / "cache.sqlite"), "concurrency": 64},
            "pricing": PRICES,
            "energy": {"measure": False},
        }
    )
    template = load_prompt(cfg.prompt)
    settings = shard_settings(cfg, template, url, prices=resolve_prices(cfg.teacher, cfg.pricing))
    outs = [folder / "parts" / f"{p.stem}.parquet" for p in shards]
    t0 = time.monotonic()
    submitted = 0
    if transport == "batch":
        for p, o in zip(shards, outs):
            submitted += submit_shard(str(p), str(o), settings).client.batches_submitted
    results = [annotate_shard(str(p), str(o), settings, show_progress=False) for p, o in zip(shards, outs)]
    wall = time.monotonic() - t0
    t = ShardTotals.of(results)
    answered = sum(
        sum(1 for s in pd.read_parquet(r.path, columns=["sample_status"])["sample_status"] if list(s) == ["ok"])
        for r in results
    )
    return {
        "wall_s": round(wall, 2),
        "usd": t.spend.spent_usd,
        "items_answered": answered,
        "batches_submitted": submitted + t.client.batches_submitted,
        "batches_collected": t.client.batches_collected,
        "requests_failed": t.client.requests_failed,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--shard-items", type=int, default=10_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompt = write_binary_prompt(folder)
        shards = []
        for i in range(0, a.items, a.shard_items):
            n = min(a.shard_items, a.items - i)
            p = folder / "in" / f"shard-{i // a.shard_items:04d}.parquet"
            p.parent.mkdir(parents=True, exist_ok=True)
            texts = [f"{'good' if (i + j) % 2 else 'bad'} ticket {i + j} about a delayed order" for j in range(n)]
            pd.DataFrame({"id": [f"t{i + j}" for j in range(n)], "text": texts}).to_parquet(p)
            shards.append(p)
        proc, url = start_fake()
        try:
            batch = run(folder / "batch", url, shards, "batch", prompt)
            after_batch = stats(url)
            batch["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            online = run(folder / "online", url, shards, "online", prompt)
            after = stats(url)
        finally:
            proc.terminate()
            proc.wait(10)
    p = PRICES["models"]["teacher"]
    fake_batch_usd = (
        after_batch["batch_tokens_in"] * p["input_per_mtok"] * 0.5
        + after_batch["batch_tokens_out"] * p["output_per_mtok"] * 0.5
    ) / 1e6
    online_in = after["tokens_in"] - after["batch_tokens_in"]
    online_out = after["tokens_out"] - after["batch_tokens_out"]
    fake_online_usd = (online_in * p["input_per_mtok"] + online_out * p["output_per_mtok"]) / 1e6
    figures = {
        "items": a.items,
        "shards": len(shards),
        "batch_wall_s": batch["wall_s"],
        "batch_peak_rss_mb": batch["peak_rss_mb"],
        "batches_submitted": batch["batches_submitted"],
        "batch_items_answered": batch["items_answered"],
        "batch_usd": round(batch["usd"], 6),
        "batch_usd_by_fake_usage": round(fake_batch_usd, 6),
        "online_wall_s": online["wall_s"],
        "online_items_answered": online["items_answered"],
        "online_usd": round(online["usd"], 6),
        "online_usd_by_fake_usage": round(fake_online_usd, 6),
        "batch_over_online": round(batch["usd"] / online["usd"], 6) if online["usd"] else None,
        "half_to_the_cent": round(batch["usd"] * 2, 2) == round(online["usd"], 2),
        "requests_processed_twice": after["batch_lines_twice"],
        "requests_sent_online_by_batch_run": after_batch["received"],
    }
    print(
        f"{a.items:,} items: batch {batch['wall_s']:.1f} s in {batch['batches_submitted']} batches, "
        f"${batch['usd']:.4f} (fake's usage: ${fake_batch_usd:.4f}); online {online['wall_s']:.1f} s, "
        f"${online['usd']:.4f} (fake's usage: ${fake_online_usd:.4f}); peak RSS {batch['peak_rss_mb']} MB; "
        f"{after['batch_lines_twice']} requests processed twice"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
