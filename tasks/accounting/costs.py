"""What the teacher and the student cost: this run's bill and a projection to 1M items.

Why one place: the case for distilling is a ratio (teacher $ and CO2 per 1M items over
the student's), and a ratio is only as honest as its weakest figure. Every figure here is
built from this run's measurements (spend from the attempt ledger, items/s, codecarbon
energy) and carries a ``*_method`` string that says whether it was measured, estimated
from a configured assumption, or carried over from an earlier run. The figures are typed
(tasks/results/accounting.py); the tables at the end render them for people.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distill.config import EnergyConfig, PricingConfig, ReferenceDeployment
from tasks.accounting.carbon import EnergyReading, grid_intensity, measure_energy, remote_teacher_energy
from tasks.results.accounting import Projection, TeacherBill, TeacherPrice, TrainingCost
from tasks.results.teacher import EarlierRun, ShardTotals, TeacherSpeed

M = 1_000_000


@dataclass
class TrainingMeter:
    """Filled when the ``with training_cost(...)`` block ends."""

    cost: Optional[TrainingCost] = None


@contextlib.contextmanager
def training_cost(energy: EnergyConfig, pricing: PricingConfig) -> Iterator[TrainingMeter]:
    """Measure the ``with`` block as the student's training: kWh and gCO2e from codecarbon, dollars from the
    measured seconds at the configured hardware rate, each with its ``*_method``."""
    meter = TrainingMeter()
    with measure_energy(
        "student-train",
        energy.country_iso_code,
        enabled=energy.measure,
        cpu_power_w=energy.cpu_power_w,
        measure_power_secs=energy.measure_power_secs,
    ) as reading:
        yield meter
    rate = pricing.hardware_usd_per_hour
    meter.cost = TrainingCost(
        student_train_kwh=reading.kwh,
        student_train_gco2=reading.gco2,
        student_train_energy_s=round(reading.duration_s, 2),
        student_train_kwh_method=reading.method,
        student_train_gco2_method=reading.method,
        student_train_usd=rate * reading.duration_s / 3600,
        student_train_usd_method=f"measured {reading.duration_s:.0f} s x ${rate:g}/h ({pricing.hardware_name})",
    )


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


@dataclass(frozen=True)
class LedgerSums:
    """The run's attempts from the ledger (:meth:`ResponseCache.ledger_usage`), as the bill reads them."""

    attempts: int
    billed: int
    failed_billed_usd: float
    usage_sources: dict[str, int]  # answered attempts by where their usage came from: reported, counted, estimated

    @classmethod
    def of(cls, ledger: list[dict[str, Any]], prices: list[TeacherPrice]) -> LedgerSums:
        by_model = {p.model: p for p in prices}
        failed = [g for g in ledger if not g["ok"] and g["usage_source"]]
        return cls(
            attempts=sum(g["attempts"] for g in ledger),
            billed=sum(g["attempts"] for g in ledger if g["ok"] or g["usage_source"]),
            failed_billed_usd=sum(
                by_model[g["model"]].token_cost(g["tokens_in"], g["tokens_out"], g["attempts"])
                for g in failed
                if g["model"] in by_model
            ),
            usage_sources={
                s: sum(g["attempts"] for g in ledger if g["ok"] and g["usage_source"] == s)
                for s in ("reported", "counted", "estimated")
            },
        )


def _usd_method(ledger: LedgerSums, prices: list[TeacherPrice], busy_s: float) -> str:
    token = [p for p in prices if p.kind == "tokens"]
    hourly = [p for p in prices if p.kind == "hourly"]
    src = ledger.usage_sources
    parts = []
    if token:
        parts.append(
            f"token usage of all {ledger.attempts:,} attempts (retries, invalid answers and billed failures "
            f"included; usage {src['reported']:,} reported by the server, {src['counted']:,} counted with "
            f"the teacher's tokenizer, {src['estimated']:,} estimated) x " + "; ".join(p.describe() for p in token)
        )
    if hourly:
        parts.append(f"{busy_s / 3600:.4f} busy hours x " + "; ".join(p.describe() for p in hourly))
    if not parts:
        parts.append("; ".join(p.describe() for p in prices))
    return ("partly estimated" if src["estimated"] else "measured") + ": " + " + ".join(parts)


def _teacher_energy(
    *,
    local: bool,
    energy: EnergyReading,
    energy_cfg: EnergyConfig,
    prices: list[TeacherPrice],
    totals: ShardTotals,
    billed: int,
    samples: int,
    answers_per_request: int,
    earlier: Optional[EarlierRun],
) -> tuple[EnergyReading, str, Optional[float], str]:
    """(the energy reading, its grid's country, kWh per item, how): measured for the local teacher, else estimated."""
    answers_sent = totals.client.requests_ok * answers_per_request
    if local:  # it serves on this machine: measured while it served
        kwh_item = energy.kwh / (answers_sent / samples) if energy.kwh is not None and answers_sent else None
        how = f"{energy.method}, over {answers_sent:,} answers sent in this run"
        if kwh_item is None and earlier is not None and earlier.teacher_kwh_per_item is not None:
            kwh_item, how = earlier.teacher_kwh_per_item, "from an earlier run (no answer sent now)"
        return energy, energy_cfg.country_iso_code, kwh_item, how
    country = energy_cfg.remote_country_iso_code
    token = [p for p in prices if p.kind == "tokens"]
    p0 = token[0] if token else prices[0]
    per_req = p0.kwh_per_request if p0.kwh_per_request is not None else energy_cfg.remote_kwh_per_request
    per_1k = (
        p0.kwh_per_1k_output_tokens
        if p0.kwh_per_1k_output_tokens is not None
        else energy_cfg.remote_kwh_per_1k_output_tokens
    )
    est = remote_teacher_energy(billed, totals.client.tokens_out, per_req, per_1k, country)
    if per_1k is None:  # per request: k / answers_per_request requests per item
        return est, country, per_req * samples / answers_per_request, est.method
    kwh_item = est.kwh / (answers_sent / samples) if est.kwh is not None and answers_sent else None
    return est, country, kwh_item, est.method


def _usd_per_item(
    *, prices: list[TeacherPrice], totals: ShardTotals, items_per_s: Optional[float], earlier: Optional[EarlierRun]
) -> tuple[Optional[float], str]:
    """What labelling one item costs: its answers' token usage x price x attempts per answer, plus busy hours."""
    token = [p for p in prices if p.kind == "tokens"]
    hourly = [p for p in prices if p.kind == "hourly"]
    usd_item: Optional[float] = 0.0
    how: list[str] = []
    if token:
        sp, items = totals.spend, totals.items
        overhead = sp.token_usd / sp.fresh_answers_usd if sp.fresh_answers_usd > 0 else 1.0
        if items:
            usd_item = sp.answers_usd * overhead / items
            how.append(
                f"projected from this run: token usage of the {items:,} items' answers x price x "
                f"{overhead:.3f} (attempts billed per answer"
                f"{' in this run' if sp.fresh_answers_usd > 0 else '; nothing sent this run, taken as 1'})"
            )
        elif earlier is not None and earlier.teacher_usd_per_item is not None:
            usd_item, how = earlier.teacher_usd_per_item, ["from an earlier run (no shard annotated now)"]
        else:
            usd_item = None
    if hourly and usd_item is not None:
        rate = sum(p.usd_per_hour for p in hourly) / len(hourly)
        if items_per_s:
            usd_item += rate / 3600 / items_per_s
            how.append(f"projected from this run: ${rate:g}/h / measured {items_per_s:.3f} items/s")
        else:
            usd_item = None
    return usd_item, "; ".join(how) or ("free" if usd_item == 0 else "not measured")


def teacher_bill(
    *,
    totals: ShardTotals,
    prices: list[TeacherPrice],
    ledger: LedgerSums,
    energy: EnergyReading,
    energy_cfg: EnergyConfig,
    local: bool,
    samples: int,
    answers_per_request: int,
    items_per_s: Optional[float],
    earlier: Optional[EarlierRun] = None,
) -> TeacherBill:
    """This run's teacher bill (USD, kWh, gCO2e) and the per-item figures for the 1M projection.

    ``totals`` are the shards' figures with the preflight probe's spend; ``energy`` the
    codecarbon reading taken while the local teacher served (other teachers' energy is
    estimated); ``answers_per_request`` k when one request returns all k (``n``);
    ``earlier`` the figures of the last run in the run folder, for a run that sent nothing.
    """
    hourly = [p for p in prices if p.kind == "hourly"]
    token = [p for p in prices if p.kind == "tokens"]
    sp = totals.spend
    reading, country, kwh_item, kwh_how = _teacher_energy(
        local=local,
        energy=energy,
        energy_cfg=energy_cfg,
        prices=prices,
        totals=totals,
        billed=ledger.billed,
        samples=samples,
        answers_per_request=answers_per_request,
        earlier=earlier,
    )
    usd_item, usd_how = _usd_per_item(prices=prices, totals=totals, items_per_s=items_per_s, earlier=earlier)
    tokens = totals.client.tokens_in + totals.client.tokens_out
    mtok, mtok_how = None, None
    if hourly and not token and sp.busy_s > 0 and tokens:  # the hardware rate as a token price, to set beside an API's
        mtok = sp.hourly_usd / (tokens / 1e6)
        mtok_how = f"measured: {sp.busy_s:.0f} busy s x ${hourly[0].usd_per_hour:g}/h over {tokens:,} tokens"
    return TeacherBill(
        teacher_usd=sp.spent_usd,
        teacher_usd_method=_usd_method(ledger, prices, sp.busy_s),
        teacher_requests_billed=ledger.billed,
        teacher_attempts=ledger.attempts,
        teacher_usd_failed_attempts=ledger.failed_billed_usd,
        teacher_busy_s=sp.busy_s,
        teacher_prices=[p.describe() for p in prices],
        teacher_self_hosted=bool(hourly) or (local and not token),
        teacher_tokens_counted=totals.client.tokens_counted,
        teacher_kwh=reading.kwh,
        teacher_gco2=reading.gco2,
        teacher_energy_s=round(reading.duration_s, 2),
        teacher_kwh_method=reading.method,
        teacher_gco2_method=reading.method,
        teacher_grid_country=country,
        teacher_grid_gco2_per_kwh=grid_intensity(country),
        teacher_kwh_per_item=kwh_item,
        teacher_kwh_per_item_method=kwh_how,
        teacher_usd_per_item=usd_item,
        teacher_usd_per_item_method=usd_how,
        teacher_usd_per_mtok_equivalent=mtok,
        teacher_usd_per_mtok_equivalent_method=mtok_how,
    )


@dataclass(frozen=True)
class StudentSpeed:
    """The student as measured on gold: items/s (batched) and kWh per item, with how."""

    items_per_s: Optional[float]
    kwh_per_item: Optional[float]
    kwh_method: str


def projection(
    *,
    bill: TeacherBill,
    speed: TeacherSpeed,
    student: StudentSpeed,
    reference: ReferenceDeployment,
    energy: EnergyConfig,
    pricing: PricingConfig,
    concurrency: int,
) -> Projection:
    """$, hours, kWh and kg CO2 per 1M items for teacher and student, here and on the reference deployment."""
    here_gi = grid_intensity(energy.country_iso_code)
    ref_gi = grid_intensity(reference.country_iso_code)
    rate = pricing.hardware_usd_per_hour
    t_ips = speed.teacher_items_per_s
    t_hours = M / t_ips / 3600 if t_ips else None
    t_usd = bill.teacher_usd_per_item * M if bill.teacher_usd_per_item is not None else None
    t_kwh = bill.teacher_kwh_per_item * M if bill.teacher_kwh_per_item is not None else None
    t_gi = bill.teacher_grid_gco2_per_kwh or here_gi
    s_ips = student.items_per_s
    s_hours = M / s_ips / 3600 if s_ips else None
    s_usd = s_hours * rate if s_hours is not None else None
    s_kwh = student.kwh_per_item * M if student.kwh_per_item is not None else None
    t_kg = t_kwh * t_gi / 1000 if t_kwh is not None else None
    s_kg = s_kwh * here_gi / 1000 if s_kwh is not None else None

    ref_how = (
        f"{reference.name}: ${reference.usd_per_hour:g}/h, {reference.power_kw:g} kW, {{f:g}}x this machine's "
        f"measured items/s (assumed, reference.*), {ref_gi:.0f} gCO2e/kWh ({reference.country_iso_code} grid)"
    )

    def on_reference(hours: Optional[float], factor: float) -> tuple[Optional[float], ...]:
        rh = hours / factor if hours is not None else None
        kwh = rh * reference.power_kw if rh is not None else None
        return (
            rh,
            rh * reference.usd_per_hour if rh is not None else None,
            kwh,
            kwh * ref_gi / 1000 if kwh is not None else None,
        )

    if bill.teacher_self_hosted:
        rt = on_reference(t_hours, reference.teacher_throughput_factor)
        rt_how = ref_how.format(f=reference.teacher_throughput_factor)
    else:  # an API costs the same wherever distill runs
        rt, rt_how = (t_hours, t_usd, t_kwh, t_kg), "remote API: same price, speed and energy as measured here"
    rs = on_reference(s_hours, reference.student_throughput_factor)
    return Projection(
        reference_name=reference.name,
        hardware_name=pricing.hardware_name,
        hardware_usd_per_hour=rate,
        grid_gco2_per_kwh=here_gi,
        reference_grid_gco2_per_kwh=ref_gi,
        teacher_usd_per_1m=t_usd,
        teacher_usd_per_1m_method=bill.teacher_usd_per_item_method,
        teacher_hours_per_1m=t_hours,
        teacher_hours_per_1m_method=(
            f"1M / measured {t_ips:.2f} items/s ({speed.teacher_speed_source}), at concurrency {concurrency}"
            if t_ips
            else "teacher speed not measured"
        ),
        teacher_kwh_per_1m=t_kwh,
        teacher_kwh_per_1m_method=bill.teacher_kwh_per_item_method,
        teacher_kgco2_per_1m=t_kg,
        teacher_kgco2_per_1m_method=f"kWh x {t_gi:.0f} gCO2e/kWh ({bill.teacher_grid_country} grid)",
        student_hours_per_1m=s_hours,
        student_hours_per_1m_method=(
            f"1M / measured {s_ips:.1f} items/s (batched, on gold)" if s_ips else "student speed not measured"
        ),
        student_usd_per_1m=s_usd,
        student_usd_per_1m_method=f"hours x ${rate:g}/h ({pricing.hardware_name}, pricing.hardware_usd_per_hour)",
        student_kwh_per_1m=s_kwh,
        student_kwh_per_1m_method=student.kwh_method,
        student_kgco2_per_1m=s_kg,
        student_kgco2_per_1m_method=f"kWh x {here_gi:.0f} gCO2e/kWh ({energy.country_iso_code} grid)",
        ref_teacher_hours_per_1m=rt[0],
        ref_teacher_usd_per_1m=rt[1],
        ref_teacher_kwh_per_1m=rt[2],
        ref_teacher_kgco2_per_1m=rt[3],
        ref_teacher_method=rt_how,
        ref_student_hours_per_1m=rs[0],
        ref_student_usd_per_1m=rs[1],
        ref_student_kwh_per_1m=rs[2],
        ref_student_kgco2_per_1m=rs[3],
        ref_student_method=ref_how.format(f=reference.student_throughput_factor),
        cost_ratio_per_1m=_ratio(t_usd, s_usd),
        time_ratio_per_1m=_ratio(t_hours, s_hours),
        co2_ratio_per_1m=_ratio(t_kg, s_kg),
        ref_cost_ratio_per_1m=_ratio(rt[1], rs[1]),
        ref_time_ratio_per_1m=_ratio(rt[0], rs[0]),
        ref_co2_ratio_per_1m=_ratio(rt[3], rs[3]),
    )


def _f(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "n/a"
    if unit == "$":
        return f"${x:,.2f}" if x >= 1 else (f"${x:.4f}" if x >= 1e-4 else f"${x:.2e}")
    if abs(x) >= 100:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 1:
        return f"{x:.2f}{unit}"
    return f"{x:.3g}{unit}"


def _x(x: Optional[float]) -> str:
    return f"{x:,.0f}x" if x is not None and x >= 10 else (f"{x:.2f}x" if x is not None else "n/a")


def cost_table(s: dict[str, Any]) -> str:
    """This run's bill and the per-1M projection as markdown, with every method listed below."""
    lines = [
        "| this run | USD | kWh | gCO2e |",
        "|---|---|---|---|",
        f"| teacher ({s.get('teacher_requests_billed', 'n/a')} billed attempts) | {_f(s.get('teacher_usd'), '$')} | "
        f"{_f(s.get('teacher_kwh'))} | {_f(s.get('teacher_gco2'))} |",
        f"| student training | {_f(s.get('student_train_usd'), '$')} | {_f(s.get('student_train_kwh'))} | "
        f"{_f(s.get('student_train_gco2'))} |",
        *(
            [
                f"Self-hosted teacher: ${s['teacher_usd_per_mtok_equivalent']:.4f} per 1M tokens at the throughput "
                f"measured "
                f"in this run ({s.get('teacher_usd_per_mtok_equivalent_method')})."
            ]
            if s.get("teacher_usd_per_mtok_equivalent")
            else []
        ),
        "",
        "| per 1M items | USD | hours | kg CO2e |",
        "|---|---|---|---|",
        f"| teacher, as run here | {_f(s.get('teacher_usd_per_1m'), '$')} | {_f(s.get('teacher_hours_per_1m'))} | "
        f"{_f(s.get('teacher_kgco2_per_1m'))} |",
        f"| student, {s.get('hardware_name', 'this machine')} | {_f(s.get('student_usd_per_1m'), '$')} | "
        f"{_f(s.get('student_hours_per_1m'))} | {_f(s.get('student_kgco2_per_1m'))} |",
        f"| **teacher / student** | **{_x(s.get('cost_ratio_per_1m'))}** | **{_x(s.get('time_ratio_per_1m'))}** | "
        f"**{_x(s.get('co2_ratio_per_1m'))}** |",
        f"| teacher, reference deployment | {_f(s.get('ref_teacher_usd_per_1m'), '$')} | "
        f"{_f(s.get('ref_teacher_hours_per_1m'))} | {_f(s.get('ref_teacher_kgco2_per_1m'))} |",
        f"| student, reference deployment | {_f(s.get('ref_student_usd_per_1m'), '$')} | "
        f"{_f(s.get('ref_student_hours_per_1m'))} | {_f(s.get('ref_student_kgco2_per_1m'))} |",
        f"| **teacher / student (reference)** | **{_x(s.get('ref_cost_ratio_per_1m'))}** | "
        f"**{_x(s.get('ref_time_ratio_per_1m'))}** | **{_x(s.get('ref_co2_ratio_per_1m'))}** |",
        "",
        "Methods:",
    ]
    for k in (
        "teacher_usd_method",
        "teacher_kwh_method",
        "student_train_kwh_method",
        "teacher_usd_per_1m_method",
        "teacher_hours_per_1m_method",
        "teacher_kwh_per_1m_method",
        "teacher_kgco2_per_1m_method",
        "student_usd_per_1m_method",
        "student_hours_per_1m_method",
        "student_kwh_per_1m_method",
        "student_kgco2_per_1m_method",
        "ref_teacher_method",
        "ref_student_method",
    ):
        if s.get(k):
            lines.append(f"- {k.replace('_method', '')}: {s[k]}")
    return "\n".join(lines)


def cost_chart(s: dict[str, Any], path: str | Path) -> str:
    """Bar chart (log scale) of USD and kg CO2e per 1M items, teacher vs student, here and on the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    groups = ["this machine", "reference"]
    for ax, (metric, title) in zip(
        axes, [("usd_per_1m", "USD per 1M items"), ("kgco2_per_1m", "kg CO2e per 1M items")]
    ):
        t = [s.get(f"teacher_{metric}"), s.get(f"ref_teacher_{metric}")]
        st = [s.get(f"student_{metric}"), s.get(f"ref_student_{metric}")]
        xs = range(len(groups))
        w = 0.38
        ax.bar([x - w / 2 for x in xs], [v or 0 for v in t], w, label="teacher", color="#c0504d")
        ax.bar([x + w / 2 for x in xs], [v or 0 for v in st], w, label="student", color="#4f81bd")
        for x, v in zip(xs, t):
            ax.text(
                x - w / 2, v or 0, _f(v, "$" if metric.startswith("usd") else ""), ha="center", va="bottom", fontsize=7
            )
        for x, v in zip(xs, st):
            ax.text(
                x + w / 2, v or 0, _f(v, "$" if metric.startswith("usd") else ""), ha="center", va="bottom", fontsize=7
            )
        if any(v for v in t + st):
            ax.set_yscale("log")
        ax.set_xticks(list(xs), groups)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("teacher vs student, projected from this run (energy: codecarbon estimates)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
