"""What each stage of a run hands to the next: typed results, as TRL's ``TrainOutput`` or Curator's ``types/``.

Why typed: the flow body reads as the DAG only if a stage's output says what it is. Each
result names the files and decisions the next stage needs (Parquet paths, the model
folder, the registered version) as fields; the figures it measured for the run report sit
in ``figures``, with each ``*_method`` string next to the figure it explains, because the
``--summary-json`` keys are an interface scripts read (pinned by a test). ``metrics()``
gives what MLflow can log as numbers; the report (tasks/pipeline/report.py) renders the table
and the summary from these objects, not from one big string-keyed dict passed along.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


def numeric(figures: dict[str, Any]) -> dict[str, float]:
    """The figures MLflow can log as metrics: numbers and booleans, never None or NaN."""
    return {k: float(v) for k, v in figures.items()
            if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isnan(v))}


@dataclass
class Loaded:
    """The validated inputs in shards: what annotation will ask the teacher about."""

    template: Any
    prices: list[Any]
    pool_shards: list[str]
    gold_shards: list[str]
    pool_report: dict[str, Any]
    gold_report: Optional[dict[str, Any]]
    pool_rejected: Optional[str]
    selection: Any  # tasks.select.Selection
    fingerprint: str = ""  # hash of data, prompt, teacher and chosen items (tasks/pipeline/annotation.py input_fingerprint)

    def shards(self, split: str) -> list[str]:
        """The input shards of ``split`` ("pool" or "gold")."""
        return {"pool": self.pool_shards, "gold": self.gold_shards}[split]

    def metrics(self) -> dict[str, float]:
        return numeric({"pool_items_loaded": self.pool_report.get("items"),
                        "gold_items_loaded": (self.gold_report or {}).get("items"),
                        "pool_shards": len(self.pool_shards), "gold_shards": len(self.gold_shards)})


@dataclass
class Plan:
    """The priced plan made before any request (tasks/teacher/plan.py) and its text."""

    figures: dict[str, Any]
    text: str

    @property
    def over_budget(self) -> bool:
        return bool(self.figures.get("over_budget"))

    def metrics(self) -> dict[str, float]:
        f = self.figures
        return numeric({"plan_requests": f.get("requests_to_send"), "plan_usd": f.get("usd"),
                        "plan_seconds": f.get("seconds")})


@dataclass
class Annotation:
    """The teacher's raw answers, per shard, and what asking cost.

    ``shards`` maps a split ("pool", "gold") to its shard results (paths of annotation
    parts and the shard's counters); ``figures`` holds the request counts, speed, teacher
    cost, carbon and reuse figures with their methods.
    """

    shards: dict[str, list[dict[str, Any]]]
    figures: dict[str, Any]

    def paths(self, split: str) -> list[str]:
        return [r["path"] for r in self.shards[split] if not r.get("probe")]  # the preflight probe is no shard

    def metrics(self) -> dict[str, float]:
        return numeric(self.figures)


@dataclass
class Aggregation:
    """The k samples of each item made one (vote or medoid), for the pool and the gold subset."""

    pool_paths: list[str]
    gold_paths: list[str]
    votes_dir: str
    figures: dict[str, Any] = field(default_factory=dict)  # counts of the pool's aggregation
    gold_figures: dict[str, Any] = field(default_factory=dict)  # the teacher on human gold, single and aggregated

    def metrics(self) -> dict[str, float]:
        return numeric({**self.figures, **self.gold_figures})


@dataclass
class Trained:
    """The student as trained: its folder and the training figures (items, losses, energy, cost)."""

    model_dir: str
    figures: dict[str, Any]
    merged_dir: Optional[str] = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # this training's identity in the registry

    def metrics(self) -> dict[str, float]:
        return numeric(self.figures)

    def params(self) -> dict[str, str]:
        """The non-numeric training choices (precision, base, balance), as MLflow params."""
        return {k: str(v)[:500] for k, v in self.figures.items()
                if not isinstance(v, (int, float)) or isinstance(v, bool)}


@dataclass
class Evaluation:
    """The student (and the teacher) judged on human gold, plus the artifacts that show it."""

    figures: dict[str, Any]
    primary_metric: str
    plots: list[str] = field(default_factory=list)
    documents: dict[str, Any] = field(default_factory=dict)  # MLflow artifact name -> JSON-able dict
    tables: dict[str, str] = field(default_factory=dict)  # MLflow table name -> Parquet path

    @property
    def score(self) -> float:
        """The student's figure the gate decides on."""
        return float(self.figures[f"student_{self.primary_metric}"])

    def metrics(self) -> dict[str, float]:
        return numeric(self.figures)


@dataclass
class Registration:
    """The registered model version and the gate's decision."""

    model_name: str
    model_version: str
    promoted: bool
    gate_reason: str
    figures: dict[str, Any] = field(default_factory=dict)  # previous champion and its re-measured score

    def summary(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "model_version": self.model_version, "promoted": self.promoted,
                "gate_reason": self.gate_reason, **self.figures}

    def metrics(self) -> dict[str, float]:
        return numeric({"promoted": self.promoted, **self.figures})

    @classmethod
    def from_gate(cls, d: dict[str, Any]) -> "Registration":
        rest = {k: v for k, v in d.items() if k not in ("model_name", "model_version", "promoted", "gate_reason")}
        return cls(d["model_name"], str(d["model_version"]), bool(d["promoted"]), str(d["gate_reason"]), rest)
