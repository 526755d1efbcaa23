"""kill -9 at each stage of ``distill run``, then rerun: the same figures; only what had not finished is redone.

The process is killed by a failpoint (distill/faults.py) at a chosen moment: between two
annotation shards, after each later stage's work but before it is recorded, and at three
moments of registration. The rerun is the plain command a user would type again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, use_mlflow
from tests.fake_openai import FakeOpenAI
from tests.test_distill_flow import cfg_dict, write_data

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

# figures that must not depend on being interrupted (timings, speeds and ids may)
SAME = (
    "student_macro_f1",
    "student_accuracy",
    "student_macro_f1_on_teacher_subset",
    "teacher_macro_f1_voted",
    "teacher_accuracy_single",
    "train_items",
    "val_macro_f1",
    "student_ece",
    "teacher_ece",
    "promoted",
    "model_version",
    "items",
    "votes",
    "invalid_votes",
    "gold_items",
)
STAGES = ["annotate", "aggregate", "train", "evaluate"]


@pytest.fixture(scope="module")
def teacher():
    srv = FakeOpenAI(latency_s=0.0).start()
    yield srv
    srv.stop()


def setup_run(tmp_path, teacher, binary_prompt):
    write_data(tmp_path, 64, 24)
    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": teacher.base_url, "samples": 2})
    raw["data"]["chunk_rows"] = 32  # two pool shards: a kill can land between shards
    raw["student"].update({"epochs": 4})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p, raw


def distill_run(cfg, tmp_path, prefect_api, failpoint=None):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    env.pop("DISTILL_FAILPOINT", None)
    if failpoint:
        env["DISTILL_FAILPOINT"] = failpoint
    out = tmp_path / "summary.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", str(cfg), "--no-progress", "--summary-json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads(out.read_text()) if out.exists() else None
    return proc, summary


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher, prefect_api):
    from tests.conftest import write_binary_prompt

    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg, _ = setup_run(tmp, teacher, write_binary_prompt(tmp))
    proc, s = distill_run(cfg, tmp, prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return s


def champion_predicts(tracking_uri: str, name: str) -> list[str]:
    import mlflow
    import pandas as pd

    use_mlflow(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    return model.predict(pd.DataFrame({"text": ["good story here", "bad acting here"]}))["label"].tolist()


@pytest.mark.parametrize(
    "point,reused",
    [
        ("annotate:shard", []),
        ("aggregate:finished", STAGES[:1]),
        ("train:finished", STAGES[:2]),
        ("evaluate:finished", STAGES[:3]),
        ("register:logged", STAGES),
        ("register:created", STAGES),
        ("register:before-champion", STAGES),
    ],
)
def test_kill_at_each_stage_then_rerun(point, reused, tmp_path, teacher, binary_prompt, prefect_api, uninterrupted):
    cfg, raw = setup_run(tmp_path, teacher, binary_prompt)
    killed, _ = distill_run(cfg, tmp_path, prefect_api, failpoint=point)
    assert killed.returncode == -9, f"not killed at {point}: rc {killed.returncode}\n{killed.stderr[-2000:]}"

    uri, name = raw["tracking"]["tracking_uri"], raw["tracking"]["model_name"]
    client = use_mlflow(uri)
    if point.startswith("register:"):
        versions = client.search_model_versions(f"name='{name}'") if point != "register:logged" else []
        # a version exists only complete: born with its gate decision; the champion alias is not yet moved
        for v in versions:
            assert v.tags.get("gate_decision") in ("promoted", "rejected") and v.tags.get("distill.candidate")
        from mlflow.exceptions import MlflowException

        with pytest.raises(MlflowException):
            client.get_model_version_by_alias(name, "champion")

    proc, s = distill_run(cfg, tmp_path, prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s["stages_reused"] == reused, f"{point}: reused {s['stages_reused']}, expected {reused}"
    for k in SAME:
        assert s[k] == uninterrupted[k], f"{point}: {k} = {s[k]!r} after the kill, {uninterrupted[k]!r} uninterrupted"
    if point == "annotate:shard":  # the shard that finished is not asked again
        assert 0 < s["requests_sent"] < uninterrupted["requests_sent"]
    elif reused:
        assert s["requests_sent"] == uninterrupted["requests_sent"]  # the reused annotation's own figures
    # one version, never two; the champion loads from the registry and predicts
    versions = client.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == ["1"], [v.version for v in versions]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert champion_predicts(uri, name) == ["positive", "negative"]
