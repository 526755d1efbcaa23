"""The generate task end to end: real local teacher, medoid, LoRA student, BERTScore gate, champion by alias."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

pytest.importorskip("peft")

SUMMARY_KEYS = {
    "teacher_bertscore_f1_single",
    "teacher_bertscore_f1_medoid",
    "student_bertscore_f1",
    "teacher_rougeL_medoid",
    "student_rougeL",
    "teacher_items_per_s",
    "student_items_per_s",
    "promoted",
    "teacher_usd",
    "teacher_kwh",
    "student_train_kwh",
    "student_usd_per_1m",
    "teacher_usd_per_1m",
    "cost_ratio_per_1m",
    "co2_ratio_per_1m",
}


@pytest.mark.slow
def test_generate_run_on_the_real_local_teacher_registers_a_generator_that_loads_by_alias(
    tmp_path, prefect_api, monkeypatch
):
    """A handful of XSum articles through llama.cpp + SmolLM2 (k=2 distinct prompts), a few LoRA steps, MLflow."""
    import mlflow

    from distill.config import load_config
    from flows.distillation import distill_flow
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)  # the student base is converted once into REPO/.distill/models and reused
    cfg = load_config(
        REPO / "configs/summaries.yaml",
        [
            f"workdir={tmp_path / 'runs'}",
            "data.pool_limit=6",
            "data.gold_teacher_limit=3",
            "teacher.samples=2",
            "teacher.max_tokens=40",
            f"client.cache_path={tmp_path / 'cache.sqlite'}",
            "client.timeout_s=600",  # beside other tests on 2 cores an answer can take minutes: not a retry
            "student.max_steps=3",
            "student.batch_size=2",
            "student.max_new_tokens=12",
            "student.eval_batch_size=3",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.model_name=gen-student",
            "energy.measure=false",
        ],
    )
    s = distill_flow(cfg, show_progress=False)
    assert SUMMARY_KEYS <= set(s), SUMMARY_KEYS - set(s)
    # 6 pool + 3 gold items x 2 distinct prompts, nothing sent twice
    assert s["requests_sent"] + s["requests_deduplicated"] == (6 + 3) * 2 and s["items"] == 6
    assert s["student_items_scored"] == 3 and s["gold_items_scored"] == 3
    assert 0.0 < s["teacher_bertscore_f1_medoid"] <= 1.0 and 0.0 <= s["student_bertscore_f1"] <= 1.0
    assert s["promoted"] is True and s["gate_metric"] == "bertscore_f1"
    votes = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "runs/summaries/votes/pool").glob("*.parquet")))
    assert len(votes) == 6 and (votes["label"].notna() | votes["abstain_reason"].notna()).all()
    assert json.loads((tmp_path / "runs/summaries/distill_summary.json").read_text())["task"] == "generate"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/gen-student@champion")
    out = model.predict(pd.DataFrame({"text": ["The council approved a new bridge over the river on Monday."]}))
    assert list(out.columns) == ["text", "finish_reason"] and isinstance(out["text"].iloc[0], str)
    assert out["finish_reason"].iloc[0] in {"stop", "length"}
    mv = mlflow.MlflowClient().get_model_version_by_alias("gen-student", "champion")
    assert mv.tags["task"] == "generate"
    from tasks.registry.model_code import GENERATOR_CODE

    code = Path(mlflow.artifacts.download_artifacts("models:/gen-student@champion")) / "code" / "tasks"
    shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*.py") if p.name != "__init__.py")
    assert shipped == sorted(GENERATOR_CODE)
    # distill predict runs the champion generator over a file, every row kept
    from distill.cli import main as cli_main

    src = tmp_path / "articles.csv"
    pd.DataFrame(
        {"id": ["a1", "a2"], "text": ["The council approved a new bridge.", "A driver crashed into a wall."]}
    ).to_csv(src, index=False)
    dst = tmp_path / "summaries.parquet"
    assert (
        cli_main(
            [
                "predict",
                str(src),
                "--model",
                "models:/gen-student@champion",
                "--output",
                str(dst),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
            ]
        )
        == 0
    )
    got = pd.read_parquet(dst)
    assert got["id"].tolist() == ["a1", "a2"] and {"text", "finish_reason"} <= set(got.columns)
