"""A CLI annotation killed with SIGKILL mid-run and restarted re-sends nothing that had succeeded."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO
from tests.fake_openai import FAKE_PRICES, FakeOpenAI, canonical

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

N_ITEMS = 400
K = 2


def write_config(tmp_path, base_url, prompt):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(
            json.dumps({"id": f"i{i}", "text": f"{'good' if i % 3 else 'bad'} item {i}"}) + "\n" for i in range(N_ITEMS)
        )
    )
    cfg = {
        "run_name": "resume",
        "workdir": str(tmp_path / "runs"),
        "prompt": str(prompt),
        "data": {"pool_path": str(pool), "chunk_rows": 100},
        "teacher": {"local": False, "base_url": base_url, "samples": K, "variation": "prompt_variants"},
        "client": {"concurrency": 4, "cache_path": str(tmp_path / "cache.sqlite"), "timeout_s": 10},
        "pricing": FAKE_PRICES,
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def cached_bodies(path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {canonical(json.loads(r[0])) for r in db.execute("SELECT request FROM responses")}
    finally:
        db.close()


def test_sigkill_then_resume(tmp_path, binary_prompt, prefect_api):
    srv = FakeOpenAI(latency_s=0.02).start()
    try:
        cfg = write_config(tmp_path, srv.base_url, binary_prompt)
        env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
        cmd = [
            sys.executable,
            "-m",
            "distill.cli",
            "annotate",
            str(cfg),
            "--no-progress",
            "--summary-json",
            str(tmp_path / "summary.json"),
        ]
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while sum(srv.delivered_ok.values()) < 300:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "annotation never got going"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        committed = cached_bodies(tmp_path / "cache.sqlite")
        first_run_ok = set(srv.delivered_ok)
        assert 300 - 4 <= len(committed) < N_ITEMS * K  # killed mid-run; up to 4 answers were in flight

        srv.reset_counts()
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]

        resent = set(srv.received) & committed
        assert not resent, f"{len(resent)} requests that had succeeded were sent again"
        # only answers in flight at the moment of the kill may have been paid twice
        assert len(set(srv.delivered_ok) & first_run_ok) <= 4
        assert len(srv.received) == N_ITEMS * K - len(committed)

        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["items"] == N_ITEMS
        # finished shards are reused as files; the cut-off shard is answered from the cache
        assert summary["shards_reused"] >= 1
        assert summary["requests_cached"] + summary["shards_reused"] * 100 * K == len(committed)
        assert summary["requests_sent"] == len(srv.received)
        votes_dir = tmp_path / "runs" / "resume" / "votes" / "pool"
        ids = [i for p in sorted(votes_dir.glob("*.parquet")) for i in pq.read_table(p).column("id").to_pylist()]
        assert sorted(ids) == sorted(f"i{i}" for i in range(N_ITEMS))
        labels = [x for p in votes_dir.glob("*.parquet") for x in pq.read_table(p).column("label").to_pylist()]
        assert None not in labels
    finally:
        srv.stop()
