"""Registration and the quality gate, against a real MLflow sqlite store in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("mlflow")

from distill.config import GateConfig, StudentConfig  # noqa: E402
from tasks.classify.pyfunc import log_student_model  # noqa: E402
from tasks.classify.register import register_classifier  # noqa: E402
from tasks.classify.train import train_student  # noqa: E402
from tasks.registry.gate import decide  # noqa: E402
from tasks.registry.tracking import setup_tracking  # noqa: E402
from tasks.results.stages import Registration  # noqa: E402

LABELS = ["positive", "negative"]
POS = ["great fun", "loved it", "wonderful acting", "a joy", "brilliant film", "superb and moving"]
NEG = ["awful mess", "hated it", "terrible acting", "a bore", "dreadful film", "dull and pointless"]


def test_decide_rules():
    assert decide(0.5, None, 0.6, 0.0)[0] is False  # floor not met, even as the first model
    ok, why = decide(0.7, None, 0.6, 0.0)
    assert ok and "first model" in why
    assert decide(0.70, 0.75, 0.6, 0.0)[0] is False  # worse
    assert decide(0.75, 0.75, 0.6, 0.0)[0] is False  # equal keeps the champion
    assert decide(0.76, 0.75, 0.6, 0.02)[0] is False  # better but within the margin
    assert decide(0.78, 0.75, 0.6, 0.02)[0] is True


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("student")
    rows = [(t, ["positive"] * 3, "positive", 1.0) for t in POS] + [(t, ["negative"] * 3, "negative", 1.0) for t in NEG]
    p = tmp / "v.parquet"
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows * 3, columns=["text", "votes", "label", "confidence"])), p)
    cfg = StudentConfig(epochs=6, batch_size=8, learning_rate=3e-4, max_length=16, early_stopping_patience=20)
    return train_student(
        [str(p)], labels=LABELS, out_dir=str(tmp / "out"), student=cfg, min_agreement=0.6, show_progress=False
    ).model_dir


@pytest.mark.system
def test_gate_against_real_registry(tmp_path, student_dir, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    uri = setup_tracking(None, "gate-test")
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    texts = POS + NEG
    gold = ["positive"] * 6 + ["negative"] * 6
    gold[0], gold[6] = "negative", "positive"  # the model is right on 10 of 12: champion F1 = 10/12

    def new_version(f1: float, floor: float = 0.6, margin: float = 0.0) -> Registration:
        with mlflow.start_run() as run:
            info = log_student_model(student_dir, precision="fp32", max_length=16, example_texts=texts)
            return register_classifier(
                info.model_uri,
                model_name="m",
                score=f1,
                gold_texts=texts,
                gold_labels=gold,
                labels=LABELS,
                gate=GateConfig(min_macro_f1=floor, min_improvement=margin),
                run_id=run.info.run_id,
            )

    r = new_version(0.5)  # floor not met: registered, not champion
    assert r.promoted is False and "below the floor" in r.gate_reason
    r = new_version(0.84)  # first model to pass the floor
    assert r.promoted is True and r.previous_champion_version is None
    champ = r.model_version
    r = new_version(0.80)  # worse than the champion re-measured on this gold set (0.8333)
    assert r.promoted is False and r.previous_champion_score == pytest.approx(10 / 12)
    r = new_version(0.84, margin=0.05)  # better, but within the margin
    assert r.promoted is False
    r = new_version(0.90, margin=0.05)  # better by more than the margin
    assert r.promoted is True and r.previous_champion_version == champ

    client = mlflow.MlflowClient()
    v = client.get_model_version_by_alias("m", "champion")
    assert str(v.version) == r.model_version and v.tags["gate_decision"] == "promoted"
    assert str(client.get_model_version_by_alias("m", "challenger").version) == r.model_version
    rejected = client.get_model_version("m", "3")
    assert rejected.tags["gate_decision"] == "rejected" and "does not beat" in rejected.tags["gate_reason"]

    # the champion loads by alias and predicts labels from the configured set, with a score
    model = mlflow.pyfunc.load_model("models:/m@champion")
    out = model.predict(pd.DataFrame({"text": ["loved it", "a bore", "something else entirely"]}))
    assert list(out.columns) == ["label", "score"]
    assert set(out["label"]) <= set(LABELS) and out["label"].tolist()[:2] == ["positive", "negative"]
    assert ((out["score"] > 0) & (out["score"] <= 1)).all()

    # only what loading and predicting imports travels with the model, not the whole tasks/ folder
    from tasks.registry.model_code import CLASSIFIER_CODE

    local = mlflow.artifacts.download_artifacts("models:/m@champion")
    code = Path(local) / "code" / "tasks"
    shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*.py") if p.name != "__init__.py")
    assert shipped == sorted(CLASSIFIER_CODE)


class _Broken(__import__("mlflow").pyfunc.PythonModel):
    """A model whose files were logged but which cannot load (say, a missing dependency)."""

    def load_context(self, context):  # noqa: ANN001
        raise ImportError("no module named 'missing_dependency'")

    def predict(self, context: object, model_input: pd.DataFrame, params: object = None) -> pd.DataFrame:  # pyright: ignore[reportIncompatibleMethodOverride]
        return model_input


@pytest.mark.system
def test_champion_never_points_at_a_version_that_fails_to_load(tmp_path, student_dir, monkeypatch):
    import mlflow

    from tasks.registry.gate import ChampionNow, find_candidate, gated_registration

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_tracking(None, "load-check")
    texts, gold = POS + NEG, ["positive"] * 6 + ["negative"] * 6
    with mlflow.start_run() as run:
        good = log_student_model(student_dir, precision="fp32", max_length=16, example_texts=texts)
        r = register_classifier(
            good.model_uri,
            model_name="m",
            score=0.7,
            gold_texts=texts,
            gold_labels=gold,
            labels=LABELS,
            gate=GateConfig(min_macro_f1=0.6),
            run_id=run.info.run_id,
            candidate="good",
        )
        assert r.promoted is True
        broken = mlflow.pyfunc.log_model(name="broken", python_model=_Broken()).model_uri
    with pytest.raises(RuntimeError, match="failed to load from the registry.*champion stays version 1"):
        gated_registration(
            broken,
            "m",
            candidate="broken",
            champion=lambda: ChampionNow("1", 0.5),
            floor=0.6,
            margin=0.0,
            metric="macro-F1",
            tags={"distill.score": "0.99"},
            probe=pd.DataFrame({"text": texts[:2]}),
        )
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    v2 = find_candidate("m", "broken")
    assert v2.tags["gate_decision"] == "rejected" and "failed to load" in v2.tags["gate_reason"]
    # a rerun with the same trained student finds its version instead of registering another
    again = register_classifier(
        lambda: pytest.fail("logged twice"),
        model_name="m",
        score=0.7,
        gold_texts=texts,
        gold_labels=gold,
        labels=LABELS,
        gate=GateConfig(min_macro_f1=0.6),
        run_id="r",
        candidate="good",
    )
    assert again.model_version == "1" and again.promoted is True
    assert len(client.search_model_versions("name='m'")) == 2
