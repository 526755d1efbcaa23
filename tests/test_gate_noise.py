"""The gate does not promote noise: a paired bootstrap of challenger minus champion on the same gold items.

Students here are small scikit-learn text classifiers (hashed words, logistic regression)
trained on the bundled movie reviews' pool labels, wrapped as MLflow pyfunc models that
answer like distill's student (a ``label`` column): the gate, the real registry and the
statistics are what is under test, and they take seconds instead of minutes of MiniLM.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from distill.config import GateConfig
from tasks.registry.gate import decide
from tasks.registry.paired import paired_macro_f1, paired_mean, resample_weights, weighted_macro_f1
from tasks.results.registry import PairedInterval
from tests.conftest import REPO

LABELS = ["negative", "positive"]


def test_weighted_macro_f1_is_sklearns_on_every_resample():
    rng = np.random.default_rng(0)
    labs = ["a", "b", "c"]
    gold = list(rng.choice(labs, 300))
    pred = [g if rng.random() < 0.7 else str(rng.choice(labs)) for g in gold]
    w = resample_weights(300, 5)
    mine = weighted_macro_f1(w, gold, pred, labs)
    for b in range(5):
        idx = np.repeat(np.arange(300), w[b].astype(int))
        theirs = f1_score(np.array(gold)[idx], np.array(pred)[idx], labels=labs, average="macro", zero_division=0)
        assert mine[b] == pytest.approx(theirs)


def test_interval_of_a_model_against_itself_is_zero_and_a_real_gain_clears_it():
    rng = np.random.default_rng(1)
    gold = list(rng.choice(LABELS, 500))
    weak = [g if rng.random() < 0.70 else ("positive" if g == "negative" else "negative") for g in gold]
    strong = [g if rng.random() < 0.90 else ("positive" if g == "negative" else "negative") for g in gold]
    same = paired_macro_f1(gold, weak, weak, LABELS, confidence=0.95, resamples=1000)
    assert same.diff == same.low == same.high == 0
    gain = paired_macro_f1(gold, strong, weak, LABELS, confidence=0.95, resamples=1000)
    assert gain.low > 0.1 and gain.low < gain.diff < gain.high
    assert paired_macro_f1(gold, strong, weak, LABELS, confidence=0.95, resamples=1000) == gain  # seeded


def test_decide_on_the_interval():
    noisy = PairedInterval(0.02, -0.01, 0.05, 0.95, 2000)
    real = PairedInterval(0.06, 0.03, 0.09, 0.95, 2000)
    assert decide(0.80, 0.78, 0.6, 0.0, interval=noisy)[0] is False  # a higher point estimate, within noise
    ok, why = decide(0.84, 0.78, 0.6, 0.0, interval=real)
    assert ok and "95% CI +0.0300 .. +0.0900" in why
    assert decide(0.84, 0.78, 0.6, 0.05, interval=real)[0] is False  # the lower end is below the margin
    assert decide(0.80, 0.78, 0.6, 0.0)[0] is True  # without an interval: the point estimates, as before


class _SkStudent(__import__("mlflow").pyfunc.PythonModel):
    """A trained scikit-learn pipeline answering like distill's student: a DataFrame with a ``label`` column."""

    def __init__(self, pipe: object) -> None:
        self.pipe = pipe

    def predict(self, context: object, model_input: pd.DataFrame, params: object = None) -> pd.DataFrame:  # pyright: ignore[reportIncompatibleMethodOverride]
        return pd.DataFrame({"label": self.pipe.predict(model_input["text"].tolist())})  # type: ignore[attr-defined]


def _student(texts: list[str], labels: list[str], seed: int) -> object:
    """A student that depends on its seed the way a fine-tuned one does: which items it saw, in which order."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(texts))[: int(0.9 * len(texts))]  # its own validation split left out
    pipe = make_pipeline(
        HashingVectorizer(n_features=2**16, alternate_sign=False),
        SGDClassifier(loss="log_loss", random_state=seed, max_iter=20, tol=None),
    )
    return pipe.fit([texts[i] for i in keep], [labels[i] for i in keep])


@pytest.mark.system
def test_seeds_do_not_flip_the_champion_and_a_clearly_better_student_is_promoted(tmp_path, monkeypatch):
    import mlflow

    from tasks.classify.register import register_classifier
    from tasks.registry.tracking import setup_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_tracking(None, "gate-noise")
    pool = pd.read_parquet(REPO / "data/movie/pool.parquet").merge(
        pd.read_parquet(REPO / "data/movie/pool_labels.parquet"), on="id"
    )
    gold = pd.read_parquet(REPO / "data/movie/gold.parquet")
    texts, labels = pool["text"].tolist(), pool["label"].tolist()
    gate = GateConfig(min_macro_f1=0.5)  # the defaults otherwise: 95%, 2,000 resamples, min_improvement 0

    def night(n_labels: int, seed: int):  # one nightly run: train, score on gold, let the gate decide
        pipe = _student(texts[:n_labels], labels[:n_labels], seed)
        pred = [str(p) for p in pipe.predict(gold["text"].tolist())]  # type: ignore[attr-defined]
        score = float(f1_score(gold["label"], pred, labels=LABELS, average="macro", zero_division=0))
        with mlflow.start_run() as run:
            uri = mlflow.pyfunc.log_model(name="student", python_model=_SkStudent(pipe), pip_requirements=[]).model_uri
            return score, register_classifier(
                uri,
                model_name="nightly",
                score=score,
                gold_texts=gold["text"].tolist(),
                gold_labels=gold["label"].tolist(),
                labels=LABELS,
                gate=gate,
                challenger_pred=pred,
                run_id=run.info.run_id,
            )

    first_score, first = night(150, seed=1)
    assert first.promoted is True
    scores = [first_score]
    for seed in (2, 3, 4):  # the same 150 labels, other seeds: three more nights
        score, r = night(150, seed=seed)
        scores.append(score)
        assert r.improvement_interval is not None
        assert r.promoted is False, f"seed {seed}: {r.gate_reason}"  # noise, not an improvement
        assert "within noise" in r.gate_reason
    assert max(scores) > min(scores)  # the seeds did move the point estimate: a point-estimate gate would flip
    better_score, better = night(600, seed=2)  # 4x the labels
    assert better.promoted is True, better.gate_reason
    assert better.improvement_interval is not None and better.improvement_interval.low > 0
    client = mlflow.MlflowClient()
    v = client.get_model_version_by_alias("nightly", "champion")
    assert str(v.version) == better.model_version and float(v.tags["gate_improvement_ci_low"]) > 0


def test_paired_mean_of_per_item_scores():
    rng = np.random.default_rng(2)
    base = list(rng.uniform(0.2, 0.6, 400))
    same = paired_mean(base, base, confidence=0.95, resamples=1000)
    assert same.diff == same.low == same.high == 0
    noisy = [b + rng.normal(0, 0.1) for b in base]  # no systematic gain: the interval straddles zero
    n = paired_mean(noisy, base, confidence=0.95, resamples=1000)
    assert n.low < 0 < n.high
    gain = paired_mean([b + 0.05 for b in noisy], base, confidence=0.95, resamples=1000)
    assert gain.low > 0.02 and gain.low < gain.diff < gain.high
    with pytest.raises(ValueError, match="one score per gold item"):
        paired_mean([0.1], [0.1, 0.2], confidence=0.95, resamples=10)


class _Writer(__import__("mlflow").pyfunc.PythonModel):
    """A 'generator' that answers like distill's (``text``, ``finish_reason``): the first ``n`` words of each text."""

    def __init__(self, n: int) -> None:
        self.n = n

    def predict(self, context: object, model_input: pd.DataFrame, params: object = None) -> pd.DataFrame:  # pyright: ignore[reportIncompatibleMethodOverride]
        out = [" ".join(t.split()[: self.n]) for t in model_input["text"]]
        return pd.DataFrame({"text": out, "finish_reason": ["stop"] * len(out)})


@pytest.mark.system
def test_generator_gate_decides_on_the_paired_interval(tmp_path, monkeypatch):
    """The generator's gate re-scores the champion per item and pairs it with the challenger's scores."""
    import mlflow

    from tasks.generate.register import per_item_scores, register_generator
    from tasks.registry.tracking import setup_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup_tracking(None, "gate-noise-gen")
    gold = pd.read_parquet(REPO / "data/movie/gold.parquet")["text"].tolist()[:120]
    docs = [f"{t} {t}" for t in gold]
    refs = [" ".join(t.split()[:12]) for t in gold]  # the reference: the first 12 words
    gate = GateConfig()

    def night(n_words: int):
        writer = _Writer(n_words)
        scores = per_item_scores("rougeL", writer.predict(None, pd.DataFrame({"text": docs}))["text"].tolist(), refs)
        with mlflow.start_run() as run:
            uri = mlflow.pyfunc.log_model(name="gen", python_model=writer, pip_requirements=[]).model_uri
            return register_generator(
                uri,
                model_name="gen-nightly",
                score=sum(scores) / len(scores),
                metric="rougeL",
                documents=docs,
                references=refs,
                gate=gate,
                challenger_scores=scores,
                run_id=run.info.run_id,
            )

    assert night(6).promoted is True  # the first model
    same = night(6)  # the same writer again: exactly the champion's scores
    assert same.promoted is False and same.improvement_interval is not None
    assert same.improvement_interval.diff == 0 and "within noise" in same.gate_reason
    better = night(12)  # writes the references exactly
    assert better.promoted is True and better.improvement_interval is not None
    assert better.improvement_interval.low > 0.1
    v = mlflow.MlflowClient().get_model_version_by_alias("gen-nightly", "champion")
    assert str(v.version) == better.model_version and float(v.tags["gate_improvement_ci_low"]) > 0.1
