"""The ``classify`` task type's train, evaluate and register stages, its summary and its table.

Why a module of its own: the flow asks the task type (tasks/pipeline/task_types.py) for these
stages instead of testing ``cfg.task``; this is today's classification code behind that
seam, unchanged in what it computes. Each stage receives the narrowest config parts it
reads and returns a typed result (tasks/results/stages.py).
"""

from __future__ import annotations

from typing import Any, Optional

from distill.config import DistillConfig
from tasks.accounting.costs import training_cost
from tasks.results.stages import Aggregation, Evaluation, Registration, Trained

PRIMARY_METRIC = "macro_f1"  # the gold figure the gate decides on
# the figures of the final table that also go to the MLflow parent run as metrics
TABLE_KEYS = ["teacher_accuracy_single", "teacher_accuracy_voted", "teacher_macro_f1_single", "teacher_macro_f1_voted",
              "student_accuracy", "student_macro_f1", "student_accuracy_on_teacher_subset",
              "student_macro_f1_on_teacher_subset", "teacher_ece", "student_ece", "student_ece_on_teacher_subset",
              "majority_baseline_macro_f1", "majority_baseline_macro_f1_on_teacher_subset", "student_items_per_s",
              "teacher_items_per_s", "speed_ratio", "promoted", "gate_reason", "model_name", "model_version", "mlflow_run_id"]
# what the summary keeps of the annotation summary and of the training figures
ANNOTATION_KEYS = ("items", "votes", "invalid_votes", "abstained", "requests_sent", "requests_cached", "tokens_in",
                   "tokens_out", "requests_deduplicated", "variation", "aggregation", "probability_source",
                   "probability_source_method", "samples_with_logprobs", "mean_label_entropy", "items_new",
                   "items_reused", "reuse_saved_usd", "reuse_saved_usd_method")
TRAIN_KEYS = ("train_items", "use_votes", "soft_labels", "soft_label_weight", "distill_temperature", "class_balance",
              "train_label_counts", "val_macro_f1")


def train_stage(cfg: DistillConfig, agg: Aggregation, show_progress: bool) -> Trained:
    """Fine-tune the classifier student on the aggregated pool, measuring its energy and cost."""
    from tasks.templates.label import load_prompt
    from tasks.classify.train import train_task

    with training_cost(cfg.energy, cfg.pricing) as cost:
        tr = train_task(agg.pool_paths, load_prompt(cfg.prompt).labels, str(cfg.run_dir / "student"), cfg.student,
                        cfg.vote.min_agreement, show_progress)
    tr.update(cost)
    return Trained(tr["model_dir"], tr)


def evaluate_stage(cfg: DistillConfig, agg: Aggregation, model: Trained, teacher_items_per_s: Optional[float]) -> Evaluation:
    """Student (all gold and the teacher's subset) and teacher on human gold, calibration and speed."""
    from tasks.classify.evaluate import evaluate_task
    from tasks.templates.label import load_prompt

    d, st = cfg.data, cfg.student
    counts = model.figures["train_label_counts"]
    ev = evaluate_task(d.gold_path, d.text_column, d.id_column, d.gold_label_column, load_prompt(cfg.prompt).labels,
                       agg.gold_paths, model.model_dir, st.precision, st.max_length, str(cfg.run_dir / "evaluation"),
                       st.eval_batch_size, cfg.teacher.samples, teacher_items_per_s, cfg.energy,
                       cfg.vote.aggregation.value, max(counts, key=counts.get))
    plots = ev.pop("plots")
    return Evaluation(ev, PRIMARY_METRIC, plots, documents={
        "evaluation.json": ev, "calibration.json": {"reliability": ev.get("reliability", [])}})


def register_stage(cfg: DistillConfig, agg: Aggregation, model: Trained, ev: Evaluation, run_id: str) -> Registration:
    """Log the student as an MLflow pyfunc, register it and let the gate decide on gold macro-F1."""
    import pandas as pd

    from tasks.templates.label import load_prompt
    from tasks.registry.gate import log_student_model, register_task

    d, st = cfg.data, cfg.student

    def log_model() -> str:  # not called when a rerun finds this student already registered
        return log_student_model(model.model_dir, st.precision, st.max_length,
                                 pd.read_parquet(agg.pool_paths[0], columns=["text"])["text"].tolist()[:3]).model_uri

    reg = register_task(log_model, cfg.tracking.model_name, ev.score, d.gold_path, d.text_column, d.id_column,
                        d.gold_label_column, load_prompt(cfg.prompt).labels, cfg.gate.min_macro_f1,
                        cfg.gate.min_improvement, run_id, model.uid)
    return Registration.from_gate(reg)


def summary(ann: dict[str, Any], model: Trained, ev: Evaluation, reg: Registration, costs: dict[str, Any]) -> dict[str, Any]:
    """The classify run's figures for ``--summary-json`` (keys pinned by tests/summary_keys.json)."""
    return {**{k: ann.get(k) for k in ANNOTATION_KEYS}, **ev.figures, **reg.summary(),
            **{k: model.figures[k] for k in TRAIN_KEYS}, **costs}


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


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


def table(s: dict[str, Any]) -> str:
    """Teacher (single, aggregated) against the student on the same gold items, per-class recall, speed and gate."""
    n_sub = s.get("teacher_subset_items")
    agg = s.get("aggregation", "majority")
    agg_name = "voted" if agg == "majority" else "mean probability"
    lines = [
        "== distill run: teacher vs student on human gold ==",
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
