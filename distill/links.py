"""Links between a Prefect flow run and the MLflow run it produced, both ways.

Why: a user looking at a failed nightly run in the Prefect UI wants the metrics and the
model it logged, and one looking at a champion in MLflow wants the run that made it and
its logs. The MLflow run carries the Prefect flow run's id, name and UI address as tags;
the Prefect flow run carries link artifacts to the MLflow run and to the registered
model version. Addresses exist only where there is a UI to open: a Prefect server (not
the ephemeral API of a plain Python call) and an http(s) MLflow tracking server.
"""

from __future__ import annotations

import contextlib
from typing import Optional


def prefect_flow_run_url(flow_run_id: str) -> Optional[str]:
    """The Prefect UI page of a flow run, when a Prefect server with a UI is configured."""
    if not flow_run_id:
        return None
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

        if not PREFECT_API_URL.value():
            return None  # an ephemeral API: there is no UI to link to
        ui = PREFECT_UI_URL.value()
    except Exception:
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> Optional[str]:
    """The MLflow UI page of a run, when the tracking URI is an http(s) server."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_model_version_url(tracking_uri: str, name: str, version: str) -> Optional[str]:
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"


def publish_links(links: dict[str, Optional[str]]) -> None:
    """A Prefect link artifact per address (key -> URL); nothing outside a flow run or without an address."""
    from prefect.artifacts import create_link_artifact

    for key, url in links.items():
        if url:
            with contextlib.suppress(Exception):  # outside a Prefect run there is nowhere to publish
                create_link_artifact(link=url, key=key, description=f"{key.replace('-', ' ')} of this flow run")
