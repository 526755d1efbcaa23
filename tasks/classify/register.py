"""Register a classifier student behind the gate: the champion is re-measured by its macro-F1 on the same gold.

The gate's steps (decide, log, create the version with its decision, move the aliases,
idempotent on rerun) are tasks/registry/gate.py's; what is the classifier's own is how
the champion is scored now (loaded by alias, predicting the gold texts) and the tags.
"""

from __future__ import annotations

from typing import Optional

from distill.config import GateConfig
from tasks.classify.evaluate import ZERO
from tasks.registry.gate import ChampionNow, ModelSource, gated_registration
from tasks.registry.paired import paired_macro_f1
from tasks.results.stages import Registration

GATE_METRIC = "macro-F1"


def champion_now(
    model_name: str,
    *,
    gold_texts: list[str],
    gold_labels: list[str],
    labels: list[str],
    challenger_pred: Optional[list[str]],
    gate: GateConfig,
) -> ChampionNow:
    """Re-measure the current champion (if any) on this gold set, paired with the challenger's predictions there."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from sklearn.metrics import f1_score

    client = mlflow.MlflowClient()
    try:
        v = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return ChampionNow()
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    pred = [str(p) for p in model.predict(pd.DataFrame({"text": gold_texts}))["label"].tolist()]
    score = float(f1_score(gold_labels, pred, labels=labels, average="macro", **ZERO))
    interval = None
    if challenger_pred is not None and gate.bootstrap_resamples > 0:
        interval = paired_macro_f1(
            gold_labels,
            challenger_pred,
            pred,
            labels,
            confidence=gate.confidence,
            resamples=gate.bootstrap_resamples,
        )
    return ChampionNow(str(v.version), score, interval)


def register_classifier(
    model: ModelSource,
    *,
    model_name: str,
    score: float,
    gold_texts: list[str],
    gold_labels: list[str],
    labels: list[str],
    gate: GateConfig,
    challenger_pred: Optional[list[str]] = None,
    run_id: str,
    candidate: Optional[str] = None,
) -> Registration:
    """Register a version (alias challenger), decide on gold macro-F1, and move ``champion`` only if it earned it.

    With the challenger's predictions on the same gold items (and ``gate.bootstrap_resamples``
    above 0), the decision is on the paired bootstrap interval of the improvement, not on
    the two point estimates.
    """
    import pandas as pd

    tags = {"distill.score": f"{score:.6f}", "gold_macro_f1": f"{score:.6f}", "source_run_id": run_id}
    return gated_registration(
        model,
        model_name,
        candidate=candidate,
        champion=lambda: champion_now(
            model_name,
            gold_texts=gold_texts,
            gold_labels=gold_labels,
            labels=labels,
            challenger_pred=challenger_pred,
            gate=gate,
        ),
        floor=gate.min_macro_f1,
        margin=gate.min_improvement,
        metric=GATE_METRIC,
        tags=tags,
        probe=pd.DataFrame({"text": gold_texts[:2] or ["an example"]}),
    )
