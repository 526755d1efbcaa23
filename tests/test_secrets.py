"""A recognisable fake API key goes through a whole distill run, faults and retries included, and is found nowhere.

Where it must not be: the terminal and log output, MLflow params, tags, metrics and artifacts
(the sqlite store and the artifact folder), the response cache, the run folder (summaries,
annotations, plan), the summary JSON, and the Prefect database the run reported to.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")

from distill.cli import main as cli_main  # noqa: E402
from tests.test_distill_flow import cfg_dict, write_data  # noqa: E402

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

CANARY = "sk-distill-LEAK-CANARY-7f3a9c"


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _prefect_db() -> Path:
    from prefect.settings import get_current_settings

    url = str(get_current_settings().server.database.connection_url.get_secret_value())
    return Path(url.split(":///", 1)[1])


def test_the_key_is_used_and_appears_nowhere(
    tmp_path, fake_teacher, binary_prompt, prefect_api, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILL_CANARY_KEY", CANARY)
    write_data(tmp_path, 40, 16)
    import pandas as pd

    pool = pd.read_parquet(tmp_path / "pool.parquet")  # faults that make the client retry, log and give up
    pool.loc[0, "text"] = "[500] good film 0"
    pool.loc[1, "text"] = "[429] bad film 1"
    pool.loc[2, "text"] = "[dead] good film 2"
    pool.to_parquet(tmp_path / "pool.parquet")
    raw = cfg_dict(
        tmp_path,
        binary_prompt,
        {"local": False, "base_url": fake_teacher.base_url, "samples": 3, "api_key_env": "DISTILL_CANARY_KEY"},
    )
    raw["client"]["max_attempts"] = 3
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    caplog.set_level(logging.DEBUG)
    assert cli_main(["run", str(cfg), "--no-progress", "--summary-json", str(tmp_path / "s.json")]) == 0

    assert f"Bearer {CANARY}" in fake_teacher.auth_headers  # the key was really sent to the teacher
    import json

    ann = json.loads((tmp_path / "runs" / "dag" / "annotation_summary.json").read_text())
    assert ann["retries"] > 0 and ann["failed_votes"] >= 3  # the faults happened: retries, a dead item
    out = capsys.readouterr()
    assert CANARY not in out.out and CANARY not in out.err and CANARY not in caplog.text
    assert _files_holding(tmp_path, CANARY.encode()) == []  # mlflow.db, mlartifacts/, cache, runs/, s.json
    # the scans look where the run wrote: the env var's *name* is a logged parameter, in both stores
    assert any("mlflow.db" in f for f in _files_holding(tmp_path, b"DISTILL_CANARY_KEY"))
    db = _prefect_db()
    files = [p for p in db.parent.glob(db.name + "*") if p.is_file()]
    assert any(b"DISTILL_CANARY_KEY" in p.read_bytes() for p in files)
    assert [str(p) for p in files if CANARY.encode() in p.read_bytes()] == []
