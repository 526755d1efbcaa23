"""The ``distill`` flow: annotate -> vote -> train -> evaluate -> register.

One MLflow parent run per flow run, tagged with the Prefect flow-run id and name; each
stage logs into a nested run. The annotate flow is reused as a subflow. MLflow calls
happen here in the flow body (with explicit run ids), so tasks stay plain and testable.
Training and inference run under codecarbon's offline tracker; the run ends with the
teacher's bill and the per-1M-items projection for teacher and student (tasks/costs.py).
"""

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from distill.config import DistillConfig, TaskType
from distill.links import mlflow_model_version_url, mlflow_run_url, prefect_flow_run_url, publish_links
from distill.runtime import run_logger, set_offline_env
from flows.annotate import annotate_flow
from flows.generate import generate_stages, generate_table
from tasks.budget import BudgetExhausted
from tasks.carbon import measure_energy
from tasks.costs import cost_chart, cost_table, projection
from tasks.evaluate import evaluate_task
from tasks.prompting import load_prompt
from tasks.registry import log_student_model, register_task, setup_tracking
from tasks.train import train_task

set_offline_env()

TABLE_KEYS = ["teacher_accuracy_single", "teacher_accuracy_voted", "teacher_macro_f1_single", "teacher_macro_f1_voted",
              "student_accuracy", "student_macro_f1", "student_accuracy_on_teacher_subset",
              "student_macro_f1_on_teacher_subset", "teacher_ece", "student_ece", "student_ece_on_teacher_subset",
              "majority_baseline_macro_f1", "majority_baseline_macro_f1_on_teacher_subset", "student_items_per_s",
              "teacher_items_per_s", "speed_ratio", "promoted", "gate_reason", "model_name", "model_version", "mlflow_run_id"]
GENERATE_ANN_KEYS = ("items", "votes", "invalid_votes", "abstained", "mean_agreement", "requests_sent", "requests_cached",
                     "tokens_in", "tokens_out", "requests_deduplicated", "variation", "aggregation", "items_new",
                     "items_reused", "gold_items_scored", "teacher_items_per_s", "teacher_bertscore_f1_single",
                     "teacher_rougeL_single", "teacher_bertscore_f1_single_by_sample", "teacher_bertscore_f1_medoid",
                     "teacher_bertscore_precision_medoid", "teacher_bertscore_recall_medoid", "teacher_rouge1_medoid",
                     "teacher_rouge2_medoid", "teacher_rougeL_medoid", "teacher_share_empty_medoid",
                     "teacher_mean_words_medoid", "reference_mean_words", "bertscore_model", "bertscore_num_layers")
GENERATE_TABLE_KEYS = ["teacher_bertscore_f1_single", "teacher_bertscore_f1_medoid", "teacher_rougeL_single",
                       "teacher_rougeL_medoid", "student_bertscore_f1", "student_rougeL", "student_items_per_s",
                       "teacher_items_per_s", "speed_ratio", "promoted"]
# the cost and carbon figures of --summary-json; each has a *_method key next to it
COST_KEYS = ["teacher_usd", "teacher_kwh", "teacher_gco2", "student_train_kwh", "student_train_gco2", "student_train_usd",
             "teacher_usd_per_1m", "teacher_hours_per_1m", "teacher_kwh_per_1m", "teacher_kgco2_per_1m",
             "student_usd_per_1m", "student_hours_per_1m", "student_kwh_per_1m", "student_kgco2_per_1m",
             "cost_ratio_per_1m", "time_ratio_per_1m", "co2_ratio_per_1m",
             "ref_teacher_usd_per_1m", "ref_teacher_hours_per_1m", "ref_teacher_kwh_per_1m", "ref_teacher_kgco2_per_1m",
             "ref_student_usd_per_1m", "ref_student_hours_per_1m", "ref_student_kwh_per_1m", "ref_student_kgco2_per_1m",
             "ref_cost_ratio_per_1m", "ref_time_ratio_per_1m", "ref_co2_ratio_per_1m"]


def _numeric(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            out[prefix + k] = float(v)
        elif isinstance(v, (int, float)) and v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[prefix + k] = float(v)
    return out


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def final_table(s: dict[str, Any]) -> str:
    n_sub = s.get("teacher_subset_items")
    agg = s.get("aggregation", "majority")
    agg_name = "voted" if agg == "majority" else "mean probability"
    lines = [
        "| model | gold items | accuracy | macro-F1 | ECE | items/s |",
        "|---|---|---|---|---|---|",
        f"| teacher, 1 sample | {n_sub} (seeded subset) | {_pct(s.get('teacher_accuracy_single'))} | "
        f"{_pct(s.get('teacher_macro_f1_single'))} | | {_num(s.get('teacher_items_per_s'), '.2f')} |",
        f"| teacher, {agg_name} (k={s.get('samples_per_item')}) | {n_sub} (same subset) | "
        f"{_pct(s.get('teacher_accuracy_voted'))} | {_pct(s.get('teacher_macro_f1_voted'))} | {_ece(s.get('teacher_ece'))} | |",
        f"| student | {n_sub} (same subset) | {_pct(s.get('student_accuracy_on_teacher_subset'))} | "
        f"{_pct(s.get('student_macro_f1_on_teacher_subset'))} | {_ece(s.get('student_ece_on_teacher_subset'))} | "
        f"{_num(s.get('student_items_per_s'), '.1f')} |",
        f"| student | {s.get('gold_items')} (all gold) | {_pct(s.get('student_accuracy'))} | "
        f"{_pct(s.get('student_macro_f1'))} | {_ece(s.get('student_ece'))} | |",
        f"| always '{s.get('majority_baseline_label')}' (the teacher's majority label) | {n_sub} (same subset) | | "
        f"{_pct(s.get('majority_baseline_macro_f1_on_teacher_subset'))} | | |",
        "",
        f"Teacher labels: {agg} over k={s.get('samples_per_item')} samples ({s.get('variation')}), probabilities from "
        f"{s.get('probability_source')} ({s.get('probability_source_method')}). Student trained on "
        f"{s.get('train_items')} of them: {_label_type(s)}, class balance '{s.get('class_balance')}'. "
        "ECE: expected calibration error of the confidence on gold (10 bins; lower is better).",
        "",
        "| class (gold subset) | gold | teacher predicted | student predicted | teacher recall | student recall | inherited blind spot |",
        "|---|---|---|---|---|---|---|",
        *[f"| {b['label']} | {b['gold']} | {b['teacher_predicted']} | {b['student_predicted']} | "
          f"{_pct(b['teacher_recall'])} | {_pct(b['student_recall'])} | {'yes' if b['inherited_blind_spot'] else 'no'} |"
          for b in s.get("blind_spots", [])],
        "",
        f"Student is {_num(s.get('speed_ratio'), '.0f')}x the teacher's items/s on this machine "
        f"(student precision {s.get('student_precision')}, batch {s.get('student_batch_size')}; "
        f"p50/p95 single-item latency {s.get('student_latency_p50_ms') or 0:.1f}/{s.get('student_latency_p95_ms') or 0:.1f} ms).",
        f"Gate: {'PROMOTED to champion' if s.get('promoted') else 'not promoted'} - {s.get('gate_reason')}",
        f"MLflow run {s.get('mlflow_run_id')}, model {s.get('model_name')} version {s.get('model_version')}.",
        "Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.get("stage_seconds", {}).items()),
    ]
    return "\n".join(lines)


def _num(x: Any, fmt: str) -> str:
    """A figure, or 'n/a' when it was not measured (say, every answer came from the cache of another run)."""
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def _ece(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "n/a"


def _label_type(s: dict[str, Any]) -> str:
    w = s.get("soft_label_weight") or 0.0
    if not w:
        return "hard labels"
    kind = "soft labels" if w >= 1 else f"hard/soft mix (soft weight {w:g})"
    return f"{kind} at temperature {s.get('distill_temperature', 1):g}"


@flow(name="distill", log_prints=True)
def distill_flow(config: DistillConfig, show_progress: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Distil the teacher into a student and register it if it passes the quality gate.

    ``dry_run``: only the priced plan of the annotation; nothing is sent, trained or logged.
    """
    import mlflow
    import pandas as pd

    cfg = config
    logger = run_logger()
    if not cfg.data.gold_path:
        raise ValueError("data.gold_path is required for the distill flow: the student is judged on human gold")
    if dry_run:
        return annotate_flow(cfg, show_progress=show_progress, dry_run=True)
    template = load_prompt(cfg.prompt)
    labels = template.labels
    uri = setup_tracking(cfg.tracking.tracking_uri, cfg.tracking.experiment)
    stage_s: dict[str, float] = {}
    try:
        ctx = get_run_context()
        fr_id, fr_name = str(ctx.flow_run.id), str(ctx.flow_run.name)  # type: ignore[union-attr]
    except Exception:
        fr_id, fr_name = "", ""
    run_dir = cfg.run_dir
    run_tags = {"prefect.flow_run_id": fr_id, "prefect.flow_run_name": fr_name, "distill.run_name": cfg.run_name}
    if prefect_flow_run_url(fr_id):
        run_tags["prefect.flow_run_url"] = prefect_flow_run_url(fr_id)
    with mlflow.start_run(run_name=cfg.run_name, tags=run_tags) as parent:
        publish_links({"mlflow-run": mlflow_run_url(uri, parent.info.experiment_id, parent.info.run_id)})
        mlflow.log_params({k: str(v)[:500] for k, v in cfg.public_params().items()})
        mlflow.log_text(Path(template.source).read_text(), "prompt/template.yaml")
        mlflow.set_tag("prompt_hash", template.template_hash())
        mlflow.log_dict(json.loads(cfg.model_dump_json()), "config.json")

        t0 = time.monotonic()
        try:
            ann = annotate_flow(cfg, show_progress=show_progress)
        except BudgetExhausted as e:
            mlflow.log_metrics(_numeric({k: e.summary.get(k) for k in ("teacher_usd", "requests_sent", "not_sent_budget",
                                                                       "budget_max_usd")}))
            mlflow.set_tags({"stopped": "budget", "stop_message": str(e)[:5000]})
            raise
        stage_s["annotate"] = time.monotonic() - t0
        with mlflow.start_run(run_name="annotate", nested=True):
            mlflow.log_metrics(_numeric(ann))
            mlflow.log_dict(ann, "annotation_summary.json")
            with contextlib.suppress(Exception):
                gold_df = pd.read_parquet(cfg.data.gold_path) if cfg.data.gold_path.endswith(".parquet") else None
                if gold_df is not None:
                    mlflow.log_input(mlflow.data.from_pandas(gold_df, source=cfg.data.gold_path, name="gold"),
                                     context="evaluation")
                pool_votes = sorted(Path(ann["votes_dir"]).glob("*.parquet"))
                votes_df = pd.concat([pd.read_parquet(p, columns=["id", "text", "label", "confidence"])
                                      for p in pool_votes])
                mlflow.log_input(mlflow.data.from_pandas(votes_df, source=cfg.data.pool_path, name="pool-votes"),
                                 context="training")

        if cfg.task == TaskType.generate:  # the generate task's train, evaluate and register (flows/generate.py)
            gen = generate_stages(cfg, ann, parent.info.run_id, show_progress, stage_s)
            summary = {"run_name": cfg.run_name, "task": cfg.task.value, "samples_per_item": cfg.teacher.samples,
                       "mlflow_run_id": parent.info.run_id, "mlflow_tracking_uri": uri,
                       **{k: v for k, v in ann.items() if k in GENERATE_ANN_KEYS or k.startswith("samples_invalid_")},
                       **gen,
                       "stage_seconds": {**ann.get("stage_seconds", {}), **{k: round(v, 2) for k, v in stage_s.items()}}}
            reg = {k: summary[k] for k in ("model_name", "model_version", "promoted")}
            mlflow.log_metrics(_numeric({k: summary.get(k) for k in GENERATE_TABLE_KEYS}))
            mlflow.set_tags({"gate_decision": "promoted" if reg["promoted"] else "rejected", "task": "generate",
                             "model_version": reg["model_version"]})
            table = generate_table(summary) + "\n\n" + cost_table(summary)
            mlflow.log_text(table, "summary.md")
            (run_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        else:
            summary, reg, table = _classify_stages(cfg, ann, labels, parent, uri, stage_s, show_progress)
    with contextlib.suppress(Exception):
        publish_links({"mlflow-model-version": mlflow_model_version_url(uri, reg["model_name"], reg["model_version"])})
        create_markdown_artifact(markdown="# distill run\n\n" + table, key="distill-summary",
                                 description="teacher vs student on human gold, speed and the gate decision")
    logger.info("distill run finished:\n%s", table)
    summary["table"] = table
    return summary


def _classify_stages(cfg: DistillConfig, ann: dict[str, Any], labels: list[str], parent: Any, uri: str,
                     stage_s: dict[str, float], show_progress: bool) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The classify task's train, evaluate and register, inside the flow's MLflow parent run."""
    import mlflow
    import pandas as pd

    run_dir = cfg.run_dir
    voted_pool = sorted(str(p) for p in Path(ann["votes_dir"]).glob("*.parquet"))
    voted_gold = sorted(str(p) for p in (run_dir / "votes" / "gold").glob("*.parquet"))
    t0 = time.monotonic()
    en = cfg.energy
    with measure_energy("student-train", en.country_iso_code, en.measure, en.cpu_power_w,
                        en.measure_power_secs) as train_energy:
        tr = train_task(voted_pool, labels, str(run_dir / "student"), cfg.student, cfg.vote.min_agreement,
                        show_progress)
    stage_s["train"] = time.monotonic() - t0
    tr.update(train_energy.as_dict("student_train"))
    tr["student_train_usd"] = cfg.pricing.hardware_usd_per_hour * train_energy.duration_s / 3600
    tr["student_train_usd_method"] = (f"measured {train_energy.duration_s:.0f} s x ${cfg.pricing.hardware_usd_per_hour:g}/h "
                                      f"({cfg.pricing.hardware_name})")
    with mlflow.start_run(run_name="train", nested=True):
        mlflow.log_params({k: str(v) for k, v in tr.items() if not isinstance(v, (int, float)) or isinstance(v, bool)})
        mlflow.log_metrics(_numeric(tr))

    t0 = time.monotonic()
    ev = evaluate_task(cfg.data.gold_path, cfg.data.text_column, cfg.data.id_column, cfg.data.gold_label_column,
                       labels, voted_gold, tr["model_dir"], cfg.student.precision, cfg.student.max_length,
                       str(run_dir / "evaluation"), cfg.student.eval_batch_size, cfg.teacher.samples,
                       ann.get("teacher_items_per_s"), cfg.energy, cfg.vote.aggregation.value,
                       max(tr["train_label_counts"], key=tr["train_label_counts"].get))
    stage_s["evaluate"] = time.monotonic() - t0
    with mlflow.start_run(run_name="evaluate", nested=True):
        mlflow.log_metrics(_numeric(ev))
        for p in ev["plots"]:
            mlflow.log_artifact(p, "plots")
        mlflow.log_dict({k: v for k, v in ev.items() if k != "plots"}, "evaluation.json")
        mlflow.log_dict({"reliability": ev.get("reliability", [])}, "calibration.json")
    costs = {k: v for k, v in ann.items() if k.startswith("teacher_") and
             (k in COST_KEYS or k.endswith("_method") or k in ("teacher_requests_billed", "teacher_attempts",
                                                               "teacher_usd_failed_attempts", "teacher_prices",
                                                               "teacher_usd_per_mtok_equivalent"))}
    costs.update({k: v for k, v in tr.items() if k.startswith("student_train_")})
    costs.update(projection(cfg, ann, ev.get("student_items_per_s"), ev.get("student_kwh_per_item"),
                            ev.get("student_kwh_per_item_method", "not measured")))
    ev["plots"].append(cost_chart(costs, run_dir / "evaluation" / "cost_per_1m.png"))
    for p in ev["plots"]:
        mlflow.log_artifact(p, "plots")
    mlflow.log_metrics(_numeric({k: costs.get(k) for k in COST_KEYS}))
    mlflow.log_dict(costs, "costs.json")

    t0 = time.monotonic()
    info = log_student_model(tr["model_dir"], cfg.student.precision, cfg.student.max_length,
                             pd.read_parquet(voted_pool[0], columns=["text"])["text"].tolist()[:3])
    reg = register_task(info.model_uri, cfg.tracking.model_name, ev["student_macro_f1"], cfg.data.gold_path,
                        cfg.data.text_column, cfg.data.id_column, cfg.data.gold_label_column, labels,
                        cfg.gate.min_macro_f1, cfg.gate.min_improvement, parent.info.run_id)
    stage_s["register"] = time.monotonic() - t0
    summary: dict[str, Any] = {
        "run_name": cfg.run_name, "samples_per_item": cfg.teacher.samples, "mlflow_run_id": parent.info.run_id,
        "mlflow_tracking_uri": uri, **{k: ann.get(k) for k in ("items", "votes", "invalid_votes", "abstained",
                                                              "requests_sent", "requests_cached", "tokens_in",
                                                              "tokens_out", "requests_deduplicated", "variation",
                                                              "aggregation", "probability_source",
                                                              "probability_source_method", "samples_with_logprobs",
                                                              "mean_label_entropy", "items_new", "items_reused",
                                                              "reuse_saved_usd", "reuse_saved_usd_method")},
        **{k: v for k, v in ev.items() if k not in ("plots",)}, **reg,
        **{k: tr[k] for k in ("train_items", "use_votes", "soft_labels", "soft_label_weight", "distill_temperature",
                              "class_balance", "train_label_counts", "val_macro_f1")}, **costs,
        "stage_seconds": {**ann.get("stage_seconds", {}), **{k: round(v, 2) for k, v in stage_s.items()}},
    }
    mlflow.log_metrics(_numeric({k: summary.get(k) for k in TABLE_KEYS}))
    mlflow.set_tags({"gate_decision": "promoted" if reg["promoted"] else "rejected",
                     "model_version": reg["model_version"]})
    table = final_table(summary) + "\n\n" + cost_table(summary)
    mlflow.log_text(table, "summary.md")
    (run_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary, reg, table
