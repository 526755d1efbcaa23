"""The ``annotate`` flow: load -> plan -> preflight -> annotate -> aggregate -> report.

Usable alone (``distill annotate CONFIG``, or ``annotate_flow(cfg)`` from Python): the
teacher's half of the ``distill`` flow, without training. The stages are the same
functions the ``distill`` flow calls (tasks/pipeline/stages.py); tasks are coarse, one
per stage and one per shard of a few thousand items, never one per item.
"""

from typing import Any

from prefect import flow

from distill.config import DistillConfig
from distill.runtime import set_quiet_env
from tasks.pipeline import stages
from tasks.pipeline.checkpoints import run_lock
from tasks.pipeline.run import StageClock
from tasks.pipeline.summary import annotation_summary

set_quiet_env()


@flow(name="annotate", log_prints=True)
def annotate_flow(config: DistillConfig, show_progress: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Annotate the pool (and the gold subset) with k teacher samples per item and aggregate them.

    ``dry_run``: stop after the priced plan; nothing is sent and no teacher is started.
    """
    cfg, clock = config, StageClock()
    with run_lock(cfg.run_dir, "annotate"):
        loaded = clock.stage("load", stages.load, cfg)
        plan = clock.stage("plan", stages.plan, cfg, loaded)
        if dry_run:
            return stages.dry_run_result(cfg, plan)
        clock.stage("preflight", stages.preflight, cfg, loaded)
        ann = clock.stage("annotate", stages.annotate, cfg, loaded, plan, show_progress)
        agg = clock.stage("aggregate", stages.aggregate, cfg, ann)
        return stages.report_task(annotation_summary(cfg, loaded, plan, ann, agg, clock=clock), str(cfg.run_dir))


__all__ = ["annotate_flow"]
