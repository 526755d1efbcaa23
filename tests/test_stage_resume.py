"""kill -9 at each stage of ``distill run``, then rerun: the same figures; only what had not finished is redone.

The process is killed by a failpoint (distill/faults.py) at a chosen moment: between two
annotation shards, after each later stage's work but before it is recorded, and at three
moments of registration. The rerun is the plain command a user would type again.

The kills are chained through one run folder, as a very unlucky night would have them: the
run killed at one point is rerun with the next point armed, so each rerun is both the resume
of one kill and the victim of the next, and only the last rerun completes. One chain costs
8 runs of the command where a fresh run per kill point cost 15 (README "Tests"); each kill
point keeps its own test, which checks its kill, what its rerun reused and what it asked the
teacher, and the last one compares the completed run's figures with an uninterrupted run's.
The chain runs once per session (a file lock holds it when pytest-xdist workers share it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

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
# the kill points in the order a run reaches them, each with the stages its rerun must reuse
POINTS = [
    ("annotate:shard", []),
    ("aggregate:finished", STAGES[:1]),
    ("train:finished", STAGES[:2]),
    ("evaluate:finished", STAGES[:3]),
    ("register:logged", STAGES),
    ("register:created", STAGES),
    ("register:before-champion", STAGES),
]
REUSED = re.compile(r"stage (\w+): finished in an earlier run with the same inputs .*?: reused")


def setup_run(tmp_path, teacher, binary_prompt):
    write_data(tmp_path, 64, 24)
    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": teacher.base_url, "samples": 2})
    raw["data"]["chunk_rows"] = 32  # two pool shards: a kill can land between shards
    raw["student"].update({"epochs": 4})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p, raw


def distill_run(cfg, tmp_path, prefect_api, failpoint=None):
    # INFO: the run's log says which stages it reused (the suite's default level is WARNING)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "INFO"}
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


def registry_at_kill(uri: str, name: str) -> dict:
    """What the registry holds right after a kill: each version's gate tags, and the champion alias if set."""
    from mlflow.exceptions import MlflowException

    client = use_mlflow(uri)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no registered model yet
        versions = []
    try:
        champion = str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        champion = None
    return {
        "versions": [
            {"gate_decision": v.tags.get("gate_decision"), "candidate": v.tags.get("distill.candidate")}
            for v in versions
        ],
        "champion": champion,
    }


def champion_predicts(tracking_uri: str, name: str) -> list[str]:
    import mlflow
    import pandas as pd

    use_mlflow(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    return model.predict(pd.DataFrame({"text": ["good story here", "bad acting here"]}))["label"].tolist()


def run_chain(tmp: Path, prefect_api: str) -> dict:
    """An uninterrupted run, then the chain of kills in a second folder; returns what each test checks."""
    from tests.conftest import write_binary_prompt

    teacher = FakeOpenAI(latency_s=0.0).start()
    try:
        (tmp / "uninterrupted").mkdir()
        cfg, _ = setup_run(tmp / "uninterrupted", teacher, write_binary_prompt(tmp / "uninterrupted"))
        proc, uninterrupted = distill_run(cfg, tmp / "uninterrupted", prefect_api)
        assert proc.returncode == 0, proc.stderr[-3000:]

        folder = tmp / "chain"
        folder.mkdir()
        cfg, raw = setup_run(folder, teacher, write_binary_prompt(folder))
        uri, name = raw["tracking"]["tracking_uri"], raw["tracking"]["model_name"]
        steps: list[dict] = []
        for i in range(len(POINTS) + 1):
            point = POINTS[i][0] if i < len(POINTS) else None
            asked_before = sum(teacher.delivered_ok.values())
            proc, summary = distill_run(cfg, folder, prefect_api, failpoint=point)
            steps.append(
                {
                    "point": point,
                    "returncode": proc.returncode,
                    "stderr_tail": proc.stderr[-3000:],
                    "reused": REUSED.findall(proc.stderr),
                    "asked": sum(teacher.delivered_ok.values()) - asked_before,
                    "summary": summary,
                    "registry": registry_at_kill(uri, name),
                }
            )
        final = steps[-1]
        final["champion_predicts"] = champion_predicts(uri, name) if final["returncode"] == 0 else None
    finally:
        teacher.stop()
    return {"uninterrupted": uninterrupted, "steps": steps}


@pytest.fixture(scope="session")
def chain(tmp_path_factory, prefect_api, worker_id) -> dict:
    """The chain, run once for the whole session even when its tests land on several xdist workers."""
    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # the session's folder, shared by its workers
    done = root / "stage_resume_chain.json"
    with FileLock(str(root / "stage_resume_chain.lock")):
        if not done.exists():
            done.write_text(json.dumps(run_chain(tmp_path_factory.mktemp("chain"), prefect_api)))
    return json.loads(done.read_text())


@pytest.mark.parametrize("point,reused", POINTS)
def test_kill_at_each_stage_then_rerun(point, reused, chain):
    i = [p for p, _ in POINTS].index(point)
    killed, rerun = chain["steps"][i], chain["steps"][i + 1]
    uninterrupted = chain["uninterrupted"]
    assert killed["returncode"] == -9, f"not killed at {point}: rc {killed['returncode']}\n{killed['stderr_tail']}"
    if point.startswith("register:"):
        # a version exists only complete: born with its gate decision; the champion alias is not yet moved
        for v in killed["registry"]["versions"]:
            assert v["gate_decision"] in ("promoted", "rejected") and v["candidate"], v
        assert killed["registry"]["champion"] is None
        assert len(killed["registry"]["versions"]) <= 1  # never a second version for the same candidate

    # the rerun (killed itself at the next point, except after the last) reused exactly the finished stages
    assert rerun["reused"] == reused, f"{point}: rerun reused {rerun['reused']}, expected {reused}"
    if point == "annotate:shard":  # the shard that finished is not asked again
        assert 0 < rerun["asked"] < uninterrupted["requests_sent"], rerun["asked"]
    else:  # the annotation is reused: the teacher is not asked again
        assert rerun["asked"] == 0, f"{point}: the rerun asked the teacher {rerun['asked']} times"

    if rerun["point"] is None:  # the last rerun completes: the figures of a run never interrupted
        s = rerun["summary"]
        assert rerun["returncode"] == 0, rerun["stderr_tail"]
        assert s["stages_reused"] == reused
        for k in SAME:
            assert s[k] == uninterrupted[k], f"{k} = {s[k]!r} after the kills, {uninterrupted[k]!r} uninterrupted"
        assert 0 < s["requests_sent"] < uninterrupted["requests_sent"]  # the annotation resumed after the first kill
        # one version, never two; the champion loads from the registry and predicts
        assert [v["gate_decision"] for v in rerun["registry"]["versions"]] == ["promoted"]
        assert rerun["registry"]["champion"] == "1"
        assert rerun["champion_predicts"] == ["positive", "negative"]
    else:
        assert rerun["returncode"] == -9, f"the rerun after {point} was not killed at {rerun['point']}"
