"""What the teacher and the student cost: this run's bill and a projection to 1M items.

Why one place: the case for distilling is a ratio (teacher $ and CO2 per 1M items over
the student's), and a ratio is only as honest as its weakest figure. Every figure here is
built from this run's measurements (spend from the attempt ledger, items/s, codecarbon
energy) and carries a ``*_method`` string that says whether it was measured, estimated
from a configured assumption, or carried over from an earlier run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

from distill.config import DistillConfig, EnergyConfig, PricingConfig
from tasks.accounting.carbon import EnergyReading, grid_intensity, measure_energy, remote_teacher_energy
from tasks.accounting.pricing import TeacherPrice

M = 1_000_000


@contextlib.contextmanager
def training_cost(energy: EnergyConfig, pricing: PricingConfig) -> Iterator[dict[str, Any]]:
    """Measure the ``with`` block as the student's training; the yielded dict is filled when it ends.

    kWh and gCO2e come from codecarbon, dollars from the measured seconds at the configured
    hardware rate, each with its ``*_method``.
    """
    figures: dict[str, Any] = {}
    with measure_energy("student-train", energy.country_iso_code, energy.measure, energy.cpu_power_w,
                        energy.measure_power_secs) as reading:
        yield figures
    figures.update(reading.as_dict("student_train"))
    figures["student_train_usd"] = pricing.hardware_usd_per_hour * reading.duration_s / 3600
    figures["student_train_usd_method"] = (f"measured {reading.duration_s:.0f} s x ${pricing.hardware_usd_per_hour:g}/h "
                                           f"({pricing.hardware_name})")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def teacher_costs(cfg: DistillConfig, prices: list[TeacherPrice], shards: list[dict[str, Any]],
                  ledger: list[dict[str, Any]], energy: EnergyReading, items: int,
                  teacher_items_per_s: Optional[float], previous: Optional[dict[str, Any]] = None,
                  answers_per_request: int = 1) -> dict[str, Any]:
    """This run's teacher bill (USD, kWh, gCO2e) and per-item figures for the 1M projection.

    ``shards`` are the annotate-shard results, ``ledger`` the run's attempts grouped by
    :meth:`ResponseCache.ledger_usage`, ``energy`` the codecarbon reading taken while the
    local teacher served (other teachers' energy is estimated), ``items`` the items of the
    shards annotated now, ``answers_per_request`` k when one request returns all k (``n``).
    """
    k = cfg.teacher.samples
    hourly = [p for p in prices if p.kind == "hourly"]
    token = [p for p in prices if p.kind == "tokens"]

    def total(key: str) -> float:
        return sum(float(r.get(key, 0.0) or 0.0) for r in shards)

    spent, token_spent, hourly_spent, busy_s = total("spent_usd"), total("token_usd"), total("hourly_usd"), total("busy_s")
    attempts = sum(g["attempts"] for g in ledger)
    billed = sum(g["attempts"] for g in ledger if g["ok"] or g["usage_source"])
    failed_billed = [g for g in ledger if not g["ok"] and g["usage_source"]]
    by_model = {p.model: p for p in prices}
    retries_usd = sum(by_model[g["model"]].token_cost(g["tokens_in"], g["tokens_out"], g["attempts"])
                      for g in failed_billed if g["model"] in by_model)
    src = {s_: sum(g["attempts"] for g in ledger if g["ok"] and g["usage_source"] == s_)
           for s_ in ("reported", "counted", "estimated")}
    parts = []
    if token:
        parts.append(f"token usage of all {attempts:,} attempts (retries, invalid answers and billed failures included; "
                     f"usage {src['reported']:,} reported by the server, {src['counted']:,} counted with the teacher's "
                     f"tokenizer, {src['estimated']:,} estimated) x " + "; ".join(p.describe() for p in token))
    if hourly:
        parts.append(f"{busy_s / 3600:.4f} busy hours x " + "; ".join(p.describe() for p in hourly))
    if not parts:
        parts.append("; ".join(p.describe() for p in prices))
    kind = "partly estimated" if src["estimated"] else "measured"
    out: dict[str, Any] = {
        "teacher_usd": spent, "teacher_usd_method": f"{kind}: " + " + ".join(parts),
        "teacher_requests_billed": billed, "teacher_attempts": attempts, "teacher_usd_failed_attempts": retries_usd,
        "teacher_busy_s": busy_s, "teacher_prices": [p.describe() for p in prices],
        "teacher_self_hosted": bool(hourly) or (cfg.teacher.local and not token),
        "teacher_tokens_counted": int(total("tokens_counted")),
    }
    tokens = int(total("tokens_in") + total("tokens_out"))
    if hourly and not token and busy_s > 0 and tokens:
        # the hardware rate as a token price, to set beside an API's
        out["teacher_usd_per_mtok_equivalent"] = hourly_spent / (tokens / 1e6)
        out["teacher_usd_per_mtok_equivalent_method"] = (f"measured: {busy_s:.0f} busy s x "
                                                          f"${hourly[0].usd_per_hour:g}/h over {tokens:,} tokens")

    answers_sent = int(total("requests_ok")) * answers_per_request
    tokens_out = int(total("tokens_out"))
    if cfg.teacher.local:  # it serves on this machine: measured while it served
        country = cfg.energy.country_iso_code
        out.update(energy.as_dict("teacher"))
        kwh_item = energy.kwh / (answers_sent / k) if energy.kwh is not None and answers_sent else None
        how = f"{energy.method}, over {answers_sent:,} answers sent in this run"
        if kwh_item is None and previous and previous.get("teacher_kwh_per_item") is not None:
            kwh_item, how = previous["teacher_kwh_per_item"], "from an earlier run (no answer sent now)"
    else:
        country = cfg.energy.remote_country_iso_code
        p0 = token[0] if token else prices[0]
        per_req = p0.kwh_per_request if p0.kwh_per_request is not None else cfg.energy.remote_kwh_per_request
        per_1k = (p0.kwh_per_1k_output_tokens if p0.kwh_per_1k_output_tokens is not None
                  else cfg.energy.remote_kwh_per_1k_output_tokens)
        est = remote_teacher_energy(billed, tokens_out, per_req, per_1k, country)
        out.update(est.as_dict("teacher"))
        if per_1k is None:  # per request: k / answers_per_request requests per item
            kwh_item = per_req * k / answers_per_request
            how = est.method
        else:
            kwh_item = est.kwh / (answers_sent / k) if est.kwh is not None and answers_sent else None
            how = est.method
    out["teacher_grid_country"] = country
    out["teacher_grid_gco2_per_kwh"] = grid_intensity(country)
    out["teacher_kwh_per_item"] = kwh_item
    out["teacher_kwh_per_item_method"] = how

    usd_item: Optional[float] = 0.0
    usd_how: list[str] = []
    if token:
        answers_usd, fresh = total("answers_usd"), total("fresh_answers_usd")
        overhead = token_spent / fresh if fresh > 0 else 1.0
        if items:
            usd_item = answers_usd * overhead / items
            usd_how.append(f"projected from this run: token usage of the {items:,} items' answers x price x "
                           f"{overhead:.3f} (attempts billed per answer"
                           f"{' in this run' if fresh > 0 else '; nothing sent this run, taken as 1'})")
        elif previous and previous.get("teacher_usd_per_item") is not None:
            usd_item, usd_how = previous["teacher_usd_per_item"], ["from an earlier run (no shard annotated now)"]
        else:
            usd_item = None
    if hourly and usd_item is not None:
        rate = sum(p.usd_per_hour for p in hourly) / len(hourly)
        if teacher_items_per_s:
            usd_item += rate / 3600 / teacher_items_per_s
            usd_how.append(f"projected from this run: ${rate:g}/h / measured {teacher_items_per_s:.3f} items/s")
        else:
            usd_item = None
    out["teacher_usd_per_item"] = usd_item
    out["teacher_usd_per_item_method"] = "; ".join(usd_how) or ("free" if usd_item == 0 else "not measured")
    out["teacher_gco2_method"] = out["teacher_kwh_method"]
    return out


def projection(cfg: DistillConfig, ann: dict[str, Any], student_items_per_s: Optional[float],
               student_kwh_per_item: Optional[float], student_kwh_method: str) -> dict[str, Any]:
    """$, hours and kg CO2 per 1M items for teacher and student, here and on the reference deployment."""
    ref = cfg.reference
    here_gi = grid_intensity(cfg.energy.country_iso_code)
    ref_gi = grid_intensity(ref.country_iso_code)
    rate = cfg.pricing.hardware_usd_per_hour
    here = cfg.pricing.hardware_name
    out: dict[str, Any] = {"reference_name": ref.name, "hardware_name": here, "hardware_usd_per_hour": rate,
                           "grid_gco2_per_kwh": here_gi, "reference_grid_gco2_per_kwh": ref_gi}

    # teacher, as measured in this run
    t_ips = ann.get("teacher_items_per_s")
    t_hours = M / t_ips / 3600 if t_ips else None
    t_usd_item = ann.get("teacher_usd_per_item")
    t_kwh_item = ann.get("teacher_kwh_per_item")
    t_gi = ann.get("teacher_grid_gco2_per_kwh") or here_gi
    out.update({
        "teacher_usd_per_1m": t_usd_item * M if t_usd_item is not None else None,
        "teacher_usd_per_1m_method": ann.get("teacher_usd_per_item_method", "no cost measured"),
        "teacher_hours_per_1m": t_hours,
        "teacher_hours_per_1m_method": f"1M / measured {t_ips:.2f} items/s ({ann.get('teacher_speed_source')}), "
                                       f"at concurrency {cfg.client.concurrency}" if t_ips else "teacher speed not measured",
        "teacher_kwh_per_1m": t_kwh_item * M if t_kwh_item is not None else None,
        "teacher_kwh_per_1m_method": ann.get("teacher_kwh_per_item_method", "not measured"),
    })
    out["teacher_kgco2_per_1m"] = out["teacher_kwh_per_1m"] * t_gi / 1000 if out["teacher_kwh_per_1m"] is not None else None
    out["teacher_kgco2_per_1m_method"] = f"kWh x {t_gi:.0f} gCO2e/kWh ({ann.get('teacher_grid_country', cfg.energy.country_iso_code)} grid)"

    # student on this machine
    s_hours = M / student_items_per_s / 3600 if student_items_per_s else None
    out.update({
        "student_hours_per_1m": s_hours,
        "student_hours_per_1m_method": f"1M / measured {student_items_per_s:.1f} items/s (batched, on gold)"
        if student_items_per_s else "student speed not measured",
        "student_usd_per_1m": s_hours * rate if s_hours is not None else None,
        "student_usd_per_1m_method": f"hours x ${rate:g}/h ({here}, pricing.hardware_usd_per_hour)",
        "student_kwh_per_1m": student_kwh_per_item * M if student_kwh_per_item is not None else None,
        "student_kwh_per_1m_method": student_kwh_method,
    })
    out["student_kgco2_per_1m"] = (out["student_kwh_per_1m"] * here_gi / 1000
                                   if out["student_kwh_per_1m"] is not None else None)
    out["student_kgco2_per_1m_method"] = f"kWh x {here_gi:.0f} gCO2e/kWh ({cfg.energy.country_iso_code} grid)"

    # the reference deployment (assumed throughput factor, price and power)
    ref_how = (f"{ref.name}: ${ref.usd_per_hour:g}/h, {ref.power_kw:g} kW, {{f:g}}x this machine's measured items/s "
               f"(assumed, reference.*), {ref_gi:.0f} gCO2e/kWh ({ref.country_iso_code} grid)")
    def on_reference(who: str, hours: Optional[float], factor: float) -> None:
        rh = hours / factor if hours is not None else None
        kwh = rh * ref.power_kw if rh is not None else None
        out.update({f"ref_{who}_hours_per_1m": rh, f"ref_{who}_usd_per_1m": rh * ref.usd_per_hour if rh is not None else None,
                    f"ref_{who}_kwh_per_1m": kwh, f"ref_{who}_kgco2_per_1m": kwh * ref_gi / 1000 if kwh is not None else None,
                    f"ref_{who}_method": ref_how.format(f=factor)})

    if ann.get("teacher_self_hosted"):
        on_reference("teacher", t_hours, ref.teacher_throughput_factor)
    else:  # an API costs the same wherever distill runs
        out.update({k.replace("teacher_", "ref_teacher_", 1): out[k] for k in
                    ("teacher_hours_per_1m", "teacher_usd_per_1m", "teacher_kwh_per_1m", "teacher_kgco2_per_1m")})
        out["ref_teacher_method"] = "remote API: same price, speed and energy as measured here"
    on_reference("student", s_hours, ref.student_throughput_factor)

    for pre in ("", "ref_"):
        out[f"{pre}cost_ratio_per_1m"] = _ratio(out[f"{pre}teacher_usd_per_1m"], out[f"{pre}student_usd_per_1m"])
        out[f"{pre}time_ratio_per_1m"] = _ratio(out[f"{pre}teacher_hours_per_1m"], out[f"{pre}student_hours_per_1m"])
        out[f"{pre}co2_ratio_per_1m"] = _ratio(out[f"{pre}teacher_kgco2_per_1m"], out[f"{pre}student_kgco2_per_1m"])
    out["cost_ratio_per_1m_method"] = "teacher_usd_per_1m / student_usd_per_1m (both on this machine's figures)"
    out["co2_ratio_per_1m_method"] = "teacher_kgco2_per_1m / student_kgco2_per_1m"
    return out


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
        *([f"Self-hosted teacher: ${s['teacher_usd_per_mtok_equivalent']:.4f} per 1M tokens at the throughput measured "
           f"in this run ({s.get('teacher_usd_per_mtok_equivalent_method')})."]
          if s.get("teacher_usd_per_mtok_equivalent") else []),
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
    for k in ("teacher_usd_method", "teacher_kwh_method", "student_train_kwh_method", "teacher_usd_per_1m_method",
              "teacher_hours_per_1m_method", "teacher_kwh_per_1m_method", "teacher_kgco2_per_1m_method",
              "student_usd_per_1m_method", "student_hours_per_1m_method", "student_kwh_per_1m_method",
              "student_kgco2_per_1m_method", "ref_teacher_method", "ref_student_method"):
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
    for ax, (metric, title) in zip(axes, [("usd_per_1m", "USD per 1M items"), ("kgco2_per_1m", "kg CO2e per 1M items")]):
        t = [s.get(f"teacher_{metric}"), s.get(f"ref_teacher_{metric}")]
        st = [s.get(f"student_{metric}"), s.get(f"ref_student_{metric}")]
        xs = range(len(groups))
        w = 0.38
        ax.bar([x - w / 2 for x in xs], [v or 0 for v in t], w, label="teacher", color="#c0504d")
        ax.bar([x + w / 2 for x in xs], [v or 0 for v in st], w, label="student", color="#4f81bd")
        for x, v in zip(xs, t):
            ax.text(x - w / 2, v or 0, _f(v, "$" if metric.startswith("usd") else ""), ha="center", va="bottom", fontsize=7)
        for x, v in zip(xs, st):
            ax.text(x + w / 2, v or 0, _f(v, "$" if metric.startswith("usd") else ""), ha="center", va="bottom", fontsize=7)
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
