"""Where the typed figures become string keys: the summaries, the budget stop and the MLflow metrics.

Why one module: the keys of ``annotation_summary.json`` and ``--summary-json`` are an
interface (scripts read them; tests/summary_keys.json pins the run's), and so are the
MLflow metric names. Every stage hands on typed results (tasks/results/); this is the one
place they are flattened, so a renamed figure changes a key here, where the pinned-keys
test sees it, and nothing downstream adds figures up by key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol

from distill.config import DistillConfig
from distill.runtime import hf_offline
from tasks.results.accounting import Projection, TeacherBill, figures_of
from tasks.results.classify import ClassifierEvaluation, ClassifierTraining
from tasks.results.generate import GeneratorEvaluation
from tasks.results.stages import Aggregation, Annotation, Evaluation, Loaded, Plan, Registration, Trained, numeric
from tasks.results.teacher import ShardTotals

# the teacher's bill as the run's summary shows it (its per-item figures show as their methods only); each has
# its *_method; the per-mtok equivalent only for a self-hosted teacher
BILL_KEYS = (
    "teacher_usd",
    "teacher_usd_method",
    "teacher_kwh",
    "teacher_kwh_method",
    "teacher_gco2",
    "teacher_gco2_method",
    "teacher_kwh_per_item_method",
    "teacher_usd_per_item_method",
    "teacher_requests_billed",
    "teacher_attempts",
    "teacher_usd_failed_attempts",
    "teacher_prices",
    "teacher_usd_per_mtok_equivalent",
    "teacher_usd_per_mtok_equivalent_method",
)


class Clock(Protocol):
    seconds: dict[str, float]

    @property
    def wall_s(self) -> float: ...


def counts(t: ShardTotals) -> dict[str, Any]:
    """The run's requests and tokens (the preflight probe's included) under the summary's keys."""
    c = t.client
    return {
        "requests_sent": c.requests_sent,
        "requests_ok": c.requests_ok,
        "requests_cached": c.requests_cached,
        "requests_deduplicated": t.requests_deduplicated,
        "shards_reused": t.shards_reused,
        "requests_failed": c.requests_failed,
        "retries": c.retries,
        "tokens_in": c.tokens_in,
        "tokens_out": c.tokens_out,
    }


def annotation_figures(ann: Annotation) -> dict[str, Any]:
    """Requests, tokens, the teacher's speed, bill and carbon, and the reuse of earlier answers."""
    return {**counts(ann.totals), **figures_of(ann.speed), **_bill(ann.bill, all_fields=True), **figures_of(ann.reuse)}


def _bill(bill: TeacherBill, all_fields: bool = False) -> dict[str, Any]:
    f = figures_of(bill)
    if bill.teacher_usd_per_mtok_equivalent is None:  # an API teacher: no hourly rate to express per token
        f.pop("teacher_usd_per_mtok_equivalent")
        f.pop("teacher_usd_per_mtok_equivalent_method")
    return f if all_fields else {k: v for k, v in f.items() if k in BILL_KEYS}


def aggregation_figures(agg: Aggregation) -> dict[str, Any]:
    return {**figures_of(agg.stats), **(figures_of(agg.gold) if agg.gold is not None else {})}


def annotation_summary(
    cfg: DistillConfig, loaded: Loaded, plan: Plan, ann: Annotation, agg: Aggregation, *, clock: Clock
) -> dict[str, Any]:
    """``annotation_summary.json`` (and the ``annotate`` command's output) from the teacher's stages."""
    gold = figures_of(agg.gold) if agg.gold is not None else {}
    p = plan.figures
    return {
        "run_name": cfg.run_name,
        "teacher_model": cfg.teacher.model,
        "samples_per_item": cfg.teacher.samples,
        "variation": cfg.teacher.variation.value,
        "aggregation": cfg.vote.aggregation.value,
        "prompt_hash": loaded.template.template_hash(),
        **figures_of(agg.stats),
        **annotation_figures(ann),
        **loaded.selection.summary(),
        "plan_requests": p.requests_to_send,
        "plan_tokens": p.tokens_in + p.tokens_out,
        "plan_usd": p.usd,
        "plan_seconds": p.seconds,
        "budget_max_usd": cfg.budget.max_usd,
        **gold,
        "stage_seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
        "wall_s": clock.wall_s,
        "votes_dir": agg.votes_dir,
        "data_pool": loaded.pool_report.to_dict(),
        "data_gold": loaded.gold_report.to_dict() if loaded.gold_report else None,
        "pool_rejected_file": loaded.pool_rejected,
    }


def budget_stop_summary(
    cfg: DistillConfig, *, plan_usd: float, totals: ShardTotals, bill: TeacherBill, shards_not_started: int
) -> dict[str, Any]:
    """What a run stopped at ``budget.max_usd`` reports: spend so far, what was not sent, how to continue."""
    max_usd = cfg.budget.max_usd
    c = totals.client
    msg = (
        f"budget.max_usd=${max_usd:g} reached: spent ${bill.teacher_usd:.4f} on "
        f"{bill.teacher_attempts:,} attempts; {c.not_sent_budget:,} requests in the last shard not sent and "
        f"{shards_not_started} shards not started. Answers so far are in the cache ({cfg.client.cache_path}) and "
        f"partial parts in {cfg.run_dir / 'annotations'}; rerun with a higher budget.max_usd to continue without "
        "paying for them again."
    )
    return {
        "run_name": cfg.run_name,
        "stopped": "budget",
        "message": msg,
        "plan_usd": plan_usd,
        "requests_sent": c.requests_sent,
        "requests_ok": c.requests_ok,
        "requests_cached": c.requests_cached,
        "not_sent_budget": c.not_sent_budget,
        "budget_max_usd": max_usd,
        **_bill(bill, all_fields=True),
    }


def batches_pending_summary(
    cfg: DistillConfig, *, plan_usd: float, totals: ShardTotals, bill: TeacherBill
) -> dict[str, Any]:
    """What a run that stopped waiting for its batches reports: what is at the provider, what it cost, how to go on."""
    c = totals.client
    msg = (
        f"teacher.batch.max_wait_s={cfg.teacher.batch.max_wait_s:g} s passed with {c.batch_pending:,} requests still "
        f"in batches at the provider ({c.batches_submitted:,} batches submitted by this run, {c.batches_collected:,} "
        f"collected; ${bill.teacher_usd:.4f} spent so far). Nothing is lost or submitted twice: the batches are "
        f"recorded in {cfg.client.cache_path}; run the same command again (or let the schedule) and it collects "
        "them and goes on."
    )
    return {
        "run_name": cfg.run_name,
        "stopped": "batches_pending",
        "message": msg,
        "plan_usd": plan_usd,
        "requests_sent": c.requests_sent,
        "requests_ok": c.requests_ok,
        "requests_cached": c.requests_cached,
        "batch_pending": c.batch_pending,
        "batches_submitted": c.batches_submitted,
        "batches_collected": c.batches_collected,
        "not_sent_budget": c.not_sent_budget,
        "budget_max_usd": cfg.budget.max_usd,
        **_bill(bill, all_fields=True),
    }


def training_figures(model: Trained) -> dict[str, Any]:
    return {**figures_of(model.figures), **figures_of(model.cost)}


def evaluation_figures(ev: Evaluation) -> dict[str, Any]:
    """The evaluation under the summary's keys (the plots are artifacts, not figures)."""
    f = ev.figures
    if isinstance(f, ClassifierEvaluation):
        out = {k: v for k, v in figures_of(f).items() if k not in ("subset", "speed", "plots")}
        if f.majority_baseline_label is None:
            out.pop("majority_baseline_label")
            out.pop("majority_baseline_macro_f1")
        sub = figures_of(f.subset) if f.subset is not None else {}
        if f.subset is not None and f.subset.majority_baseline_macro_f1_on_teacher_subset is None:
            sub.pop("majority_baseline_macro_f1_on_teacher_subset")
        return {**out, **sub, **figures_of(f.speed)}
    assert isinstance(f, GeneratorEvaluation)
    return figures_of(f)


def registration_figures(reg: Registration, task: str) -> dict[str, Any]:
    """The registered version and the gate's decision; the previous champion's score under the task type's name."""
    out: dict[str, Any] = {
        "model_name": reg.model_name,
        "model_version": reg.model_version,
        "promoted": reg.promoted,
        "gate_reason": reg.gate_reason,
        "previous_champion_version": reg.previous_champion_version,
    }
    ci = reg.improvement_interval  # None for a first model, or with gate.bootstrap_resamples 0
    out.update(
        {
            "gate_improvement": ci.diff if ci else None,
            "gate_improvement_ci_low": ci.low if ci else None,
            "gate_improvement_ci_high": ci.high if ci else None,
        }
    )
    if task == "classify":
        out["previous_champion_macro_f1"] = reg.previous_champion_score
    else:
        out.update({"previous_champion_score": reg.previous_champion_score, "gate_metric": reg.metric})
    return out


def run_costs(ann: Annotation, model: Trained, projection: Projection) -> dict[str, Any]:
    """The run's bill (teacher, student training) and the per-1M-items projection, under the summary's keys."""
    return {**_bill(ann.bill), **figures_of(model.cost), **figures_of(projection)}


def stage_metrics(result: Any, task: Optional[str] = None) -> dict[str, float]:
    """What MLflow logs of a stage's typed result: its numbers and booleans, under the summary's names."""
    if isinstance(result, Loaded):
        return numeric(
            {
                "pool_items_loaded": result.pool_report.items,
                "gold_items_loaded": result.gold_report.items if result.gold_report else None,
                "pool_shards": len(result.pool_shards),
                "gold_shards": len(result.gold_shards),
            }
        )
    if isinstance(result, Plan):
        p = result.figures
        return numeric({"plan_requests": p.requests_to_send, "plan_usd": p.usd, "plan_seconds": p.seconds})
    if isinstance(result, Annotation):
        return numeric(annotation_figures(result))
    if isinstance(result, Aggregation):
        return numeric(aggregation_figures(result))
    if isinstance(result, Trained):
        return numeric(training_figures(result))
    if isinstance(result, Evaluation):
        return numeric(evaluation_figures(result))
    if isinstance(result, Registration):
        return numeric(registration_figures(result, task or "classify"))
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return numeric(figures_of(result))
    return {}


def training_params(model: Trained) -> dict[str, str]:
    """The non-numeric training choices (precision, base, balance), as MLflow params."""
    return {
        k: str(v)[:500]
        for k, v in training_figures(model).items()
        if not isinstance(v, (int, float)) or isinstance(v, bool)
    }


def task_summary(
    kind_name: str,
    annotation: dict[str, Any],
    model: Trained,
    ev: Evaluation,
    reg: Registration,
    *,
    costs: dict[str, Any],
    annotation_keys: tuple[str, ...],
    train_keys: tuple[str, ...],
) -> dict[str, Any]:
    """A task type's figures for ``--summary-json``: the annotation's it shows, evaluation, gate, training, cost."""
    train = training_figures(model)
    if kind_name == "classify":
        assert isinstance(model.figures, ClassifierTraining)
        return {
            **{k: annotation.get(k) for k in annotation_keys},
            **evaluation_figures(ev),
            **registration_figures(reg, kind_name),
            **{k: train[k] for k in train_keys},
            **costs,
        }
    # the teacher's output tokens per second while it was busy answering (tokens per request x requests/s)
    rps, ok = annotation.get("teacher_requests_per_s"), annotation.get("requests_ok") or 0
    teacher_tps = (annotation.get("tokens_out") or 0) / ok * rps if rps and ok else None
    return {
        "task": "generate",
        **{k: v for k, v in annotation.items() if k in annotation_keys or k.startswith("samples_invalid_")},
        **evaluation_figures(ev),
        **registration_figures(reg, kind_name),
        **costs,
        **{k: train[k] for k in train_keys},
        "teacher_tokens_per_s": teacher_tps,
        "student_precision": train["student_dtype"],
    }


def distill_summary(
    cfg: DistillConfig, task_figures: dict[str, Any], mlflow_run_id: str, tracking_uri: str, clock: Clock
) -> dict[str, Any]:
    """The ``--summary-json`` of a distill run: the task type's figures between the run's identity and its timings."""
    return {
        "run_name": cfg.run_name,
        "samples_per_item": cfg.teacher.samples,
        "mlflow_run_id": mlflow_run_id,
        "mlflow_tracking_uri": tracking_uri,
        "hf_hub_offline": hf_offline(),  # whether the Hugging Face libraries were kept off the hub (a host setting)
        "teacher_transport": cfg.teacher.transport.value,
        **task_figures,
        "stage_seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
        "stages_reused": list(getattr(clock, "reused", [])),
    }
