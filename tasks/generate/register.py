"""Register a generator student behind the gate: the champion is re-scored with the same metric on the same gold.

The gate's steps are tasks/registry/gate.py's; what is the generator's own is how the
champion is scored now (it writes the gold documents' texts, scored against the human
references by BERTScore F1 or ROUGE-L). A champion of another task type under the same
name is not comparable: refused with a message that names the model, rather than
compared on a metric it does not have.
"""

from __future__ import annotations

from typing import Optional

from tasks.registry.gate import ChampionNow, ModelSource, gated_registration
from tasks.results.stages import Registration


def champion_score(
    model_name: str, metric: str, documents: list[str], references: list[str]
) -> tuple[Optional[str], Optional[float]]:
    """The current champion generator (if any) re-scored on these documents with ``metric``."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from tasks.generate.metrics import bertscore, rouge

    try:
        v = mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None, None
    if (v.tags or {}).get("task", "classify") != "generate":
        raise ValueError(
            f"registered model {model_name!r}: its champion (version {v.version}) is a classifier; "
            f"give the generator its own tracking.model_name"
        )
    champ = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    preds = champ.predict(pd.DataFrame({"text": documents}))["text"].tolist()
    return str(v.version), bertscore(preds, references).f1 if metric == "bertscore_f1" else rouge(
        preds, references
    ).rougeL


def register_generator(
    model: ModelSource,
    *,
    model_name: str,
    score: float,
    metric: str,
    documents: list[str],
    references: list[str],
    floor: float,
    margin: float,
    run_id: str,
    candidate: Optional[str] = None,
) -> Registration:
    """Register a version, decide on ``metric`` against the champion re-scored now, move ``champion`` if earned."""
    import pandas as pd

    tags = {
        "task": "generate",
        "distill.score": f"{score:.6f}",
        f"gold_{metric}": f"{score:.6f}",
        "source_run_id": run_id,
    }
    return gated_registration(
        model,
        model_name,
        candidate=candidate,
        champion=lambda: ChampionNow(*champion_score(model_name, metric, documents, references)),
        floor=floor,
        margin=margin,
        metric=metric,
        tags=tags,
        probe=pd.DataFrame({"text": documents[:1] or ["an example"]}),
    )
