"""The whole DAG: annotate -> vote -> train -> evaluate -> register, through Prefect and MLflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("mlflow")

from distill.cli import main as cli_main  # noqa: E402
from distill.config import config_from_dict  # noqa: E402
from tests.fake_openai import FAKE_PRICES

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

REPO_TESTS = Path(__file__).parent
KEYS = {
    "teacher_accuracy_single",
    "teacher_accuracy_voted",
    "teacher_macro_f1_voted",
    "student_accuracy",
    "student_macro_f1",
    "student_items_per_s",
    "teacher_items_per_s",
    "speed_ratio",
    "promoted",
    "model_name",
    "model_version",
    "mlflow_run_id",
}
POS = ["good fun", "good acting", "good story", "good cast", "good film", "good music", "good ending", "good pace"]
NEG = ["bad fun", "bad acting", "bad story", "bad cast", "bad film", "bad music", "bad ending", "bad pace"]


def write_data(tmp_path, n_pool: int, n_gold: int):
    pool = [(f"p{i}", (POS if i % 2 else NEG)[i % 8] + f" {i}") for i in range(n_pool)]
    pd.DataFrame(pool, columns=["id", "text"]).to_parquet(tmp_path / "pool.parquet")
    gold = [
        (f"g{i}", (POS if i % 2 else NEG)[i % 8] + f" gold {i}", "positive" if i % 2 else "negative")
        for i in range(n_gold)
    ]
    pd.DataFrame(gold, columns=["id", "text", "label"]).to_parquet(tmp_path / "gold.parquet")


def cfg_dict(tmp_path, prompt, teacher, measure_energy: bool = False) -> dict:
    """A small run on the fake teacher; codecarbon off unless the test is about energy (it costs seconds a stage)."""
    return {
        "run_name": "dag",
        "workdir": str(tmp_path / "runs"),
        "prompt": str(prompt),
        "data": {
            "pool_path": str(tmp_path / "pool.parquet"),
            "gold_path": str(tmp_path / "gold.parquet"),
            "gold_teacher_limit": 10,
        },
        "teacher": teacher,
        "client": {"cache_path": str(tmp_path / "cache.sqlite"), "concurrency": 2},
        "student": {
            "epochs": 8,
            "batch_size": 8,
            "max_length": 16,
            "learning_rate": 3e-4,
            "early_stopping_patience": 20,
            "eval_batch_size": 16,
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "model_name": "dag-student"},
        "gate": {"min_macro_f1": 0.5},
        "pricing": FAKE_PRICES,
        "energy": {"measure": measure_energy},
    }


def check_model_card(s: dict, run_dir: Path, prompt_path: str) -> None:
    """The version's model card: its sections, every figure equal to the summary's, the prompt registered and linked."""
    import mlflow

    from tasks.registry.model_card import fmt

    card = (run_dir / "model_card.md").read_text()
    for section in (
        "## Task and labels",
        "## Teacher",
        "## Data",
        "## Gold figures",
        "## Per class",
        "## Calibration",
        "## Cost and CO2",
        "## Gate",
        "## Provenance",
    ):
        assert section in card, section
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", card, flags=re.M))
    for k in ("teacher_macro_f1_voted", "student_macro_f1", "student_ece", "teacher_usd", "cost_ratio_per_1m", "items"):
        assert rows[k] == fmt(s[k]), k
    assert len(rows) >= 15 and all(rows[k] == fmt(s[k]) for k in rows)  # no figure of its own
    assert s["gate_reason"] in card and s["teacher_usd_per_1m_method"] in card
    assert Path(prompt_path).read_text().strip() in card  # the prompt's text
    assert "positive" in card.split("## Teacher")[0]  # the labels
    assert re.search(r"digest of `gold` \(MLflow dataset\): `\w+`", card)
    assert "api_key" not in card.lower() or "api_key_env" in card.lower()  # names of variables only, no key
    client = mlflow.MlflowClient()
    v = client.get_model_version(s["model_name"], s["model_version"])
    # the description is the card without the prompt's text and the config (MLflow's SQL stores keep 5,000 characters)
    d = v.description
    assert len(d) <= 5000 and d.split("\n")[0] == card.split("\n")[0] and "## Gold figures" in d and "## Gate" in d
    assert dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", d, flags=re.M)) == rows
    assert "model_card.md" in d and v.tags["model_card"] == "model_card.md"
    assert v.tags["prompt_uri"] == "prompts:/dag-student-prompt/1"
    prompt = mlflow.genai.load_prompt(v.tags["prompt_uri"])
    assert prompt.template == Path(prompt_path).read_text()
    logged = mlflow.artifacts.load_text(f"runs:/{s['mlflow_run_id']}/model_card.md")
    assert logged == card


def test_whole_dag_on_fake_teacher(tmp_path, fake_teacher, binary_prompt, prefect_api, monkeypatch, capsys):
    import mlflow
    import yaml

    monkeypatch.chdir(tmp_path)
    write_data(tmp_path, 64, 24)
    raw = cfg_dict(
        tmp_path, binary_prompt, {"local": False, "base_url": fake_teacher.base_url, "samples": 3}, measure_energy=True
    )
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    out = tmp_path / "s.json"
    assert cli_main(["run", str(p), "--no-progress", "--summary-json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert KEYS <= set(s)
    # the --summary-json keys are an interface (scripts read them): pinned, so a refactor cannot drop or rename one
    pinned = set(json.loads((REPO_TESTS / "summary_keys.json").read_text()))
    assert not pinned - set(s), f"summary keys gone: {sorted(pinned - set(s))}"
    assert not set(s) - pinned, f"new summary keys: add them to tests/summary_keys.json: {sorted(set(s) - pinned)}"
    assert s["student_accuracy"] >= 0.9 and s["promoted"] is True and s["model_version"] == "1"
    # the fake teacher answers at once, so its speed says nothing: only that the ratio is computed from both
    assert s["speed_ratio"] == pytest.approx(s["student_items_per_s"] / s["teacher_items_per_s"])
    printed = capsys.readouterr().out
    assert "teacher, mean probability (k=3)" in printed and "PROMOTED" in printed and "| ECE |" in printed
    assert "Teacher labels: mean_probability over k=3" in printed and "class balance 'logit_adjust'" in printed
    # calibration of teacher and student on gold, from the teacher's log-probabilities
    assert 0 <= s["teacher_ece"] <= 1 and 0 <= s["student_ece"] <= 1 and s["probability_source"] == "logprobs"
    assert s["aggregation"] == "mean_probability" and s["class_balance"] == "logit_adjust" and s["val_macro_f1"] > 0.5
    assert "per 1M items" in printed and "teacher / student" in printed
    for k in (
        "teacher_usd",
        "teacher_kwh",
        "teacher_gco2",
        "student_train_kwh",
        "student_usd_per_1m",
        "teacher_usd_per_1m",
        "cost_ratio_per_1m",
        "co2_ratio_per_1m",
    ):
        assert isinstance(s[k], float) and s[k] > 0, k
        assert s[f"{k}_method"], k
    assert s["teacher_kwh_method"].startswith("estimated")  # a remote teacher's energy is estimated
    assert s["student_train_kwh_method"].startswith("estimated by codecarbon")
    assert s["teacher_usd"] == pytest.approx((fake_teacher.tokens_in * 1.0 + fake_teacher.tokens_out * 2.0) / 1e6)

    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    run = mlflow.get_run(s["mlflow_run_id"])
    assert run.data.tags["prefect.flow_run_id"] and run.data.params["teacher.samples"] == "3"
    assert "student_macro_f1" in run.data.metrics
    assert run.data.metrics["cost_ratio_per_1m"] == pytest.approx(s["cost_ratio_per_1m"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(s["mlflow_run_id"], "plots")}
    assert {
        "plots/confusion_student.png",
        "plots/teacher_coverage.png",
        "plots/cost_per_1m.png",
        "plots/reliability.png",
    } <= arts
    assert run.data.metrics["teacher_ece"] == pytest.approx(s["teacher_ece"])
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}'")
    assert set(children["tags.mlflow.runName"]) == {"annotate", "train", "evaluate"}
    ann_run = children[children["tags.mlflow.runName"] == "annotate"]["run_id"].iloc[0]
    lineage = {d.dataset.name for d in mlflow.get_run(ann_run).inputs.dataset_inputs}
    assert lineage == {"gold", "pool-votes"}
    check_model_card(s, tmp_path / "runs" / raw["run_name"], binary_prompt)

    # the same run again finds every stage finished with the same inputs: nothing recomputed, nothing registered twice
    assert cli_main(["run", str(p), "--no-progress", "--summary-json", str(out)]) == 0
    s1 = json.loads(out.read_text())
    assert s1["stages_reused"] == ["annotate", "aggregate", "train", "evaluate"] and s1["model_version"] == "1"
    assert s1["student_macro_f1"] == s["student_macro_f1"] and s1["requests_sent"] == s["requests_sent"]
    # --fresh retrains (the same student, from the cached answers): equal macro-F1 keeps the champion (version 1)
    assert cli_main(["run", str(p), "--no-progress", "--fresh", "--summary-json", str(out)]) == 0
    s2 = json.loads(out.read_text())
    assert s2["stages_reused"] == [] and s2["promoted"] is False and s2["model_version"] == "2"
    # version 2 has its own card (not promoted, with the gate's interval) and the same prompt version: unchanged text
    v2 = mlflow.MlflowClient().get_model_version("dag-student", "2")
    assert "not promoted" in v2.description and "`gate_improvement_ci_low`" in v2.description
    assert v2.tags["prompt_uri"] == "prompts:/dag-student-prompt/1"
    assert str(mlflow.MlflowClient().get_model_version_by_alias("dag-student", "champion").version) == "1"

    # predict a file with the champion, the way a user would
    texts = tmp_path / "new.csv"
    pd.DataFrame({"id": ["a", "b"], "text": ["good story here", "bad acting here"]}).to_csv(texts, index=False)
    assert (
        cli_main(
            [
                "predict",
                "--model",
                "models:/dag-student@champion",
                str(texts),
                "--tracking-uri",
                raw["tracking"]["tracking_uri"],
                "--output",
                str(tmp_path / "pred.csv"),
            ]
        )
        == 0
    )
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert pred["label"].tolist() == ["positive", "negative"] and pred["score"].between(0, 1).all()


@pytest.mark.slow
def test_whole_dag_on_the_real_local_teacher(tmp_path, prefect_api, monkeypatch):
    """About 40 items through llama.cpp + SmolLM2, MiniLM training, MLflow registry and the gate."""
    import mlflow

    from flows.distillation import distill_flow
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    pos = [
        "An absolute triumph, moving and funny.",
        "One of the best films of the year.",
        "Gorgeous photography and a wonderful cast.",
        "A warm, witty and beautifully made story.",
    ]
    neg = [
        "A tedious, badly acted mess.",
        "I walked out after twenty minutes of boredom.",
        "The plot is stupid and the jokes fall flat.",
        "Dull, ugly and far too long.",
    ]
    pool = [(f"p{i}", (pos if i % 2 else neg)[i % 4] + f" ({i})") for i in range(30)]
    pd.DataFrame(pool, columns=["id", "text"]).to_parquet(tmp_path / "pool.parquet")
    gold = [(f"g{i}", (pos if i % 2 else neg)[(i + 1) % 4], "positive" if i % 2 else "negative") for i in range(10)]
    pd.DataFrame(gold, columns=["id", "text", "label"]).to_parquet(tmp_path / "gold.parquet")
    raw = cfg_dict(tmp_path, REPO / "prompts/sentiment_binary.yaml", {"local": True, "samples": 3, "max_tokens": 3})
    raw["student"].update({"epochs": 6, "max_length": 32})
    raw["gate"]["min_macro_f1"] = 0.0
    s = distill_flow(config_from_dict(raw), show_progress=False)
    # the gold set repeats 4 texts over 10 rows: a repeat is answered by its twin's request, and counted
    assert s["requests_sent"] == (30 + 4) * 3 and s["requests_deduplicated"] == 6 * 3 and s["items"] == 30
    assert KEYS <= set(s) and s["promoted"] is True
    assert 0.0 <= s["student_accuracy"] <= 1.0 and s["teacher_items_per_s"] > 0
    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/dag-student@champion")
    out = model.predict(pd.DataFrame({"text": ["What a wonderful film.", "A boring mess."]}))
    assert set(out["label"]) <= {"positive", "negative"}
