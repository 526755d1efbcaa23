"""What the teacher and the student cost, typed: this run's bill, the student's training, and the 1M projection.

Why the field names are the summary's keys: these figures are an interface (the
``--summary-json`` keys pinned by tests/summary_keys.json, the MLflow metrics, the cost
table), so each field is named as it is read there and every figure keeps its
``*_method`` (measured, estimated from a configured assumption, or carried over from an
earlier run) beside it. tasks/accounting/costs.py computes them; tasks/pipeline/summary.py
turns them into the summary, the one place where they become string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional


def figures_of(obj: Any) -> dict[str, Any]:
    """A figures dataclass as ``{field name: value}`` (its field names are the summary's keys)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


@dataclass
class TeacherBill:
    """This run's teacher bill (USD, kWh, gCO2e) and its per-item figures for the 1M projection."""

    teacher_usd: float
    teacher_usd_method: str
    teacher_requests_billed: int
    teacher_attempts: int
    teacher_usd_failed_attempts: float
    teacher_busy_s: float
    teacher_prices: list[str]
    teacher_self_hosted: bool
    teacher_tokens_counted: int
    teacher_kwh: Optional[float]
    teacher_gco2: Optional[float]
    teacher_energy_s: float
    teacher_kwh_method: str
    teacher_gco2_method: str
    teacher_grid_country: str
    teacher_grid_gco2_per_kwh: float
    teacher_kwh_per_item: Optional[float]
    teacher_kwh_per_item_method: str
    teacher_usd_per_item: Optional[float]
    teacher_usd_per_item_method: str
    # a self-hosted teacher's hourly rate as a token price, to set beside an API's (None for API teachers)
    teacher_usd_per_mtok_equivalent: Optional[float] = None
    teacher_usd_per_mtok_equivalent_method: Optional[str] = None


@dataclass
class TrainingCost:
    """The student's training: energy from codecarbon, dollars from its measured seconds at the hardware rate."""

    student_train_kwh: Optional[float]
    student_train_gco2: Optional[float]
    student_train_energy_s: float
    student_train_kwh_method: str
    student_train_gco2_method: str
    student_train_usd: float
    student_train_usd_method: str


@dataclass
class Projection:
    """USD, hours, kWh and kg CO2e per 1M items for teacher and student, here and on the reference deployment."""

    reference_name: str
    hardware_name: str
    hardware_usd_per_hour: float
    grid_gco2_per_kwh: float
    reference_grid_gco2_per_kwh: float
    teacher_usd_per_1m: Optional[float]
    teacher_usd_per_1m_method: str
    teacher_hours_per_1m: Optional[float]
    teacher_hours_per_1m_method: str
    teacher_kwh_per_1m: Optional[float]
    teacher_kwh_per_1m_method: str
    teacher_kgco2_per_1m: Optional[float]
    teacher_kgco2_per_1m_method: str
    student_hours_per_1m: Optional[float]
    student_hours_per_1m_method: str
    student_usd_per_1m: Optional[float]
    student_usd_per_1m_method: str
    student_kwh_per_1m: Optional[float]
    student_kwh_per_1m_method: str
    student_kgco2_per_1m: Optional[float]
    student_kgco2_per_1m_method: str
    ref_teacher_hours_per_1m: Optional[float]
    ref_teacher_usd_per_1m: Optional[float]
    ref_teacher_kwh_per_1m: Optional[float]
    ref_teacher_kgco2_per_1m: Optional[float]
    ref_teacher_method: str
    ref_student_hours_per_1m: Optional[float]
    ref_student_usd_per_1m: Optional[float]
    ref_student_kwh_per_1m: Optional[float]
    ref_student_kgco2_per_1m: Optional[float]
    ref_student_method: str
    cost_ratio_per_1m: Optional[float]
    time_ratio_per_1m: Optional[float]
    co2_ratio_per_1m: Optional[float]
    ref_cost_ratio_per_1m: Optional[float]
    ref_time_ratio_per_1m: Optional[float]
    ref_co2_ratio_per_1m: Optional[float]
    cost_ratio_per_1m_method: str = "teacher_usd_per_1m / student_usd_per_1m (both on this machine's figures)"
    co2_ratio_per_1m_method: str = "teacher_kgco2_per_1m / student_kgco2_per_1m"


@dataclass(frozen=True)
class TeacherPrice:
    """The resolved price of one teacher endpoint: per token, per busy hour, or free."""

    model: str
    kind: str  # "tokens" | "hourly" | "free"
    input_per_mtok: float = 0.0  # batch discount already applied when the run bills at batch rate
    output_per_mtok: float = 0.0
    per_request_usd: float = 0.0
    usd_per_hour: float = 0.0
    batch_discount: float = 0.0
    batch: bool = False
    kwh_per_request: Optional[float] = None
    kwh_per_1k_output_tokens: Optional[float] = None
    source: str = ""

    def token_cost(self, prompt_tokens: Optional[int], completion_tokens: Optional[int], requests: int = 1) -> float:
        """USD for token usage (0 for hourly and free endpoints: those are priced by time)."""
        if self.kind != "tokens":
            return 0.0
        return (
            (prompt_tokens or 0) * self.input_per_mtok + (completion_tokens or 0) * self.output_per_mtok
        ) / 1e6 + requests * self.per_request_usd

    def batch_variant(self) -> TeacherPrice:
        """The same model billed through the provider's batch API."""
        if self.kind != "tokens" or self.batch or not self.batch_discount:
            return self
        f = 1.0 - self.batch_discount
        return TeacherPrice(
            **{
                **self.__dict__,
                "input_per_mtok": self.input_per_mtok * f,
                "output_per_mtok": self.output_per_mtok * f,
                "batch": True,
            }
        )

    def describe(self) -> str:
        if self.kind == "free":
            return f"{self.model}: free ({self.source})"
        if self.kind == "hourly":
            return f"{self.model}: ${self.usd_per_hour:g}/hour of busy hardware ({self.source})"
        fee = f" + ${self.per_request_usd:g}/request" if self.per_request_usd else ""
        batch = " at batch rate" if self.batch else ""
        return (
            f"{self.model}: ${self.input_per_mtok:g} in / ${self.output_per_mtok:g} out per 1M tokens{fee}{batch} "
            f"({self.source})"
        )
