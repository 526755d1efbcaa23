"""The generate task type's figures, typed: the medoid, the teacher on the references, the LoRA student.

Field names are the summary's keys, as for classify (tasks/results/classify.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class MedoidStats:
    """Items, samples, invalid samples by reason, abstentions and mean agreement of the medoid aggregation."""

    items: int = 0
    votes: int = 0
    invalid_votes: int = 0
    abstained: int = 0
    mean_agreement: Optional[float] = None
    samples_invalid_missing: int = 0
    samples_invalid_empty: int = 0
    samples_invalid_truncated: int = 0
    samples_invalid_too_long: int = 0


@dataclass
class GeneratorGoldScores:
    """The teacher on the human references: each single sample (mean over the k) and the medoid."""

    gold_items_scored: int
    teacher_bertscore_f1_single: float
    teacher_rougeL_single: float
    teacher_bertscore_f1_single_by_sample: list[float]
    teacher_bertscore_f1_medoid: float
    teacher_bertscore_precision_medoid: float
    teacher_bertscore_recall_medoid: float
    teacher_rouge1_medoid: float
    teacher_rouge2_medoid: float
    teacher_rougeL_medoid: float
    teacher_share_empty_medoid: float
    teacher_mean_words_medoid: float
    reference_mean_words: float
    bertscore_model: str
    bertscore_num_layers: int
    gold_invalid_votes: int = 0
    gold_abstained: int = 0


@dataclass
class GeneratorTraining:
    """The LoRA student as trained: adapter and base folders, precision, steps and losses."""

    model_dir: str  # the adapter
    base_model_dir: str
    merged_dir: Optional[str]
    train_items: int
    val_items: int
    excluded_abstained: int
    device: str
    quantize_4bit: bool
    student_dtype: str
    precision_reason: str
    global_steps: int
    train_loss_first: float
    train_loss: float
    val_loss_before: Optional[float]
    val_loss: Optional[float]
    train_seconds: float
    trainable_params: int
    total_params: int
    lora_r: int
    base_model: str


@dataclass
class GeneratorEvaluation:
    """The student on the teacher's gold subset (same items, same references), its speed and energy."""

    student_bertscore_f1: float
    student_bertscore_precision: float
    student_bertscore_recall: float
    student_rouge1: float
    student_rouge2: float
    student_rougeL: float
    student_share_empty: float
    student_share_too_long: float
    student_share_truncated: float
    student_items_per_s: float
    student_tokens_per_s: float
    student_mean_words: float
    student_items_scored: int
    student_batch_size: int
    student_examples: list[dict[str, str]] = field(default_factory=list)
    student_infer_kwh: Optional[float] = None
    student_kwh_per_item: Optional[float] = None
    student_kwh_per_item_method: str = "not measured"
    speed_ratio: Optional[float] = None
