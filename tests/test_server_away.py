"""A server stops mid-run (MLflow tracking, or the Prefect API): a clear error after the client's retries; nothing
paid is lost; a rerun against the restarted server completes without asking the teacher again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from distill import servers
from tests.conftest import REPO, free_port
from tests.fake_openai import FakeOpenAI
from tests.test_distill_flow import cfg_dict, write_data

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")


def stop_mid_run_then_rerun(
    tmp_path, binary_prompt, stop: str, prefect_api: str = "", retries: dict[str, str] | None = None
) -> tuple[str, str, dict]:
    """Start `distill up`'s servers, run, stop server ``stop`` during annotation, then restart and rerun.

    Returns the stopped server's URL, the first run's stderr (after asserting exit 4) and the rerun's summary,
    having asserted that the rerun succeeded and sent no new teacher request.
    """
    pp, mp = free_port(), free_port()
    sv = servers.up(tmp_path, pp, mp, which=(stop,))  # the other server is the session's (or sqlite)
    teacher = FakeOpenAI(latency_s=0.1).start()
    try:
        write_data(tmp_path, 64, 24)
        raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": teacher.base_url, "samples": 2})
        if stop == "mlflow":
            raw["tracking"]["tracking_uri"] = sv["mlflow"].url
        raw["student"]["epochs"] = 4
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        env = {
            **os.environ,
            "PREFECT_API_URL": prefect_api or sv["prefect"].url,
            "PYTHONPATH": str(REPO),
            **(retries or {}),
        }
        cmd = [
            sys.executable,
            "-m",
            "distill.cli",
            "run",
            str(cfg),
            "--no-progress",
            "--summary-json",
            str(tmp_path / "s.json"),
        ]
        run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while sum(teacher.delivered_ok.values()) < 20:  # annotation is under way
            assert run.poll() is None, run.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        servers._stop_pid(sv[stop].pid)
        _, err = run.communicate(timeout=900)
        assert run.returncode == 4, err[-3000:]
        paid = sum(teacher.delivered_ok.values())

        servers.up(tmp_path, pp, mp, which=(stop,))  # the server comes back, on its own database
        rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        teacher.stop()
        servers.down(tmp_path)
    assert sum(teacher.delivered_ok.values()) == paid  # nothing asked twice
    return sv[stop].url.rstrip("/"), err, json.loads((tmp_path / "s.json").read_text())


def test_tracking_server_goes_away_mid_run_then_rerun_completes(tmp_path, binary_prompt, prefect_api):
    # MLflow's client retries with backoff (7 retries, about 4 minutes by default); fewer here to keep CI short
    url, err, s = stop_mid_run_then_rerun(
        tmp_path,
        binary_prompt,
        "mlflow",
        prefect_api,
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"},
    )
    assert f"the MLflow tracking server at {url} stopped answering" in err and "rerun" in err
    assert "annotate" in s["stages_reused"] and s["model_version"] == "1" and s["promoted"] is True


def test_prefect_api_goes_away_mid_run_then_rerun_completes(tmp_path, binary_prompt):
    """Task runs go on without the API (Prefect 3 reports their states as events); the flow's own state update fails
    last, after Prefect's retries (5 by default, 1 here)."""
    url, err, s = stop_mid_run_then_rerun(
        tmp_path, binary_prompt, "prefect", retries={"PREFECT_CLIENT_MAX_RETRIES": "1"}
    )
    assert f"the Prefect API at {url} stopped answering" in err and "rerun" in err
    assert "Traceback" not in err.split("distill: error:")[-1]
    # and it is the command's last word: no exit-time drain of queued events to the dead API after it
    assert f"distill: error: the Prefect API at {url} stopped answering" in err.rstrip().splitlines()[-1]
    assert "annotate" in s["stages_reused"] and s["model_version"] == "1" and s["promoted"] is True


def test_prefect_api_not_reachable_at_start(tmp_path, binary_prompt, fake_teacher):
    """A wrong or stopped PREFECT_API_URL: exit 2 naming the URL before any request."""
    write_data(tmp_path, 8, 8)
    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": fake_teacher.base_url, "samples": 1})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": str(REPO), "PREFECT_CLIENT_MAX_RETRIES": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", str(cfg), "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the Prefect API at {url} is not reachable" in proc.stderr and "nothing was sent" in proc.stderr
    assert sum(fake_teacher.delivered_ok.values()) == 0
