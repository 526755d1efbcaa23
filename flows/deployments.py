"""The deployments distill ships, and ``distill serve``, which serves them on a Prefect server.

- ``distill/nightly``: the distill flow on the cron and time zone of the config's
  ``schedule`` section, with that config as its parameters.
- ``distill/on-demand``: the same flow without a schedule, for runs triggered from the
  Prefect UI (its form shows every config field with its description, filled with the
  demo config) or with ``prefect deployment run 'distill/on-demand' -p config='{...}'``.
- ``batch-predict/scheduled`` (with a predict config): the champion labels a data set on
  its own schedule, the batch job that replaces per-call API spend.

Why ``prefect.serve(flow.to_deployment(...))`` rather than ``flow.serve``: served this way
each run starts a fresh ``python -m prefect.engine`` that imports the flow from its
entrypoint, exactly as a worker on another machine would (work pools, see the README),
instead of unpickling a copy of the function, and the parameter model validates against
the real module. Serving needs a Prefect server: ``distill up`` starts one.
"""

from typing import Any, Optional

from prefect.schedules import Cron

from distill.config import DistillConfig, PredictConfig
from flows.batch_predict import batch_predict_flow
from flows.distillation import distill_flow

NIGHTLY = "nightly"
ON_DEMAND = "on-demand"


def distill_deployments(nightly: DistillConfig, on_demand: Optional[DistillConfig] = None) -> list[Any]:
    """The nightly and on-demand deployments of the distill flow (RunnerDeployment objects)."""
    on_demand = on_demand or nightly
    tags = ["distill"]
    return [
        distill_flow.to_deployment(
            name=NIGHTLY,
            schedules=[Cron(nightly.schedule.cron, timezone=nightly.schedule.timezone)],
            parameters={"config": nightly.model_dump(mode="json")},
            tags=tags + ["nightly"],
            description=(
                f"Nightly distillation of {nightly.run_name}: annotate what is new, retrain, evaluate on gold "
                f"and promote through the gate ({nightly.schedule.cron}, {nightly.schedule.timezone})."
            ),
        ),
        distill_flow.to_deployment(
            name=ON_DEMAND,
            parameters={"config": on_demand.model_dump(mode="json")},
            tags=tags + ["on-demand"],
            description="Distil on demand: edit the config in the form (every field is described) and run.",
        ),
    ]


def batch_deployment(predict: PredictConfig) -> Any:
    """The champion's scheduled batch job (cron and time zone from the predict config's schedule)."""
    return batch_predict_flow.to_deployment(
        name="scheduled",
        schedules=[Cron(predict.schedule.cron, timezone=predict.schedule.timezone)],
        parameters={"config": predict.model_dump(mode="json")},
        tags=["distill", "batch"],
        description=f"Label {predict.input_path} with {predict.model_uri} into {predict.output_path}.",
    )


def serve_deployments(deployments: list[Any], limit: Optional[int] = None) -> None:
    """Serve until interrupted (SIGTERM pauses the deployments; the next serve resumes them)."""
    from prefect import serve

    serve(*deployments, limit=limit)
