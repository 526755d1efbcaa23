"""The classify task type's figures, typed: the vote, the teacher on gold, the student's training and evaluation.

Why the field names are the summary's keys: as for the costs (tasks/results/accounting.py),
these figures are read by scripts (``--summary-json``), MLflow and the run's table under
these names; tasks/pipeline/summary.py is where they become string keys, and a field
renamed here is a key renamed there, which tests/summary_keys.json catches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class VoteStats:
    """Counts over the voted shards: items, votes, invalid or failed votes, abstentions, agreement, probability
    sources."""

    items: int = 0
    votes: int = 0
    valid_votes: int = 0
    invalid_votes: int = 0
    failed_votes: int = 0
    abstained: int = 0
    abstained_tie: int = 0
    abstained_no_valid: int = 0
    failed_items: int = 0
    low_agreement: int = 0
    samples_with_logprobs: int = 0
    invalid_rate: float = 0.0
    agreement_histogram: dict[str, int] = field(default_factory=dict)
    teacher_label_distribution: dict[str, int] = field(default_factory=dict)
    mean_label_entropy: Optional[float] = None
    probability_source: str = "vote shares"
    probability_source_method: str = ""


@dataclass
class TeacherGoldScores:
    """The teacher against human gold (its seeded subset): the aggregated label and sample 0 alone."""

    gold_items_scored: int
    teacher_accuracy_voted: float
    teacher_macro_f1_voted: float
    teacher_coverage_voted: float
    teacher_accuracy_single: float
    teacher_macro_f1_single: float
    gold_label_distribution: dict[str, int]
    teacher_label_distribution_on_gold: dict[str, int]
    teacher_accuracy_by_agreement: dict[str, str]
    gold_invalid_votes: int = 0
    gold_abstained: int = 0


@dataclass
class ClassifierTraining:
    """The classifier student as trained: its folder, the data it saw and how, its losses."""

    model_dir: str
    base_model: str
    device: str
    bf16: bool
    fp16: bool
    n_gpu: int
    train_items: int
    val_items: int
    excluded_abstained: int
    excluded_low_agreement: int
    use_votes: str
    soft_labels: bool
    soft_label_weight: float
    distill_temperature: float
    class_balance: str
    train_label_counts: dict[str, int]
    train_loss: float
    val_loss: float
    val_macro_f1: float
    epochs_run: float
    global_steps: int
    train_seconds: float
    torch_threads: int
    # human review (review.labels_dir): items training with a reviewer's label, reviewed items kept out of training
    # (they grew the gold, or their reviewers disagreed under on_disagreement: exclude), and the training rows
    human_labelled_items: int = 0
    human_share: float = 0.0  # of the training and validation rows
    excluded_reviewed: int = 0
    train_set_path: str = ""
    review_labels_version: Optional[int] = None
    review_labels_digest: Optional[str] = None
    review_items: int = 0  # items in the human-label file (after the disagreement rule: see review_disagreements)
    review_disagreements: int = 0
    gold_items_from_review: int = 0
    review_usd: float = 0.0  # every annotation in the file this run used, at review.usd_per_label
    review_usd_method: Optional[str] = None

    @property
    def majority_label(self) -> str:
        """The teacher's most frequent label in the training data (the always-this baseline)."""
        counts = self.train_label_counts
        return max(counts, key=lambda k: counts[k])


@dataclass
class StudentSpeed:
    """The student's inference speed on gold (batched, after a warm-up), its energy per item and single-item latency."""

    student_items_per_s: float
    student_latency_p50_ms: float
    student_latency_p95_ms: float
    student_batch_size: int
    student_speed_items: int
    student_infer_kwh: Optional[float]
    student_kwh_per_item: Optional[float]
    student_kwh_per_item_method: str


@dataclass
class TeacherSubset:
    """Teacher and student on the teacher's seeded gold subset (the same items for both)."""

    teacher_subset_items: int
    teacher_accuracy_single: float
    teacher_macro_f1_single: float
    teacher_accuracy_voted: float
    teacher_macro_f1_voted: float
    student_accuracy_on_teacher_subset: float
    student_macro_f1_on_teacher_subset: float
    student_teacher_agreement: float
    teacher_per_class_voted: dict[str, Any]
    teacher_ece: Optional[float]
    teacher_ece_items: int
    teacher_ece_left_out: int
    student_ece_on_teacher_subset: Optional[float]
    majority_baseline_macro_f1_on_teacher_subset: Optional[float]
    coverage_curve: list[dict[str, float]]
    blind_spots: list[dict[str, Any]]


@dataclass
class ClassifierEvaluation:
    """The student (all gold, and the teacher's subset) and the teacher on human gold, calibration and speed."""

    gold_items: int
    student_accuracy: float
    student_macro_f1: float
    student_per_class: dict[str, Any]
    student_ece: Optional[float]
    majority_baseline_label: Optional[str]
    majority_baseline_macro_f1: Optional[float]
    subset: Optional[TeacherSubset]
    reliability: list[dict[str, Any]]
    speed: StudentSpeed
    student_precision: str
    teacher_items_per_s: Optional[float]
    speed_ratio: Optional[float]
    plots: list[str] = field(default_factory=list)
    gold_predictions_path: Optional[str] = None  # Parquet: id, label, pred, confidence per gold item
