"""The run's stages as the flows call them: each takes the run's config and hands every concept only its sections.

Why a layer of its own: the flow body is the DAG, one line per stage, and passes the one
config object the Prefect form edits; below this layer no function sees ``DistillConfig``
(the teacher's stages get ``teacher``, ``client``, a budget figure; the data loader gets
``data``; the student's stages get ``student`` and ``energy``; and so on). Here the
sections are picked, the stage runs, and its typed result goes back to the flow.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact

from distill.config import DistillConfig
from distill.runtime import run_logger
from tasks.accounting.budget import BudgetExhausted
from tasks.accounting.carbon import EnergyReading, measure_energy
from tasks.accounting.costs import LedgerSums
from tasks.data.select import commit_selection
from tasks.pipeline.figures import annotation_of
from tasks.pipeline.load import load_inputs
from tasks.pipeline.preflight import OutputsChecked, check_outputs, check_student_base
from tasks.pipeline.report import markdown_summary
from tasks.pipeline.summary import batches_pending_summary, budget_stop_summary
from tasks.pipeline.task_types import task_kind
from tasks.results.stages import Aggregation, Annotation, Loaded, Plan
from tasks.results.teacher import EarlierRun
from tasks.teacher.batch import BatchesPending
from tasks.teacher.cache import ResponseCache
from tasks.teacher.plan import PlanFigures
from tasks.teacher.stages import AnnotatedShards, annotate_items, plan_annotation
from tasks.teacher.tokenizer import counter_for
from tasks.templates.load import load_prompt

__all__ = ["aggregate", "annotate", "dry_run_result", "load", "plan", "plan_run", "preflight", "report_task"]


def load(cfg: DistillConfig) -> Loaded:
    """Template, prices and data checked and sharded, tonight's items chosen; nothing sent yet."""
    return load_inputs(cfg)


def plan(cfg: DistillConfig, loaded: Loaded) -> Plan:
    """The priced plan of what annotation will send, before any request."""
    return plan_annotation(
        loaded,
        teacher=cfg.teacher,
        client=cfg.client,
        pricing=cfg.pricing,
        max_usd=cfg.budget.max_usd,
        run_dir=cfg.run_dir,
    )


def plan_run(cfg: DistillConfig) -> PlanFigures:
    """The plan of a whole run from its config, without Prefect: what ``distill plan`` prints."""
    from tasks.accounting.pricing import resolve_prices
    from tasks.pipeline.load import prepare
    from tasks.teacher.plan import make_plan

    template = load_prompt(cfg.prompt)
    inputs = prepare(cfg, template)
    return make_plan(
        inputs.gold_shards + inputs.pool_shards,
        template=template,
        teacher=cfg.teacher,
        client=cfg.client,
        pricing=cfg.pricing,
        max_usd=cfg.budget.max_usd,
        prices=resolve_prices(cfg.teacher, cfg.pricing),
        counter=counter_for(cfg.teacher),
    )


def dry_run_result(cfg: DistillConfig, plan: Plan) -> dict[str, Any]:
    """What ``--dry-run`` returns: the plan, published as an artifact; nothing was sent."""
    with contextlib.suppress(Exception):
        create_markdown_artifact(
            markdown="# distill plan (dry run: nothing sent)\n\n" + plan.text,
            key="distill-plan",
            description="priced plan of the annotation, before any request",
        )
    return {"dry_run": True, "plan": plan.figures.as_dict(), "plan_text": plan.text, "run_name": cfg.run_name}


def preflight(cfg: DistillConfig, loaded: Loaded) -> OutputsChecked:
    """Before any request: the run and cache folders writable and disk for the student (the tracking store was
    written when the run opened), the student's base model found; the teacher's probe follows once its endpoint is
    up."""
    del loaded  # the inputs are checked: what is left is the student's base and where the outputs go
    base = check_student_base(cfg)
    checked = check_outputs(cfg)
    run_logger().info(
        "preflight: student base model found (%s), outputs writable, %.0f MB free (student needs about %s MB)",
        base,
        checked.disk_free_mb,
        "?" if checked.student_mb_needed is None else f"{checked.student_mb_needed:.0f}",
    )
    return checked


def annotate(cfg: DistillConfig, loaded: Loaded, plan: Plan, show_progress: bool = True) -> Annotation:
    """Ask the teacher, measuring its energy, and work out the annotation's figures.

    At the budget cap the run stops with :class:`BudgetExhausted` carrying the stop's
    summary (also written to ``budget_stop.json`` and published); what was paid for stays
    in the cache, so a rerun continues without paying again.
    """
    e, t = cfg.energy, cfg.teacher
    stopped: Optional[BudgetExhausted] = None
    with measure_energy(
        "teacher",
        e.country_iso_code,
        enabled=e.measure and t.local,
        cpu_power_w=e.cpu_power_w,
        measure_power_secs=e.measure_power_secs,
    ) as energy:
        try:
            shards = annotate_items(
                loaded,
                plan,
                teacher=t,
                client=cfg.client,
                max_usd=cfg.budget.max_usd,
                runtime=cfg.runtime,
                run_dir=cfg.run_dir,
                show_progress=show_progress,
            )
        except BudgetExhausted as stop:
            stopped, shards = stop, stop.shards
    ann = _figures(cfg, loaded, shards, energy)
    if stopped is not None:
        raise _budget_stop(cfg, plan, ann, shards, stopped) from None
    commit_selection(cfg.run_dir)  # tonight's items are annotated: they join the run's ledger
    return ann


def _figures(cfg: DistillConfig, loaded: Loaded, shards: AnnotatedShards, energy: EnergyReading) -> Annotation:
    cache = ResponseCache(cfg.client.cache_path)
    try:
        ledger = LedgerSums.of(cache.ledger_usage(shards.run_id), loaded.prices)
    finally:
        cache.close()
    prev = cfg.run_dir / "annotation_summary.json"
    earlier = EarlierRun.from_summary(json.loads(prev.read_text()) if prev.exists() else None)
    return annotation_of(
        shards,
        prices=loaded.prices,
        ledger=ledger,
        energy=energy,
        teacher=cfg.teacher,
        energy_cfg=cfg.energy,
        earlier=earlier,
    )


def _budget_stop(
    cfg: DistillConfig, plan: Plan, ann: Annotation, shards: AnnotatedShards, stopped: BudgetExhausted
) -> BudgetExhausted:
    if isinstance(stopped, BatchesPending):
        return _batches_pending(cfg, plan, ann, shards)
    partial = budget_stop_summary(
        cfg,
        plan_usd=plan.figures.usd,
        totals=shards.totals(),
        bill=ann.bill,
        shards_not_started=shards.shards_not_started,
    )
    _publish_stop(
        cfg,
        partial,
        file="budget_stop.json",
        title="distill stopped at its budget",
        key="distill-budget-stop",
        description="the run reached budget.max_usd",
        level=logging.ERROR,
    )
    return BudgetExhausted(partial["message"], partial)


def _batches_pending(cfg: DistillConfig, plan: Plan, ann: Annotation, shards: AnnotatedShards) -> BatchesPending:
    """The run ends, its batches still at the provider: a nightly must not hold a worker for a 24-hour window."""
    partial = batches_pending_summary(cfg, plan_usd=plan.figures.usd, totals=shards.totals(), bill=ann.bill)
    _publish_stop(
        cfg,
        partial,
        file="batches_pending.json",
        title="distill is waiting for its batches",
        key="distill-batches-pending",
        description="batches still at the provider",
        level=logging.WARNING,
    )
    return BatchesPending(partial["message"], partial)


def _publish_stop(
    cfg: DistillConfig, partial: dict[str, Any], *, file: str, title: str, key: str, description: str, level: int
) -> None:
    """A stopped run's summary where people look: a JSON file in the run folder, the run log, a Prefect artifact."""
    (cfg.run_dir / file).write_text(json.dumps(partial, indent=2, default=str))
    run_logger().log(level, partial["message"])
    with contextlib.suppress(Exception):
        create_markdown_artifact(markdown=f"# {title}\n\n" + partial["message"], key=key, description=description)


def aggregate(cfg: DistillConfig, ann: Annotation) -> Aggregation:
    """The task type's aggregation (vote or medoid) of the pool and of the gold subset, and the teacher on gold."""
    return task_kind(cfg.task).aggregate(cfg, ann)


@task(name="report")
def report_task(summary: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Write the annotation summary (JSON and markdown) into the run folder and publish it as an artifact."""
    md = markdown_summary(summary)
    Path(run_dir, "annotation_summary.md").write_text(md)
    Path(run_dir, "annotation_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    with contextlib.suppress(Exception):  # outside a Prefect run there is nowhere to publish
        create_markdown_artifact(markdown=md, key="annotation-summary", description="distill annotation summary")
    return summary
