"""The local teacher's requests/s alone and beside busy CPU loops, under each OpenMP waiting policy.

Why: llama.cpp's threads meet at an OpenMP barrier after every operation, and libgomp
spins there by default; with other work on the same cores (the student training, a second
run, the test suite) the server can collapse. This sends the same demo requests (1 slot,
2 in flight) to a fresh server per policy, first with ``--busy`` ``while True: pass`` loops
running beside it, then alone. One run of each; this machine's speed drifts, so compare
rows of one run only.

    .venv/bin/python bench/teacher_contention.py [--items 30] [--busy 2]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.teacher_throughput import build_requests, send  # noqa: E402

POLICIES = {
    "libgomp default": {},
    "GOMP_SPINCOUNT=100000 (distill's default)": {"GOMP_SPINCOUNT": "100000"},
    "OMP_WAIT_POLICY=passive (the test suite's)": {"OMP_WAIT_POLICY": "passive"},
}


def measure(reqs: list, env: dict[str, str]) -> float:
    from tasks.teacher import local_server as lt

    saved = dict(os.environ)
    os.environ.pop("GOMP_SPINCOUNT", None)
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ.update(env)
    try:
        st = lt.start_server(None, n_parallel=1, write_state=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        asyncio.run(send([st.base_url], reqs[:2], 2))  # warm-up
        seconds, _ = asyncio.run(send([st.base_url], reqs, 2))
        return len(reqs) / seconds
    finally:
        lt._kill(st.pid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--busy", type=int, default=2, help="busy loops beside the server in the loaded rows")
    a = ap.parse_args()
    reqs, _ = build_requests("configs/demo.yaml", a.items, 1, True, order="sample")
    out: dict[str, dict[str, float]] = {}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    try:
        for name, env in POLICIES.items():
            out[name] = {"loaded": round(measure(reqs, env), 2)}
            print(f"{name}: {out[name]['loaded']} req/s beside {a.busy} busy loops", flush=True)
    finally:
        for b in burners:
            b.kill()
    for name, env in POLICIES.items():
        out[name]["alone"] = round(measure(reqs, env), 2)
        print(f"{name}: {out[name]['alone']} req/s alone", flush=True)
    print(json.dumps({"requests": len(reqs), "busy_loops": a.busy, "requests_per_s": out}))


if __name__ == "__main__":
    main()
