"""The ``classify`` task type's stages: aggregate the votes, train, evaluate and register the student; its table.

Why a module of its own: the flow asks the task type (tasks/pipeline/task_types.py) for these
stages instead of testing ``cfg.task``. Each stage receives the config sections it reads
(the pipeline layer picks them from the run's config) and returns a typed result
(tasks/results/stages.py); the Prefect tasks here are thin wrappers over the plain functions
of tasks/classify/ that do the work, and big lists never travel as their parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import task

from distill.config import (
    DataConfig,
    EnergyConfig,
    GateConfig,
    PricingConfig,
    ReviewConfig,
    StudentConfig,
    VoteConfig,
)
from tasks.accounting.costs import training_cost
from tasks.classify.aggregate import vote_shards, vote_stats
from tasks.classify.evaluate import evaluate, teacher_gold_scores
from tasks.classify.inference import StudentPredictor
from tasks.classify.pyfunc import log_student_model
from tasks.classify.register import register_classifier
from tasks.classify.train import train_on_all_gpus
from tasks.data.readers import read_gold
from tasks.results.classify import ClassifierEvaluation, ClassifierTraining
from tasks.results.stages import Aggregation, Evaluation, Registration, Trained

PRIMARY_METRIC = "macro_f1"  # the gold figure the gate decides on
# the figures of the final table that also go to the MLflow parent run as metrics
TABLE_KEYS = [
    "teacher_accuracy_single",
    "teacher_accuracy_voted",
    "teacher_macro_f1_single",
    "teacher_macro_f1_voted",
    "student_accuracy",
    "student_macro_f1",
    "student_accuracy_on_teacher_subset",
    "student_macro_f1_on_teacher_subset",
    "teacher_ece",
    "student_ece",
    "student_ece_on_teacher_subset",
    "majority_baseline_macro_f1",
    "majority_baseline_macro_f1_on_teacher_subset",
    "student_items_per_s",
    "teacher_items_per_s",
    "speed_ratio",
    "promoted",
    "gate_reason",
    "gate_improvement",
    "gate_improvement_ci_low",
    "gate_improvement_ci_high",
    "model_name",
    "model_version",
    "mlflow_run_id",
]
# what the summary keeps of the annotation summary and of the training figures
ANNOTATION_KEYS = (
    "items",
    "votes",
    "invalid_votes",
    "abstained",
    "requests_sent",
    "requests_cached",
    "tokens_in",
    "tokens_out",
    "requests_deduplicated",
    "variation",
    "aggregation",
    "probability_source",
    "probability_source_method",
    "samples_with_logprobs",
    "mean_label_entropy",
    "items_new",
    "items_reused",
    "reuse_saved_usd",
    "reuse_saved_usd_method",
)
TRAIN_KEYS = (
    "train_items",
    "use_votes",
    "soft_labels",
    "soft_label_weight",
    "distill_temperature",
    "class_balance",
    "train_label_counts",
    "val_macro_f1",
    "human_labelled_items",
    "human_share",
    "excluded_reviewed",
    "review_labels_version",
    "review_labels_digest",
    "review_items",
    "review_disagreements",
    "gold_items_from_review",
    "review_usd",
    "review_usd_method",
)


@task(name="aggregate", task_run_name="aggregate-{name}")
def vote_task(
    ann_paths: list[str],
    out_dir: str,
    name: str,
    *,
    vote: VoteConfig,  # noqa: ARG001  (name: the run's)
    labels: list[str],
) -> list[str]:
    return vote_shards(ann_paths, out_dir, vote.min_agreement, labels, vote.aggregation.value)


def aggregate_stage(
    pool: list[str], gold: list[str], *, vote: VoteConfig, labels: list[str], samples: int, votes_dir: Path
) -> Aggregation:
    """Vote the pool's and the gold subset's k samples per item; score the teacher on the gold subset."""
    voted = {
        split: vote_task(paths, str(votes_dir / split), split, vote=vote, labels=labels)
        for split, paths in (("pool", pool), ("gold", gold))
    }
    scores = teacher_gold_scores(voted["gold"], labels) if voted["gold"] else None
    if scores is not None:
        g = vote_stats(voted["gold"], samples)
        scores.gold_invalid_votes, scores.gold_abstained = g.invalid_votes, g.abstained
    return Aggregation(
        voted["pool"], voted["gold"], str(votes_dir / "pool"), vote_stats(voted["pool"], samples), scores
    )


@task(name="train-student")
def train_task(
    voted_paths: list[str],
    *,
    labels: list[str],
    out_dir: str,
    student: StudentConfig,
    min_agreement: float,
    show_progress: bool = True,
    review: Optional[ReviewConfig] = None,
) -> ClassifierTraining:
    return train_on_all_gpus(
        voted_paths,
        labels=labels,
        out_dir=out_dir,
        student=student,
        min_agreement=min_agreement,
        show_progress=show_progress,
        review=review,
    )


def train_stage(
    agg: Aggregation,
    *,
    student: StudentConfig,
    labels: list[str],
    min_agreement: float,
    energy: EnergyConfig,
    pricing: PricingConfig,
    out_dir: Path,
    show_progress: bool,
    review: Optional[ReviewConfig] = None,
) -> Trained:
    """Fine-tune the classifier student on the aggregated pool (and reviewers' labels), measuring energy and cost."""
    with training_cost(energy, pricing) as meter:
        tr = train_task(
            agg.pool_paths,
            labels=labels,
            out_dir=str(out_dir),
            student=student,
            min_agreement=min_agreement,
            show_progress=show_progress,
            review=review,
        )
    assert meter.cost is not None
    return Trained(tr.model_dir, tr, meter.cost)


@task(name="evaluate")
def evaluate_task(
    teacher_gold_votes: list[str],
    *,
    data: DataConfig,
    student: StudentConfig,
    model_dir: str,
    labels: list[str],
    out_dir: str,
    samples: int,
    aggregation: str,
    energy: EnergyConfig,
    majority_label: Optional[str],
) -> ClassifierEvaluation:
    """Reads the gold file itself: big lists never travel as Prefect parameters."""
    gold = read_gold(data, labels)
    pred = StudentPredictor(model_dir, precision=student.precision, max_length=student.max_length)
    return evaluate(
        gold,
        teacher_gold_votes,
        pred,
        labels=labels,
        out_dir=out_dir,
        batch_size=student.eval_batch_size,
        k=samples,
        energy=energy,
        aggregation=aggregation,
        majority_label=majority_label,
    )


def evaluate_stage(
    agg: Aggregation,
    model: Trained,
    *,
    data: DataConfig,
    student: StudentConfig,
    labels: list[str],
    samples: int,
    aggregation: str,
    energy: EnergyConfig,
    out_dir: Path,
    teacher_items_per_s: Optional[float],
) -> Evaluation:
    """Student (all gold and the teacher's subset) and teacher on human gold, calibration and speed."""
    assert isinstance(model.figures, ClassifierTraining)
    ev = evaluate_task(
        agg.gold_paths,
        data=data,
        student=student,
        model_dir=model.model_dir,
        labels=labels,
        out_dir=str(out_dir),
        samples=samples,
        aggregation=aggregation,
        energy=energy,
        majority_label=model.figures.majority_label,
    )
    ev.teacher_items_per_s = teacher_items_per_s
    ev.speed_ratio = ev.speed.student_items_per_s / teacher_items_per_s if teacher_items_per_s else None
    return Evaluation(
        ev,
        PRIMARY_METRIC,
        ev.student_macro_f1,
        documents={"calibration.json": {"reliability": ev.reliability}},
        tables={"student_gold_predictions.json": ev.gold_predictions_path} if ev.gold_predictions_path else {},
    )


@task(name="register")
def register_task(
    log_model: Any,
    *,
    data: DataConfig,
    labels: list[str],
    model_name: str,
    score: float,
    gold_predictions_path: Optional[str],
    gate: GateConfig,
    run_id: str,
    candidate: Optional[str],
) -> Registration:
    """Reads the gold file and the student's gold predictions itself: big lists never travel as Prefect parameters."""
    import pandas as pd

    gold = read_gold(data, labels)
    challenger = None
    if gold_predictions_path and gate.bootstrap_resamples > 0:
        by_id = pd.read_parquet(gold_predictions_path).set_index("id")["pred"]
        challenger = [str(by_id[i]) for i in gold["id"]]
    return register_classifier(
        log_model,
        model_name=model_name,
        score=score,
        gold_texts=gold["text"].tolist(),
        gold_labels=gold["label"].tolist(),
        labels=labels,
        gate=gate,
        challenger_pred=challenger,
        run_id=run_id,
        candidate=candidate,
    )


def register_stage(
    agg: Aggregation,
    model: Trained,
    ev: Evaluation,
    *,
    data: DataConfig,
    student: StudentConfig,
    labels: list[str],
    model_name: str,
    gate: GateConfig,
    run_id: str,
) -> Registration:
    """Log the student as an MLflow pyfunc, register it and let the gate decide on gold macro-F1."""
    import pandas as pd

    def log_model() -> str:  # not called when a rerun finds this student already registered
        texts = pd.read_parquet(agg.pool_paths[0], columns=["text"])["text"].tolist()[:3]
        return log_student_model(model.model_dir, student.precision, student.max_length, texts).model_uri

    return register_task(
        log_model,
        data=data,
        labels=labels,
        model_name=model_name,
        score=ev.score,
        gold_predictions_path=getattr(ev.figures, "gold_predictions_path", None),
        gate=gate,
        run_id=run_id,
        candidate=model.uid,
    )


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
        f"{_pct(s.get('teacher_accuracy_voted'))} | {_pct(s.get('teacher_macro_f1_voted'))} | "
        f"{_ece(s.get('teacher_ece'))} | |",
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
        "| class (gold subset) | gold | teacher predicted | student predicted | teacher recall | student recall | "
        "inherited blind spot |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {b['label']} | {b['gold']} | {b['teacher_predicted']} | {b['student_predicted']} | "
            f"{_pct(b['teacher_recall'])} | {_pct(b['student_recall'])} | "
            f"{'yes' if b['inherited_blind_spot'] else 'no'} |"
            for b in s.get("blind_spots", [])
        ],
        "",
        f"Student is {_num(s.get('speed_ratio'), '.0f')}x the teacher's items/s on this machine "
        f"(student precision {s.get('student_precision')}, batch {s.get('student_batch_size')}; "
        f"p50/p95 single-item latency "
        f"{s.get('student_latency_p50_ms') or 0:.1f}/{s.get('student_latency_p95_ms') or 0:.1f} ms).",
        f"Gate: {'PROMOTED to champion' if s.get('promoted') else 'not promoted'} - {s.get('gate_reason')}",
        f"MLflow run {s.get('mlflow_run_id')}, model {s.get('model_name')} version {s.get('model_version')}.",
        "Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.get("stage_seconds", {}).items()),
    ]
    return "\n".join(lines)
