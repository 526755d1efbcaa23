"""The ``distill`` flow: load -> plan -> preflight -> annotate -> aggregate -> train -> evaluate -> register.

The body is the DAG, one line per stage; each stage returns a typed result
(tasks/results/stages.py). The teacher's half is tasks/pipeline/stages.py; what differs
between labelling and writing (aggregation, the student, its evaluation and gate, the
report's table) is asked of the task type (tasks/pipeline/task_types.py). Timing and the
MLflow runs (one parent per flow run, tagged with the Prefect flow run; nested runs for
the teacher's stages, training and evaluation) live in
:class:`tasks.pipeline.run.DistillRun`. Training and inference run under codecarbon's
offline tracker; the run ends with the teacher's bill and the per-1M-items projection.
"""

from typing import Any

from prefect import flow

from distill.config import DistillConfig
from distill.runtime import set_quiet_env
from flows.annotate import annotate_flow
from tasks.pipeline import stages
from tasks.pipeline.run import DistillRun
from tasks.pipeline.task_types import task_kind

set_quiet_env()


@flow(name="distill", log_prints=True)
def distill_flow(
    config: DistillConfig, show_progress: bool = True, dry_run: bool = False, fresh: bool = False
) -> dict[str, Any]:
    """Distil the teacher into a student and register it if it passes the quality gate.

    ``dry_run``: only the priced plan of the annotation; nothing is sent, trained or logged.
    ``fresh``: recompute every stage, even those an earlier run finished with the same inputs
    (the response cache still answers what was paid for).
    """
    cfg, task = config, task_kind(config.task)
    if not cfg.data.gold_path:
        raise ValueError("data.gold_path is required for the distill flow: the student is judged on human gold")
    if dry_run:
        return annotate_flow(cfg, show_progress=show_progress, dry_run=True)
    with DistillRun(cfg, fresh) as run:
        loaded = run.stage("load", stages.load, cfg, child="annotate")
        plan = run.stage("plan", stages.plan, cfg, loaded, child="annotate")
        run.stage("preflight", stages.preflight, cfg, loaded)
        ann = run.stage("annotate", stages.annotate, cfg, loaded, plan, show_progress, child="annotate")
        agg = run.stage("aggregate", stages.aggregate, cfg, ann, child="annotate")
        run.teacher_report(loaded, plan, ann, agg)
        model = run.stage("train", task.train, cfg, agg, show_progress, child="train")
        ev = run.stage("evaluate", task.evaluate, cfg, agg, model, ann.speed.teacher_items_per_s, child="evaluate")
        reg = run.stage("register", task.register, cfg, agg, model, ev, run.run_id)
        return run.report(task, ann, model, ev, reg)


__all__ = ["distill_flow"]
