"""Preflight: every check that can refuse a run does so before any request is paid for, with one clear error."""

from __future__ import annotations

import pytest
import yaml

from distill.cli import main as cli_main
from distill.config import DistillConfig
from tasks.pipeline.preflight import PreflightError, check_outputs
from tests.conftest import free_port
from tests.fake_openai import FakeOpenAI
from tests.test_distill_flow import cfg_dict, write_data


def write_cfg(tmp_path, prompt, base_url, **changes):
    write_data(tmp_path, 16, 6)
    raw = cfg_dict(tmp_path, prompt, {"local": False, "base_url": base_url, "samples": 2})
    raw["client"].update({"max_attempts": 2, "backoff_base_s": 0.05, "timeout_s": 5})
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values) if isinstance(values, dict) else raw.__setitem__(section, values)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p, raw


def run_cli(cfg, tmp_path, capsys):
    rc = cli_main(["run", str(cfg), "--no-progress", "--summary-json", str(tmp_path / "s.json")])
    return rc, capsys.readouterr().err


def test_dead_teacher_fails_the_probe_and_nothing_else_is_sent(
    tmp_path, binary_prompt, prefect_api, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg, _ = write_cfg(tmp_path, binary_prompt, url)
    rc, err = run_cli(cfg, tmp_path, capsys)
    assert rc == 2 and "did not answer a probe request" in err and url in err and "no other request was sent" in err
    assert not (tmp_path / "runs" / "dag" / "annotations").exists()  # annotation never started


def test_teacher_answering_garbage_fails_the_probe(tmp_path, binary_prompt, prefect_api, monkeypatch, capsys):
    """Every probe attempt gets a 500: the probe names the status; the requests it made are in the ledger."""
    import sqlite3

    monkeypatch.chdir(tmp_path)
    srv = FakeOpenAI().start()
    try:
        write_data(tmp_path, 16, 6)
        import pandas as pd

        gold = pd.read_parquet(tmp_path / "gold.parquet")
        gold["text"] = "[dead] " + gold["text"]  # the probe asks about the first gold item
        gold.to_parquet(tmp_path / "gold.parquet")
        raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": srv.base_url, "samples": 2})
        raw["client"].update({"max_attempts": 2, "backoff_base_s": 0.05})
        raw["data"]["gold_teacher_limit"] = 6
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(raw))
        rc, err = run_cli(p, tmp_path, capsys)
    finally:
        srv.stop()
    assert rc == 2 and "did not answer a probe request" in err and "500" in err
    assert len(srv.received) == 4  # the probe's two requests, two attempts each: nothing else
    db = sqlite3.connect(tmp_path / "cache.sqlite")
    assert db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 4  # every attempt is in the ledger
    db.close()


def test_unreachable_tracking_store_refuses_before_any_request(
    tmp_path, binary_prompt, fake_teacher, prefect_api, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{free_port()}"
    cfg, _ = write_cfg(tmp_path, binary_prompt, fake_teacher.base_url, tracking={"tracking_uri": uri})
    rc, err = run_cli(cfg, tmp_path, capsys)
    assert rc == 2 and f"MLflow tracking store {uri} is not reachable or not writable" in err
    assert len(fake_teacher.received) == 0


def test_unwritable_run_folder_is_named(tmp_path, binary_prompt, fake_teacher, prefect_api, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocked").write_text("a file where the workdir should be")
    cfg, _ = write_cfg(tmp_path, binary_prompt, fake_teacher.base_url, workdir=str(tmp_path / "blocked" / "runs"))
    rc, err = run_cli(cfg, tmp_path, capsys)
    assert rc == 2 and str(tmp_path / "blocked" / "runs" / "dag") in err and "not writable" in err
    assert len(fake_teacher.received) == 0


def test_not_enough_disk_for_the_student(tmp_path, binary_prompt):
    cfg_path, raw = write_cfg(tmp_path, binary_prompt, "http://127.0.0.1:1/v1")
    cfg = DistillConfig(**yaml.safe_load(cfg_path.read_text()))
    with pytest.raises(
        PreflightError, match=r"not enough disk for the student in .*: about [\d,]+ MB needed .*, 0 MB free"
    ):
        check_outputs(cfg, free_bytes=1024)
    figures = check_outputs(cfg)
    assert figures.student_mb_needed is not None and figures.student_mb_needed > 100 and figures.disk_free_mb > 0


@pytest.mark.parametrize("case", ["misspelt hub id", "folder without a model", "missing folder"])
def test_a_student_base_that_cannot_load_stops_the_run_before_the_teacher(
    tmp_path, binary_prompt, fake_teacher, prefect_api, monkeypatch, capsys, case
):
    """Training comes after the teacher is paid: a student base that cannot load is found before the first request."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-model").mkdir()
    path = {
        "misspelt hub id": "sentence-transformers/all-MiniLM-L6-v2-misspelt",
        "folder without a model": str(tmp_path / "empty-model"),
        "missing folder": str(tmp_path / "models" / "nope"),
    }[case]
    cfg, _ = write_cfg(tmp_path, binary_prompt, fake_teacher.base_url, student={"model_path": path})
    rc, err = run_cli(cfg, tmp_path, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("distill: error:")]
    assert rc == 2 and len(lines) == 1 and "student.model_path" in lines[0] and path in lines[0], err
    assert "Nothing was sent to the teacher" in lines[0]
    if case == "misspelt hub id":  # the tests run offline, as this machine is: the line names the setting to change
        assert "HF_HUB_OFFLINE=0" in lines[0]
    assert len(fake_teacher.received) == 0
