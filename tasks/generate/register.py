"""Register a generator student behind the gate: the champion is re-scored with the same metric on the same gold.

The gate's steps are tasks/registry/gate.py's; what is the generator's own is how the
champion is scored now (it writes the gold documents' texts, scored against the human
references by BERTScore F1 or ROUGE-L). A champion of another task type under the same
name is not comparable: refused with a message that names the model, rather than
compared on a metric it does not have.
"""

from __future__ import annotations

from typing import Optional

from distill.config import GateConfig
from tasks.registry.gate import ChampionNow, ModelSource, gated_registration
from tasks.registry.paired import paired_mean
from tasks.results.stages import Registration


def per_item_scores(metric: str, preds: list[str], references: list[str]) -> list[float]:
    """The gate metric per gold item: BERTScore F1 or ROUGE-L F-measure (their mean is the run's figure)."""
    from tasks.generate.metrics import bertscore, rouge

    if metric == "bertscore_f1":
        return bertscore(preds, references).per_item_f1
    return rouge(preds, references).per_item_rougeL


def champion_now(
    model_name: str,
    *,
    metric: str,
    documents: list[str],
    references: list[str],
    challenger_scores: Optional[list[float]],
    gate: GateConfig,
) -> ChampionNow:
    """The current champion generator (if any) re-scored on these documents, paired with the challenger's scores."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        v = mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return ChampionNow()
    if (v.tags or {}).get("task", "classify") != "generate":
        raise ValueError(
            f"registered model {model_name!r}: its champion (version {v.version}) is a classifier; "
            f"give the generator its own tracking.model_name"
        )
    champ = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    preds = champ.predict(pd.DataFrame({"text": documents}))["text"].tolist()
    scores = per_item_scores(metric, preds, references)
    interval = None
    if challenger_scores is not None and gate.bootstrap_resamples > 0:
        interval = paired_mean(
            challenger_scores, scores, confidence=gate.confidence, resamples=gate.bootstrap_resamples
        )
    return ChampionNow(str(v.version), sum(scores) / len(scores) if scores else None, interval)


def register_generator(
    model: ModelSource,
    *,
    model_name: str,
    score: float,
    metric: str,
    documents: list[str],
    references: list[str],
    gate: GateConfig,
    challenger_scores: Optional[list[float]] = None,
    run_id: str,
    candidate: Optional[str] = None,
) -> Registration:
    """Register a version, decide on ``metric`` against the champion re-scored now, move ``champion`` if earned.

    With the challenger's per-item scores on the same documents (and ``gate.bootstrap_resamples``
    above 0) the decision is on the paired bootstrap interval of the improvement, as for a
    classifier; the floor is ``gate.min_score``.
    """
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
        champion=lambda: champion_now(
            model_name,
            metric=metric,
            documents=documents,
            references=references,
            challenger_scores=challenger_scores,
            gate=gate,
        ),
        floor=gate.min_score,
        margin=gate.min_improvement,
        metric=metric,
        tags=tags,
        probe=pd.DataFrame({"text": documents[:1] or ["an example"]}),
    )
