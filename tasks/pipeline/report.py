"""The run's report as people read it: the annotation summary as a markdown table and as terminal lines.

The figures come from the typed results through tasks/pipeline/summary.py (where they get
their keys); this module only renders them.
"""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.001:
            return f"{v:.3g}"  # per-item costs and energies are tiny; keep their digits
        return f"{v:.4f}" if v < 10 else f"{v:,.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items())
    return str(v)


def markdown_summary(summary: dict[str, Any], title: str = "distill annotation summary") -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, dict) and k in ("data_pool", "data_gold", "status_counts"):
            continue
        lines.append(f"| {k} | {_fmt(v)} |")
    for k in ("data_pool", "data_gold"):
        if isinstance(summary.get(k), dict):
            d = summary[k]
            lines.append(
                f"| {k} | rows {d.get('rows_read')}, items {d.get('items')}, empty {d.get('empty_text')}, "
                f"dup ids {d.get('duplicate_ids')}, dup texts {d.get('duplicate_texts')}, "
                f"bad utf-8 {d.get('invalid_utf8')} |"
            )
    return "\n".join(lines) + "\n"


def terminal_summary(summary: dict[str, Any]) -> str:
    keys = [
        "items",
        "votes",
        "invalid_votes",
        "failed_votes",
        "abstained",
        "low_agreement",
        "requests_sent",
        "requests_cached",
        "tokens_in",
        "tokens_out",
        "wall_s",
        "teacher_items_per_s",
        "gold_items_scored",
        "teacher_accuracy_single",
        "teacher_accuracy_voted",
        "teacher_macro_f1_voted",
        "teacher_coverage_voted",
        "teacher_speed_source",
        "teacher_accuracy_by_agreement",
        "agreement_histogram",
        "teacher_label_distribution",
        "teacher_label_distribution_on_gold",
        "gold_label_distribution",
        "plan_requests",
        "plan_usd",
        "teacher_usd",
        "teacher_usd_failed_attempts",
        "teacher_kwh",
        "teacher_gco2",
        "teacher_usd_per_item",
        "stage_seconds",
    ]
    width = max(len(k) for k in keys)
    out = []
    for k in keys:
        if k in summary:
            out.append(f"  {k:<{width}}  {_fmt(summary[k])}")
    return "\n".join(out)
