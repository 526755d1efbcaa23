"""Two runs at once on one working directory: same run name refused, other run names share cache and store safely."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, use_mlflow
from tests.fake_openai import FakeOpenAI
from tests.test_distill_flow import cfg_dict, write_data

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")


def start(cfg, tmp_path, prefect_api, name):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "run",
            str(cfg),
            "--no-progress",
            "--summary-json",
            str(tmp_path / f"{name}.json"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_runs_at_once(tmp_path, binary_prompt, prefect_api):
    import mlflow

    srv = FakeOpenAI(hold_after=5).start()  # x holds the folder, mid-annotation, until the refused run has gone
    try:
        write_data(tmp_path, 64, 24)
        cfgs = {}
        for name in ("x", "y"):
            raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": srv.base_url, "samples": 2})
            raw["run_name"] = name
            raw["student"]["epochs"] = 4
            cfgs[name] = tmp_path / f"{name}.yaml"
            cfgs[name].write_text(yaml.safe_dump(raw))
        a = start(cfgs["x"], tmp_path, prefect_api, "x")
        deadline = time.monotonic() + 120
        while sum(srv.delivered_ok.values()) < 5:
            assert a.poll() is None, a.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c = start(cfgs["y"], tmp_path, prefect_api, "y")  # another run name, same cache, MLflow store and workdir
        b = start(cfgs["x"], tmp_path, prefect_api, "x-again")  # the same run name while x runs
        _, b_err = b.communicate(timeout=300)
        assert b.returncode == 2, b_err[-3000:]
        assert "is in use by another distill run" in b_err and f'"pid": {a.pid}' in b_err
        assert a.poll() is None, "the refused run must not have disturbed the first"
        srv.release()  # x and y annotate at once from here, on one cache file
        for p in (a, c):
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
    finally:
        srv.stop()
    delivered = dict(srv.delivered_ok)

    sx, sy = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("x", "y"))
    assert sx["student_macro_f1"] == sy["student_macro_f1"]  # same data and teacher: the same student
    # the cache is intact and holds every answer both runs used; nothing asked was lost
    db = sqlite3.connect(tmp_path / "cache.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cached = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    db.close()
    assert cached == len(delivered) > 0  # one row per distinct request the teacher answered, from either run
    # both registered, exactly one champion, and it loads
    client = use_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = client.search_model_versions("name='dag-student'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert [sx["promoted"], sy["promoted"]].count(True) == 1
    champ = client.get_model_version_by_alias("dag-student", "champion")
    winner = sx if sx["promoted"] else sy
    assert str(champ.version) == winner["model_version"]
    runs = mlflow.search_runs(experiment_names=["distill"], filter_string="tags.`distill.run_name` != ''")
    assert {"x", "y"} <= set(runs["tags.distill.run_name"])
