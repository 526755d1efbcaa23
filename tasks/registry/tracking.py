"""Where MLflow keeps runs and registered models: the configured URI, else $MLFLOW_TRACKING_URI, else sqlite here.

Why one function: the flow, the batch job, the champion lookup of a selection and the
tests must all agree on one store; a sqlite store keeps its artifacts beside it
(``mlartifacts/``), so a run folder moved with its database keeps its models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def tracking_uri(configured: Optional[str]) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_tracking(configured_uri: Optional[str], experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists (artifacts beside a sqlite store)."""
    import mlflow

    uri = tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        loc = None
        if uri.startswith("sqlite:///"):
            loc = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=loc)
    mlflow.set_experiment(experiment)
    return uri
