"""Register a classifier student behind the gate: the champion is re-measured by its macro-F1 on the same gold.

The gate's steps (decide, log, create the version with its decision, move the aliases,
idempotent on rerun) are tasks/registry/gate.py's; what is the classifier's own is how
the champion is scored now (loaded by alias, predicting the gold texts) and the tags.
"""

from __future__ import annotations

from typing import Optional

from tasks.classify.evaluate import ZERO
from tasks.registry.gate import ModelSource, gated_registration
from tasks.results.stages import Registration

GATE_METRIC = "macro-F1"


def champion_macro_f1(
    model_name: str, gold_texts: list[str], gold_labels: list[str], labels: list[str]
) -> tuple[Optional[str], Optional[float]]:
    """Re-measure the current champion (if any) on this gold set."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from sklearn.metrics import f1_score

    client = mlflow.MlflowClient()
    try:
        v = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None, None
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    pred = model.predict(pd.DataFrame({"text": gold_texts}))["label"].tolist()
    return str(v.version), float(f1_score(gold_labels, pred, labels=labels, average="macro", **ZERO))


def register_classifier(
    model: ModelSource,
    *,
    model_name: str,
    score: float,
    gold_texts: list[str],
    gold_labels: list[str],
    labels: list[str],
    floor: float,
    margin: float,
    run_id: str,
    candidate: Optional[str] = None,
) -> Registration:
    """Register a version (alias challenger), decide on gold macro-F1, and move ``champion`` only if it earned it."""
    import pandas as pd

    tags = {"distill.score": f"{score:.6f}", "gold_macro_f1": f"{score:.6f}", "source_run_id": run_id}
    return gated_registration(
        model,
        model_name,
        candidate=candidate,
        champion=lambda: champion_macro_f1(model_name, gold_texts, gold_labels, labels),
        floor=floor,
        margin=margin,
        metric=GATE_METRIC,
        tags=tags,
        probe=pd.DataFrame({"text": gold_texts[:2] or ["an example"]}),
    )
