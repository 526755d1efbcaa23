"""Shared fixtures: offline env, an isolated Prefect home, one Prefect test server, a fake teacher."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill.runtime import OFFLINE_ENV  # noqa: E402  (plain constants; imports nothing heavy)

_TMP = tempfile.mkdtemp(prefix="distill-tests-")
os.environ.update(OFFLINE_ENV)
os.environ.update(
    {
        "PREFECT_HOME": str(Path(_TMP) / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(Path(_TMP) / "prefect-results"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DISTILL_STATE_DIR": str(Path(_TMP) / "distill-state"),
        # the suite runs the local teacher beside other CPU-bound tests on every core: OpenMP threads that spin at
        # their barriers then starve each other (README "Teacher speed"); passive waiting keeps it steady there
        "OMP_WAIT_POLICY": "passive",
    }
)

from tests.fake_openai import FakeOpenAI  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """This process's scratch folder (Prefect home, results, state) goes when its session ends: every pytest
    process (the controller and each xdist worker) made one, and /tmp kept them all."""
    import shutil

    shutil.rmtree(_TMP, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the long tests first and spread over the workers (tests/scheduling.py)."""
    from tests.scheduling import worker_count, xdist_order

    items[:] = xdist_order(items, worker_count())


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server for the session; yields its API URL (for subprocesses too)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def fake_teacher() -> Iterator[FakeOpenAI]:
    srv = FakeOpenAI(latency_s=0.0, slow_s=2.0).start()
    try:
        yield srv
    finally:
        srv.stop()


def free_port() -> int:
    """A loopback port nothing listens on right now (for a server a test starts, or one that must refuse)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_mlflow(uri: str):
    """Point this test process at one MLflow store for tracking *and* registry, and return a client for it.

    Why both: an earlier in-process test's ``setup_tracking`` leaves ``mlflow.set_registry_uri``
    set for the whole pytest process, so a bare ``MlflowClient()`` after ``set_tracking_uri``
    would read another test's registry (empty, or with its own champion).
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def write_binary_prompt(folder: Path) -> Path:
    """The small positive/negative template the fake teacher's tests use, written into ``folder``."""
    p = Path(folder) / "prompt.yaml"
    p.write_text(
        "name: test-binary\n"
        "labels: [positive, negative]\n"
        "instruction: Is the review positive or negative?\n"
        "input_prefix: 'Review: '\n"
        "output_prefix: 'Sentiment:'\n"
        "examples:\n"
        "  - {text: 'a good film', label: positive}\n"
        "  - {text: 'a dull film', label: negative}\n"
        "  - {text: 'loved it', label: positive}\n"
    )
    return p


@pytest.fixture
def binary_prompt(tmp_path: Path) -> Path:
    return write_binary_prompt(tmp_path)


def shard_settings(
    cfg, template, base_url: str, api_key=None, run_id: str = "r", *, prices=None, counter=None, members=None
):
    """What ``annotate_shard`` asks with, from a run config: the main endpoint (and ``members`` as (url, key) pairs)."""
    from tasks.teacher.client import Endpoint
    from tasks.teacher.shard import ShardSettings

    check = cfg.teacher.check_model
    endpoints = [Endpoint(base_url, api_key, 0, check)] + [
        Endpoint(u, k, i, check) for i, (u, k) in enumerate(members or [], start=1)
    ]
    return ShardSettings(template, cfg.teacher, cfg.client, endpoints, run_id, list(prices or []), counter)


@pytest.fixture(scope="session")
def llama_tokenize() -> Iterator:
    """``tokenize(text, parse_special)`` by the real llama-server on the bundled GGUF (its /tokenize endpoint).

    What the embedded teacher does to a prompt is what this returns with ``parse_special``
    True (llama-server parses special tokens in a completion prompt).
    """
    import json
    import urllib.request

    from tasks.teacher import local_server as lt

    st = lt.start_server(None, n_parallel=1, write_state=False, state_dir=Path(_TMP) / "tokenize-server")

    def tokenize(text: str, parse_special: bool = True) -> list[int]:
        body = json.dumps({"content": text, "add_special": parse_special, "parse_special": parse_special}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{st.port}/tokenize", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["tokens"]

    try:
        yield tokenize
    finally:
        lt._kill(st.pid)
