"""What each stage of a run hands to the next: typed results, as TRL's ``TrainOutput`` or Curator's ``types/``.

Why typed: the flow body reads as the DAG only if a stage's output says what it is. Each
result names the files and decisions the next stage needs (Parquet paths, the model
folder, the registered version) as fields, and carries the figures it measured as typed
parts (tasks/results/{teacher,accounting,classify,generate}.py). They become string keys
in one place, tasks/pipeline/summary.py: the ``--summary-json`` keys (an interface, pinned
by tests/summary_keys.json) and the MLflow metric names.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from tasks.results.accounting import TeacherBill, TeacherPrice, TrainingCost
from tasks.results.classify import ClassifierEvaluation, ClassifierTraining, TeacherGoldScores, VoteStats
from tasks.results.data import DataReport, Selection
from tasks.results.generate import GeneratorEvaluation, GeneratorGoldScores, GeneratorTraining, MedoidStats
from tasks.results.registry import PairedInterval
from tasks.results.teacher import PlanFigures, Probe, ShardResult, ShardTotals, TeacherSpeed
from tasks.templates.load import Template

AggregateStats = Union[VoteStats, MedoidStats]
GoldScores = Union[TeacherGoldScores, GeneratorGoldScores]
TrainingFigures = Union[ClassifierTraining, GeneratorTraining]
EvaluationFigures = Union[ClassifierEvaluation, GeneratorEvaluation]


def numeric(figures: dict[str, Any]) -> dict[str, float]:
    """The figures MLflow can log as metrics: numbers and booleans, never None or NaN."""
    return {
        k: float(v)
        for k, v in figures.items()
        if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isnan(v))
    }


@dataclass
class Loaded:
    """The validated inputs in shards: what annotation will ask the teacher about."""

    template: Template
    prices: list[TeacherPrice]
    pool_shards: list[str]
    gold_shards: list[str]
    pool_report: DataReport
    gold_report: Optional[DataReport]
    pool_rejected: Optional[str]
    selection: Selection
    fingerprint: str = ""  # hash of data, prompt, teacher and chosen items (tasks/pipeline/load.py)

    def shards(self, split: str) -> list[str]:
        """The input shards of ``split`` ("pool" or "gold")."""
        return {"pool": self.pool_shards, "gold": self.gold_shards}[split]


@dataclass
class Plan:
    """The priced plan made before any request (tasks/teacher/plan.py) and its text."""

    figures: PlanFigures
    text: str

    @property
    def over_budget(self) -> bool:
        return self.figures.over_budget


@dataclass
class Reuse:
    """New vs reused pool items and what reusing cached answers saved (what asking again would cost)."""

    items_new: int
    items_reused: int
    reuse_saved_usd: Optional[float]
    reuse_saved_usd_method: str


@dataclass
class Annotation:
    """The teacher's answers, per split, and what asking cost: the shards, their totals, speed, bill and reuse.

    ``probe`` is the preflight probe: paid and counted with the run (its requests, tokens and
    spend are in ``totals``), no item of it.
    """

    pool: list[ShardResult]
    gold: list[ShardResult]
    probe: Optional[Probe]
    totals: ShardTotals
    speed: TeacherSpeed
    bill: TeacherBill
    reuse: Reuse

    def paths(self, split: str) -> list[str]:
        return [r.path for r in {"pool": self.pool, "gold": self.gold}[split]]


@dataclass
class Aggregation:
    """The k samples of each item made one (vote or medoid), for the pool and the gold subset."""

    pool_paths: list[str]
    gold_paths: list[str]
    votes_dir: str
    stats: AggregateStats  # the pool's aggregation
    gold: Optional[GoldScores] = None  # the teacher on human gold, single and aggregated (None without gold items)


@dataclass
class Trained:
    """The student as trained: its folder, the training figures and what training cost."""

    model_dir: str
    figures: TrainingFigures
    cost: TrainingCost
    merged_dir: Optional[str] = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # this training's identity in the registry


@dataclass
class Evaluation:
    """The student (and the teacher) judged on human gold, plus the artifacts that show it."""

    figures: EvaluationFigures
    primary_metric: str  # the figure the gate decides on: "macro_f1", "bertscore_f1" or "rougeL"
    score: float  # the student's value of it
    documents: dict[str, Any] = field(default_factory=dict)  # MLflow artifact name -> JSON-able dict
    tables: dict[str, str] = field(default_factory=dict)  # MLflow table name -> Parquet path

    @property
    def plots(self) -> list[str]:
        return list(getattr(self.figures, "plots", []))


@dataclass
class Registration:
    """The registered model version and the gate's decision."""

    model_name: str
    model_version: str
    promoted: bool
    gate_reason: str
    metric: str  # the figure the gate compared, as its reason names it
    previous_champion_version: Optional[str] = None
    previous_champion_score: Optional[float] = None  # the previous champion re-measured on this gold now
    improvement_interval: Optional[PairedInterval] = None  # challenger minus that champion, paired bootstrap
