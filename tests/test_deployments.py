"""Deployments the way users run them: served on a real Prefect server, triggered through its API.

`distill up` starts real Prefect and MLflow servers (loopback, a temporary working
directory); `distill serve` serves the nightly and on-demand deployments in another
process; the test triggers the on-demand deployment with parameters, as the UI form or
`prefect deployment run` does, and checks the run completed in its own process and left
an MLflow run and a model version in the MLflow server, linked both ways.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

from distill import servers as srv
from tests.conftest import REPO, free_port
from tests.fake_openai import FAKE_PRICES, FakeOpenAI

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Real Prefect and MLflow servers started by `distill up` in a temporary working directory."""
    wd = tmp_path_factory.mktemp("live")
    started = srv.up(wd, free_port(), free_port())
    try:
        yield wd, started
    finally:
        srv.down(wd)


def write_run(wd, teacher_url: str) -> dict:
    pos = ["good fun", "good acting", "good story", "good cast"]
    neg = ["bad fun", "bad acting", "bad story", "bad cast"]
    pool = [(f"p{i}", (pos if i % 2 else neg)[i % 4] + f" {i}") for i in range(40)]
    pd.DataFrame(pool, columns=["id", "text"]).to_parquet(wd / "pool.parquet")
    gold = [
        (f"g{i}", (pos if i % 2 else neg)[i % 4] + f" gold {i}", "positive" if i % 2 else "negative") for i in range(16)
    ]
    pd.DataFrame(gold, columns=["id", "text", "label"]).to_parquet(wd / "gold.parquet")
    (wd / "prompt.yaml").write_text(
        "name: t\nlabels: [positive, negative]\ninstruction: x\nexamples:\n"
        "  - {text: a good one, label: positive}\n  - {text: a bad one, label: negative}\n"
    )
    return {
        "run_name": "served",
        "workdir": str(wd / "runs"),
        "prompt": str(wd / "prompt.yaml"),
        "data": {"pool_path": str(wd / "pool.parquet"), "gold_path": str(wd / "gold.parquet"), "gold_teacher_limit": 8},
        "teacher": {"local": False, "base_url": teacher_url, "samples": 2},
        "client": {"cache_path": str(wd / "cache.sqlite"), "concurrency": 2},
        "student": {
            "epochs": 6,
            "batch_size": 8,
            "max_length": 16,
            "learning_rate": 3e-4,
            "eval_batch_size": 16,
            "early_stopping_patience": 20,
        },
        "tracking": {"model_name": "served-student", "experiment": "served"},
        "gate": {"min_macro_f1": 0.5},
        "pricing": FAKE_PRICES,
        "energy": {"measure": False},
        "schedule": {"cron": "30 3 * * *", "timezone": "Europe/Berlin"},
    }


def test_ui_settings_point_the_ui_at_the_chosen_port(live):
    _, started = live
    p = started["prefect"]
    with urllib.request.urlopen(p.ui + "/ui-settings", timeout=10) as r:
        assert json.loads(r.read())["api_url"] == p.url  # not the default port 4200
    assert srv.status(live[0])["mlflow"]["healthy"]


def test_on_demand_deployment_triggered_through_the_api_completes_and_registers(live, tmp_path):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    wd, started = live
    api, tracking = started["prefect"].url, started["mlflow"].url
    teacher = FakeOpenAI().start()
    raw = write_run(tmp_path, teacher.base_url)
    import yaml

    cfg_path = tmp_path / "nightly.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    serve = _serve(tmp_path, cfg_path, api, tracking, "on-demand")
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        nightly = client.read_deployment_by_name("distill/nightly")
                        client.read_deployment_by_name("distill/on-demand")
                        break
                    except Exception:
                        assert serve.poll() is None, (tmp_path / "serve-on-demand.log").read_text()[-3000:]
                        assert time.monotonic() < deadline, "deployments never registered"
                        time.sleep(1)
                sched = nightly.schedules[0].schedule
                assert sched.cron == "30 3 * * *" and sched.timezone == "Europe/Berlin"
            # what the UI form or `prefect deployment run -p config=...` sends: the config as JSON, edited
            params = {"config": {**raw, "run_name": "from-the-api"}}
            fr = run_deployment("distill/on-demand", parameters=params, timeout=900, poll_interval=2)
            assert fr.state is not None and fr.state.is_completed(), (
                f"{fr.state}\n" + (tmp_path / "serve-on-demand.log").read_text()[-4000:]
            )
            with get_client(sync_client=True) as client:
                from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

                arts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id]))
                )
        links = {a.key: a.data for a in arts if a.key in ("mlflow-run", "mlflow-model-version")}
        assert f"]({tracking}/#/experiments/" in links["mlflow-run"]  # Prefect -> MLflow, as a link artifact
        client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        exp = client.get_experiment_by_name("served")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{fr.id}'")
        assert len(runs) == 1 and runs[0].data.tags["distill.run_name"] == "from-the-api"
        assert runs[0].data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{fr.id}")  # MLflow -> Prefect
        versions = client.search_model_versions("name='served-student'")
        assert [v.run_id for v in versions] == [runs[0].info.run_id]
        assert runs[0].info.run_id in links["mlflow-run"] and "mlflow-model-version" in links
    finally:
        teacher.stop()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)


def test_servers_listen_on_loopback_only(live):
    """Issue 11, secrets: the servers `distill up` starts have no authentication, so they must not listen beyond
    this machine. Every listening socket of each server's process tree is on a loopback address."""
    import psutil

    wd, _ = live
    for name, info in srv.status(wd).items():
        root = psutil.Process(info["pid"])
        listening = [
            c.laddr
            for p in [root, *root.children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening, f"{name}: no listening socket found (the check would pass vacuously)"
        assert all(a.ip in ("127.0.0.1", "::1") for a in listening), f"{name} listens beyond loopback: {listening}"


def _serve(tmp_path, cfg_path, api: str, tracking: str, tag: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "MLFLOW_TRACKING_URI": tracking,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / f"serve-home-{tag}"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "distill.cli", "serve", str(cfg_path)],
        cwd=REPO,
        env=env,
        stdout=open(tmp_path / f"serve-{tag}.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the flow runs it starts die with it
    )


def _wait_until(what, check, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} never happened\n" + log.read_text()[-3000:]
        time.sleep(0.5)


def test_a_batch_run_killed_while_it_waits_is_collected_by_the_next_deployment_run(live, tmp_path):
    """The nightly's batch case: a deployment run submits its batches and is killed -9 while they run at the
    provider; the next run of the deployment re-attaches by the recorded ids, submits nothing again, and finishes."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    wd, started = live
    api, tracking = started["prefect"].url, started["mlflow"].url
    teacher = FakeOpenAI().start()
    teacher.hold_batches.set()  # the batches stay in_progress at the "provider"
    raw = write_run(tmp_path, teacher.base_url)
    raw["run_name"] = "nightly-batch"
    raw["teacher"].update({"transport": "batch", "batch": {"poll_interval_s": 0.2, "poll_max_interval_s": 0.5}})
    raw["tracking"]["model_name"] = "batch-student"
    prices = {"teacher": {**FAKE_PRICES["models"]["teacher"], "batch_discount": 0.5}}
    raw["pricing"] = {"models": prices}
    cfg_path = tmp_path / "nightly.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    serve = _serve(tmp_path, cfg_path, api, tracking, "first")
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:

                def registered() -> bool:
                    try:
                        client.read_deployment_by_name("distill/on-demand")
                        return True
                    except Exception:
                        return False

                _wait_until("the deployments registering", registered, 120, tmp_path / "serve-first.log")
            first = run_deployment("distill/on-demand", parameters={"config": raw}, timeout=0)
            # the gold and the pool shard each submit a batch; then the run waits on them
            _wait_until(
                "both batches submitted", lambda: teacher.batches_created == 2, 300, tmp_path / "serve-first.log"
            )
            time.sleep(1.0)
            os.killpg(serve.pid, signal.SIGKILL)  # the worker and the flow run it started: kill -9 while waiting
            serve.wait(30)
            teacher.hold_batches.clear()  # the provider finishes the batches while nothing of distill runs
            serve = _serve(tmp_path, cfg_path, api, tracking, "second")
            with get_client(sync_client=True) as client:
                _wait_until("the deployments registering again", registered, 120, tmp_path / "serve-second.log")
            second = run_deployment("distill/on-demand", parameters={"config": raw}, timeout=900, poll_interval=2)
            assert second.state is not None and second.state.is_completed(), (
                f"{second.state}\n" + (tmp_path / "serve-second.log").read_text()[-4000:]
            )
        assert first.id != second.id
        assert teacher.batches_created == 2  # re-attached by the recorded ids: nothing submitted twice
        assert set(teacher.batch_lines.values()) == {1} and len(teacher.received) == 2  # the probe alone went online
        summary = json.loads((tmp_path / "runs" / "nightly-batch" / "distill_summary.json").read_text())
        assert summary["promoted"] is True and summary["teacher_transport"] == "batch"
    finally:
        teacher.stop()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
