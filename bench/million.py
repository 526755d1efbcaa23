"""A million items through ``distill annotate``, as a user runs it: memory, speed, restart, plan.

Issue 11, "Under load". The CLI runs as a subprocess (``python -m distill.cli annotate``)
against a fast loopback fake teacher in its own process (bench/fast_teacher.py), with k=1
and concurrency 64. Measured:

- peak RSS of the annotating process and its children (psutil, sampled every 0.2 s) for
  N items and for a baseline run of 10,000 items in the same invocation; target: N within
  15% of the baseline;
- requests/s of the first and of the last pool shard (each shard logs its requests sent and
  sending time; tasks/teacher/shard.py); target: last within 10% of the first;
- a restart midway: a fresh N-item run killed with SIGKILL (its process group) once the fake
  teacher has received about half the requests, then run again; target: the rerun sends
  exactly the requests whose answers were not committed to the cache (counted by the fake
  teacher and by the summary JSON), and none of the committed ones;
- ``distill plan CONFIG`` on the cache the N-item run filled (N answers); target: seconds
  (here: under 10 s for the command, Python start-up included). Also timed in-process:
  ``ResponseCache.model_history`` on that cache, and the former json_extract scan
  (``model_history_scan``) beside it.

    .venv/bin/python bench/million.py [--n 1000000] [--baseline-n 10000] [--concurrency 64]
                                      [--chunk-rows 10000] [--k 1] [--skip-restart] [--workdir DIR]

The last printed line is one JSON object with every figure and a pass/fail per target.
Generated pools, caches and run folders live in a temporary folder (or --workdir) and are
removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

PROMPT = (
    "name: bench-binary\n"
    "labels: [positive, negative]\n"
    "instruction: Is the review positive or negative?\n"
    "input_prefix: 'Review: '\n"
    "output_prefix: 'Sentiment:'\n"
    "examples:\n"
    "  - {text: 'a good film', label: positive}\n"
    "  - {text: 'a dull film', label: negative}\n"
    "  - {text: 'loved it', label: positive}\n"
)
PRICES = {"models": {"teacher": {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "source": "bench"}}}
SHARD_LINE = re.compile(
    r"shard\s+(\w+)/(part-\d+)\s+done:\s+(\d+)\s+items,\s+(\d+)\s+requests\s+sent\s+in\s+"
    r"([\d.]+)\s+s\s+\(([\d.]+)\s+req/s\),\s+(\d+)\s+cached(?:,\s+[\d.]+\s+s\s+in\s+all,\s+"
    r"([\d.]+)\s+s\s+of\s+this\s+process's\s+CPU)?"
)
ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "COLUMNS": "400",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- inputs
def write_pool(path: Path, n: int) -> None:
    """n distinct items (no two requests alike: nothing is deduplicated), a third of them 'bad'."""
    with open(path, "w") as fh:
        step = 50_000
        for start in range(0, n, step):
            fh.write(
                "".join(
                    f'{{"id":"i{i}","text":"{"bad" if i % 3 == 0 else "good"} item {i}: arrived on time, works as '
                    f'described, packaging fine"}}\n'
                    for i in range(start, min(n, start + step))
                )
            )


def write_config(
    folder: Path, name: str, pool: Path, base_url: str, a: argparse.Namespace, *, cache: Optional[Path] = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    prompt = folder / "prompt.yaml"
    prompt.write_text(PROMPT)
    cfg = {
        "run_name": name,
        "workdir": str(folder / "runs"),
        "prompt": str(prompt),
        "data": {"pool_path": str(pool), "chunk_rows": a.chunk_rows},
        "teacher": {"local": False, "base_url": base_url, "samples": a.k, "variation": "prompt_variants"},
        "client": {"concurrency": a.concurrency, "cache_path": str(cache or folder / "cache.sqlite"), "timeout_s": 60},
        "pricing": PRICES,
    }
    p = folder / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_teacher() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [PY, str(REPO / "bench" / "fast_teacher.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            get_json(root + "/stats")
            return proc, root
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("fast teacher did not start")


class RssSampler:
    """Peak RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self.peak_main = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                main = self.proc.memory_info().rss
                total = main
                for c in self.proc.children(recursive=True):
                    try:
                        total += c.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self.peak_main = max(self.peak_main, main)
            self.samples.append((time.time(), total))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


def cli(args: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    fh = open(log_path, "ab")
    return subprocess.Popen(
        [PY, "-m", "distill.cli", *args], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )


def shard_rates(log_path: Path) -> list[dict[str, Any]]:
    text = " ".join(log_path.read_text(errors="replace").split())  # rich may wrap long lines
    out = []
    for split, part, items, sent, send_s, rps, cached, cpu in SHARD_LINE.findall(text):
        out.append(
            {
                "split": split,
                "part": part,
                "items": int(items),
                "sent": int(sent),
                "send_s": float(send_s),
                "rps": float(rps),
                "cached": int(cached),
                "cpu_s": float(cpu) if cpu else None,
            }
        )
    return out


STAGE_MARKS = [
    ("load", "loaded "),
    ("plan", "plan before any request"),
    ("annotate", "shard pool/"),
    ("annotate", "shard gold/"),
]


def rss_by_stage(log_path: Path, samples: list[tuple[float, int]]) -> dict[str, float]:
    """Peak RSS (MB) per stage, the stages cut at the log lines that end them (the log's HH:MM:SS.mmm stamps)."""
    import datetime as dt

    ends: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.match(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) \|", line)
        if not m:
            continue
        for stage, mark in STAGE_MARKS:
            if mark in line:
                day = dt.datetime.fromtimestamp(samples[0][0]).replace(
                    hour=int(m[1]), minute=int(m[2]), second=int(m[3]), microsecond=int(m[4]) * 1000
                )
                ends[stage] = day.timestamp()  # the last such line
    out: dict[str, float] = {}
    start = samples[0][0] if samples else 0.0
    for stage in ("load", "plan", "annotate"):
        if stage in ends:
            peak = max((r for t, r in samples if start <= t <= ends[stage]), default=0)
            out[stage] = round(peak / 2**20, 1)
            start = ends[stage]
    out["after"] = round(max((r for t, r in samples if t >= start), default=0) / 2**20, 1)
    return out


def run_annotate(
    name: str,
    folder: Path,
    pool: Path,
    base_url: str,
    a: argparse.Namespace,
    *,
    env: dict[str, str],
    kill_at: Optional[int] = None,
    teacher_root: str = "",
) -> dict[str, Any]:
    """One ``distill annotate`` to the end (or SIGKILLed once the teacher received ``kill_at`` requests)."""
    cfg = folder / "cfg.yaml"
    summary = folder / f"summary-{name}.json"
    log_path = folder / f"{name}.log"
    t0 = time.monotonic()
    proc = cli(["annotate", str(cfg), "--no-progress", "--summary-json", str(summary)], env, folder, log_path)
    rss = RssSampler(proc.pid)
    killed = False
    try:
        if kill_at is not None:
            while proc.poll() is None:
                # /received, not /stats: /stats sorts every hash received so far, and polled 20 times a second it
                # slowed the fake teacher (and so the run) from 2,200 to 300 req/s by the 45th shard
                if get_json(teacher_root + "/received")["received"] >= kill_at:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.05)
        rc = proc.wait()
    finally:
        rss.stop()
    wall = time.monotonic() - t0
    if rc != 0 and not killed:
        raise RuntimeError(f"{name}: distill annotate exited {rc}:\n" + log_path.read_text()[-4000:])
    shards = [s for s in shard_rates(log_path) if s["split"] == "pool" and s["sent"] > 0]
    out: dict[str, Any] = {
        "wall_s": wall,
        "rc": rc,
        "killed": killed,
        "peak_rss_mb": rss.peak / 2**20,
        "peak_rss_main_mb": rss.peak_main / 2**20,
        "shards": shards,
        "rss_by_stage_mb": rss_by_stage(log_path, rss.samples) if rss.samples else {},
        "summary": json.loads(summary.read_text()) if summary.exists() else None,
    }
    log(
        f"{name}: rc={rc} killed={killed} wall {wall:.1f} s, peak RSS {out['peak_rss_mb']:.0f} MB "
        f"(main process {out['peak_rss_main_mb']:.0f} MB), {len(shards)} pool shards that sent requests"
    )
    return out


def count_answers(cache: Path) -> int:
    db = sqlite3.connect(str(cache))
    try:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    finally:
        db.close()


def time_plan(cfg: Path, env: dict[str, str], folder: Path, name: str) -> dict[str, Any]:
    out_json = folder / f"plan-{name}.json"
    t0 = time.monotonic()
    done = subprocess.run(
        [PY, "-m", "distill.cli", "plan", str(cfg), "--json", str(out_json)],
        cwd=folder,
        env=env,
        capture_output=True,
        timeout=1800,
    )
    secs = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"distill plan failed:\n{done.stderr.decode()[-3000:]}")
    plan = json.loads(out_json.read_text())
    log(f"plan {name}: {secs:.1f} s, {plan['requests_total']:,} requests, {plan['requests_cached']:,} cached")
    return {
        "seconds": secs,
        "requests_total": plan["requests_total"],
        "requests_cached": plan["requests_cached"],
        "tokens_out_method": plan.get("tokens_out_method"),
        "seconds_method": plan.get("seconds_method"),
    }


def time_history(cache_path: Path) -> dict[str, Any]:
    """model_history (indexed) and the former json_extract scan on the same cache, side by side."""
    sys.path.insert(0, str(REPO))
    from tasks.teacher.cache import ResponseCache, model_history_scan

    c = ResponseCache(cache_path)
    try:
        t0 = time.perf_counter()
        new = c.model_history("teacher", 4)
        t1 = time.perf_counter()
        old = model_history_scan(c.db, "teacher", 4)
        t2 = time.perf_counter()
    finally:
        c.close()
    same = all(
        (abs(new[k] - old[k]) <= 1e-9 * max(1.0, abs(old[k])) if isinstance(old[k], float) else new[k] == old[k])
        for k in old
    )
    return {"history_s": t1 - t0, "scan_s": t2 - t1, "same_figures": same, "history": new}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--baseline-n", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--skip-restart", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    os.environ.update(ENV)  # the Prefect test server this process starts: no telemetry, no look-ups
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="distill-million-"))
    root.mkdir(parents=True, exist_ok=True)
    log(f"work folder {root}")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    teacher, troot = start_teacher()
    res: dict[str, Any] = {
        "n": a.n,
        "baseline_n": a.baseline_n,
        "concurrency": a.concurrency,
        "k": a.k,
        "chunk_rows": a.chunk_rows,
    }
    try:
        with prefect_test_harness(server_startup_timeout=120):
            env = {
                **os.environ,
                **ENV,
                "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                "PYTHONPATH": str(REPO),
                "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "prefect-results"),
            }
            base_url = troot + "/v1"
            runs: dict[str, dict[str, Any]] = {}
            for name, n in (("base", a.baseline_n), ("full", a.n)):
                folder = root / name
                folder.mkdir(exist_ok=True)
                pool = folder / "pool.jsonl"
                t0 = time.monotonic()
                write_pool(pool, n)
                log(f"{name}: wrote {n:,} items in {time.monotonic() - t0:.1f} s")
                write_config(folder, name, pool, base_url, a)
                get_json(troot + f"/phase?name={name}")
                runs[name] = run_annotate(name, folder, pool, base_url, a, env=env)
                runs[name]["teacher"] = get_json(troot + f"/phase?name={name}-done")
            base, full = runs["base"], runs["full"]
            res["rss_10k_mb"] = round(base["peak_rss_mb"], 1)
            res["rss_1m_mb"] = round(full["peak_rss_mb"], 1)
            res["rss_main_10k_mb"] = round(base["peak_rss_main_mb"], 1)
            res["rss_main_1m_mb"] = round(full["peak_rss_main_mb"], 1)
            res["rss_ratio"] = round(full["peak_rss_mb"] / base["peak_rss_mb"], 4)
            res["rss_by_stage_10k_mb"] = base["rss_by_stage_mb"]  # peak within load, plan, annotate, after
            res["rss_by_stage_1m_mb"] = full["rss_by_stage_mb"]
            res["wall_10k_s"] = round(base["wall_s"], 1)
            res["wall_1m_s"] = round(full["wall_s"], 1)
            res["teacher_rps_1m"] = full["teacher"]["rps"]
            res["summary_rps_1m"] = (full["summary"] or {}).get("teacher_requests_per_s")
            sh = full["shards"]
            res["shards_1m"] = len(sh)
            if sh:
                res["first_shard_rps"] = sh[0]["rps"]
                res["last_shard_rps"] = sh[-1]["rps"]
                res["ratio"] = round(sh[-1]["rps"] / sh[0]["rps"], 4)
                # context: the same comparison over three shards at each end
                f3 = sum(s["sent"] for s in sh[:3]) / sum(s["send_s"] for s in sh[:3])
                l3 = sum(s["sent"] for s in sh[-3:]) / sum(s["send_s"] for s in sh[-3:])
                res["first3_shards_rps"], res["last3_shards_rps"] = round(f3, 1), round(l3, 1)
                # context: a least-squares line through every shard's req/s (a slowdown shows as a falling line
                # whatever the shard-to-shard spread), its value at the last shard over its value at the first,
                # and that spread; the target above stays the single first and last shard, as the issue asks
                if len(sh) > 2:
                    ys = [s["rps"] for s in sh]
                    mx, my = (len(ys) - 1) / 2, sum(ys) / len(ys)
                    sxx = sum((x - mx) ** 2 for x in range(len(ys)))
                    slope = sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sxx
                    first_fit, last_fit = my - slope * mx, my + slope * mx
                    res["trend_first_rps"], res["trend_last_rps"] = round(first_fit, 1), round(last_fit, 1)
                    res["trend_ratio"] = round(last_fit / first_fit, 4)
                    res["shard_rps_sd"] = round((sum((y - my) ** 2 for y in ys) / (len(ys) - 1)) ** 0.5, 1)
                # requests per second of the annotating process's CPU: what other load on a shared machine does
                # not change (a context figure, not the target)
                if sh[0]["cpu_s"] and sh[-1]["cpu_s"]:
                    res["first_shard_req_per_cpu_s"] = round(sh[0]["sent"] / sh[0]["cpu_s"], 1)
                    res["last_shard_req_per_cpu_s"] = round(sh[-1]["sent"] / sh[-1]["cpu_s"], 1)
                    res["cpu_ratio"] = round(res["last_shard_req_per_cpu_s"] / res["first_shard_req_per_cpu_s"], 4)
                res["load_average_1m"] = os.getloadavg()[0]
            res["stage_seconds_1m"] = (full["summary"] or {}).get("stage_seconds")

            # distill plan on the cache the full run filled
            full_cache = root / "full" / "cache.sqlite"
            res["cache_answers"] = count_answers(full_cache)
            p_full = time_plan(root / "full" / "cfg.yaml", env, root / "full", "full")
            small = root / "plan-small"
            write_config(small, "plan-small", root / "base" / "pool.jsonl", base_url, a, cache=full_cache)
            p_small = time_plan(small / "cfg.yaml", env, small, "small")
            res["plan_seconds"] = round(p_full["seconds"], 2)
            res["plan_requests_cached"] = p_full["requests_cached"]
            res["plan_small_config_seconds"] = round(p_small["seconds"], 2)
            res["plan_small_config_items"] = a.baseline_n
            hist = time_history(full_cache)
            res["model_history_s"] = round(hist["history_s"], 4)
            res["model_history_scan_s"] = round(hist["scan_s"], 4)
            res["model_history_same_as_scan"] = hist["same_figures"]

            if not a.skip_restart:
                folder = root / "restart"
                folder.mkdir(exist_ok=True)
                pool = root / "full" / "pool.jsonl"
                write_config(folder, "restart", pool, base_url, a)
                total = a.n * a.k
                get_json(troot + "/phase?name=restart-1&forget=1")  # compare the rerun with the killed run only
                first = run_annotate(
                    "restart-1", folder, pool, base_url, a, env=env, kill_at=total // 2, teacher_root=troot
                )
                t1 = get_json(troot + "/phase?name=restart-2")
                committed = count_answers(folder / "cache.sqlite")
                second = run_annotate("restart-2", folder, pool, base_url, a, env=env)
                t2 = get_json(troot + "/phase?name=end")
                s2 = second["summary"] or {}
                import pyarrow.parquet as pq

                voted = sorted((folder / "runs" / "restart" / "votes" / "pool").glob("part-*.parquet"))
                ids = [i for v in voted for i in pq.read_table(v, columns=["id"]).column("id").to_pylist()]
                labelled = sum(
                    x is not None
                    for v in voted
                    for x in pq.read_table(v, columns=["label"]).column("label").to_pylist()
                )
                res.update(
                    {
                        "restart_killed": first["killed"],
                        "restart_received_before_kill": t1["received"],
                        "restart_committed_at_kill": committed,
                        "restart_remaining": total - committed,
                        "restart_rerun_sent": t2["received"],
                        "restart_rerun_distinct": t2["distinct"],
                        "restart_rerun_resent_committed_or_inflight": t2["resent_from_earlier_phases"],
                        "restart_in_flight_at_kill": t1["received"] - committed,
                        "restart_summary_requests_sent": s2.get("requests_sent"),
                        "restart_summary_requests_cached": s2.get("requests_cached"),
                        "restart_summary_shards_reused": s2.get("shards_reused"),
                        "restart_summary_items": s2.get("items"),  # counts the preflight probe's item too (flows)
                        "restart_voted_items": len(ids),
                        "restart_voted_distinct_ids": len(set(ids)),
                        "restart_voted_labelled": labelled,
                        "restart_rerun_wall_s": round(second["wall_s"], 1),
                    }
                )
    finally:
        teacher.send_signal(signal.SIGTERM)
        try:
            teacher.wait(10)
        except subprocess.TimeoutExpired:
            teacher.kill()
        if not a.keep and not a.workdir:
            shutil.rmtree(root, ignore_errors=True)

    passed = {
        "rss_within_15pct": res["rss_ratio"] <= 1.15,
        "last_shard_rps_within_10pct": "ratio" in res and res["ratio"] >= 0.9,
        "plan_in_seconds": res["plan_seconds"] < 10.0,
    }
    if not a.skip_restart:
        passed["restart_sends_only_remaining"] = (
            res["restart_killed"]
            and res["restart_rerun_sent"] == res["restart_remaining"]
            and res["restart_rerun_distinct"] == res["restart_rerun_sent"]
            and res["restart_summary_requests_sent"] == res["restart_rerun_sent"]
            and res["restart_voted_items"] == res["restart_voted_distinct_ids"] == res["restart_voted_labelled"] == a.n
            and res["restart_rerun_resent_committed_or_inflight"] <= res["restart_in_flight_at_kill"]
        )
    res["pass"] = passed
    res["all_pass"] = all(passed.values())
    for k, v in passed.items():
        log(f"{'MET   ' if v else 'MISSED'} {k}")
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
