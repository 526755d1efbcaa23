"""The run's report arithmetic: the annotation figures, the budget-stop message and the summary.

Why here and not in the flow bodies: the flows read as the DAG (load, plan, annotate,
aggregate, train, evaluate, register); the sums, ratios and texts the report shows are
computed from the stages' typed results (tasks/results/stages.py) in one place, so the
``--summary-json`` keys (an interface, pinned by tests/summary_keys.json) come from here.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from distill.config import DistillConfig
from tasks.teacher.shard import choices_per_request
from tasks.accounting.costs import projection, teacher_costs
from tasks.results.stages import Aggregation, Annotation, Evaluation, Loaded, Plan, Trained

# the cost and carbon figures of --summary-json; each has a *_method key next to it
COST_KEYS = ["teacher_usd", "teacher_kwh", "teacher_gco2", "student_train_kwh", "student_train_gco2", "student_train_usd",
             "teacher_usd_per_1m", "teacher_hours_per_1m", "teacher_kwh_per_1m", "teacher_kgco2_per_1m",
             "student_usd_per_1m", "student_hours_per_1m", "student_kwh_per_1m", "student_kgco2_per_1m",
             "cost_ratio_per_1m", "time_ratio_per_1m", "co2_ratio_per_1m",
             "ref_teacher_usd_per_1m", "ref_teacher_hours_per_1m", "ref_teacher_kwh_per_1m", "ref_teacher_kgco2_per_1m",
             "ref_student_usd_per_1m", "ref_student_hours_per_1m", "ref_student_kwh_per_1m", "ref_student_kgco2_per_1m",
             "ref_cost_ratio_per_1m", "ref_time_ratio_per_1m", "ref_co2_ratio_per_1m"]
TEACHER_COST_EXTRAS = ("teacher_requests_billed", "teacher_attempts", "teacher_usd_failed_attempts", "teacher_prices",
                       "teacher_usd_per_mtok_equivalent")


class Clock(Protocol):
    seconds: dict[str, float]

    @property
    def wall_s(self) -> float: ...


def _sum(results: list[dict[str, Any]], key: str) -> int:
    return sum(int(r.get(key, 0) or 0) for r in results)


def reuse_summary(pool_results: list[dict[str, Any]], usd_per_item: Optional[float]) -> dict[str, Any]:
    """New vs reused pool items and what reusing cached answers saved (what asking again would cost).

    An item is reused when all its answers came from the cache or from a finished part of
    an earlier run (a nightly run over a source that grew annotates only what is new).
    """
    reused = sum(int(r.get("items", 0) or 0) if r.get("skipped") else int(r.get("items_reused", 0) or 0)
                 for r in pool_results)
    total = sum(int(r.get("items", 0) or 0) for r in pool_results)
    return {"items_new": total - reused, "items_reused": reused,
            "reuse_saved_usd": reused * usd_per_item if usd_per_item is not None else None,
            "reuse_saved_usd_method": (f"{reused:,} reused items x teacher_usd_per_item (what labelling one item costs, "
                                       "see its method)") if usd_per_item is not None else "teacher cost per item unknown"}


def budget_stop_summary(cfg: DistillConfig, plan_usd: float, results: list[dict[str, Any]], costs: dict[str, Any],
                        shards_not_started: int) -> dict[str, Any]:
    """What a run stopped at ``budget.max_usd`` reports: spend so far, what was not sent, how to continue."""
    max_usd = cfg.budget.max_usd
    not_sent = _sum(results, "not_sent_budget")
    msg = (f"budget.max_usd=${max_usd:g} reached: spent ${costs['teacher_usd']:.4f} on "
           f"{costs['teacher_attempts']:,} attempts; {not_sent:,} requests in the last shard not sent and "
           f"{shards_not_started} shards not started. Answers so far are in the cache ({cfg.client.cache_path}) and "
           f"partial parts in {cfg.run_dir / 'annotations'}; rerun with a higher budget.max_usd to continue without "
           "paying for them again.")
    return {"run_name": cfg.run_name, "stopped": "budget", "message": msg, "plan_usd": plan_usd,
            "requests_sent": _sum(results, "requests_sent"), "requests_ok": _sum(results, "requests_ok"),
            "requests_cached": _sum(results, "requests_cached"), "not_sent_budget": not_sent,
            "budget_max_usd": max_usd, **costs}


def annotation_figures(cfg: DistillConfig, prices: list[Any], shards: dict[str, list[dict[str, Any]]],
                       ledger: list[dict[str, Any]], teacher_energy: Any,
                       previous: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Requests, tokens, the teacher's speed, bill and carbon, and the reuse of earlier answers.

    When every answer came from the cache nothing was timed: the speed measured by the
    run that asked (``previous``, the last annotation summary in the run folder) is kept,
    and ``teacher_speed_source`` says so.
    """
    results = shards["pool"] + shards["gold"]
    k = cfg.teacher.samples
    per_request = choices_per_request(cfg)
    sent_wall = sum(r.get("wall_s", 0.0) for r in results if r.get("requests_sent"))
    ok = _sum(results, "requests_ok")
    f: dict[str, Any] = {
        "requests_sent": _sum(results, "requests_sent"),
        "requests_ok": ok,
        "requests_cached": _sum(results, "requests_cached"),
        "requests_deduplicated": _sum(results, "requests_deduplicated"),
        "shards_reused": sum(1 for r in results if r.get("skipped")),
        "requests_failed": _sum(results, "requests_failed"),
        "retries": _sum(results, "retries"),
        "tokens_in": _sum(results, "tokens_in"),
        "tokens_out": _sum(results, "tokens_out"),
        "teacher_requests_per_s": ok / sent_wall if sent_wall > 0 else None,
        # one request answers `per_request` samples (k with `n`, else 1)
        "teacher_items_per_s": ok * per_request / k / sent_wall if sent_wall > 0 else None,
        "teacher_speed_source": "this run" if sent_wall > 0 else None,
    }
    if f["teacher_items_per_s"] is None and previous and previous.get("teacher_items_per_s"):
        f["teacher_items_per_s"] = previous["teacher_items_per_s"]
        f["teacher_requests_per_s"] = previous.get("teacher_requests_per_s")
        f["teacher_speed_source"] = "an earlier run (all answers cached now)"
    items_total = sum(int(r.get("items", 0) or 0) for r in results if not r.get("skipped"))
    f.update(teacher_costs(cfg, prices, results, ledger, teacher_energy, items_total, f["teacher_items_per_s"],
                           previous, per_request))
    f.update(reuse_summary(shards["pool"], f.get("teacher_usd_per_item")))
    return f


def annotation_summary(cfg: DistillConfig, loaded: Loaded, plan: Plan, ann: Annotation, agg: Aggregation,
                       clock: Clock) -> dict[str, Any]:
    """The annotation summary (``annotation_summary.json``, the ``annotate`` command's output) from the stages."""
    s: dict[str, Any] = {"run_name": cfg.run_name, "teacher_model": cfg.teacher.model,
                         "samples_per_item": cfg.teacher.samples, "variation": cfg.teacher.variation.value,
                         "aggregation": cfg.vote.aggregation.value, "prompt_hash": loaded.template.template_hash()}
    s.update(agg.figures)
    s.update(ann.figures)
    s.update(loaded.selection.summary())
    p = plan.figures
    s.update({"plan_requests": p["requests_to_send"], "plan_tokens": p["tokens_in"] + p["tokens_out"],
              "plan_usd": p["usd"], "plan_seconds": p["seconds"], "budget_max_usd": cfg.budget.max_usd})
    s.update(agg.gold_figures)
    s["stage_seconds"] = {k: round(v, 2) for k, v in clock.seconds.items()}
    s["wall_s"] = clock.wall_s
    s["votes_dir"] = agg.votes_dir
    s["data_pool"] = loaded.pool_report
    s["data_gold"] = loaded.gold_report
    s["pool_rejected_file"] = loaded.pool_rejected
    return s


def run_costs(cfg: DistillConfig, ann: dict[str, Any], model: Trained, ev: Evaluation) -> dict[str, Any]:
    """The run's bill (teacher, student training) and the per-1M-items projection of teacher and student."""
    costs = {k: v for k, v in ann.items() if k.startswith("teacher_") and
             (k in COST_KEYS or k.endswith("_method") or k in TEACHER_COST_EXTRAS)}
    costs.update({k: v for k, v in model.figures.items() if k.startswith("student_train_")})
    f = ev.figures
    costs.update(projection(cfg, ann, f.get("student_items_per_s"), f.get("student_kwh_per_item"),
                            f.get("student_kwh_per_item_method", "not measured")))
    return costs


def distill_summary(cfg: DistillConfig, task_figures: dict[str, Any], mlflow_run_id: str, tracking_uri: str,
                    clock: Clock) -> dict[str, Any]:
    """The ``--summary-json`` of a distill run: the task type's figures between the run's identity and its timings."""
    return {"run_name": cfg.run_name, "samples_per_item": cfg.teacher.samples, "mlflow_run_id": mlflow_run_id,
            "mlflow_tracking_uri": tracking_uri, **task_figures,
            "stage_seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
            "stages_reused": list(getattr(clock, "reused", []))}
