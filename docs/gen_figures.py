"""Render docs/measurements.md's tables and the docs' plots from the committed figures in bench/figures/*.json.

No bench is rerun: the JSON files are the measurements (each with its date, commit, command and machine), this
script only draws them. In docs/measurements.md every block between

    <!-- BEGIN generated: NAME -->
    <!-- END generated: NAME -->

is replaced by the table of bench/figures/NAME.json (or of the few NAMEs below that combine files), with the line
"Measured DATE at COMMIT: `COMMAND`"; everything outside the markers is left as written.

    .venv/bin/python docs/gen_figures.py            # rewrite docs/measurements.md and the plots (`make figures`)
    .venv/bin/python docs/gen_figures.py --no-plots # the tables only

``render(text)`` returns the page with its blocks rendered (tests/test_docs.py checks the committed page is its
own rendering); ``draw_plots()`` writes the PNGs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIGURES = REPO / "bench" / "figures"
PAGE = REPO / "docs" / "measurements.md"
BLOCK = re.compile(r"(<!-- BEGIN generated: ([\w-]+) -->\n)(.*?)(<!-- END generated: \2 -->)", re.DOTALL)


def load(name: str) -> dict[str, Any]:
    return json.loads((FIGURES / f"{name}.json").read_text(encoding="utf-8"))


def provenance(rec: dict[str, Any]) -> list[str]:
    """'Measured DATE at COMMIT: `COMMAND`', the machine, and a stale warning where the date was never recorded."""
    when = rec.get("date") or "(date not recorded)"
    at = f"at {rec['commit']}" if rec.get("commit") else "(commit not recorded)"
    how = f"`{rec['command']}`" if rec.get("command") else "no command recorded"
    line = f"Measured {when} {at}: {how}"
    if rec.get("machine"):
        line += f" ({rec['machine']})."
    lines = [line]
    if not rec.get("date"):
        since = f"; in the README since {rec['documented_in']}" if rec.get("documented_in") else ""
        lines += ["", f"**Stale:** no date recorded{since}; not re-measured on the current code."]
    return lines


def md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _notes(rec: dict[str, Any]) -> list[str]:
    return ["", *(f"- {n}" for n in rec.get("notes") or [])] if rec.get("notes") else []


def generic(name: str) -> list[str]:
    rec = load(name)
    lines = [*provenance(rec), ""]
    if rec.get("setup"):
        lines += [f"Set-up: {rec['setup']}.", ""]
    return lines + md_table(rec["columns"], rec["rows"]) + _notes(rec)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _gap(x: float) -> str:
    return f"{100 * x:+.1f}"


def _by_seed(points: dict[str, dict[str, Any]], n: str) -> list[tuple[int, dict[str, Any]]]:
    return sorted((int(k.split("/")[1]), p) for k, p in points.items() if k.split("/")[0] == n)


def label_curve(name: str = "label_curve") -> list[str]:
    from bench.label_curve import summarise

    rec = load(name)
    summary = summarise(rec["points"])
    seeds = sorted({int(k.split("/")[1]) for k in rec["points"]})
    teacher = {r["teacher_macro_f1_voted_mean"] for r in summary.values()}
    lines = [
        *provenance(rec),
        "",
        f"Set-up: {len(rec['points'])} whole `distill run`s of `{rec['config']}` with llama-server as the teacher, "
        "only `data.pool_limit` and `student.seed` changed, every answer asked once through the shared cache; each "
        f"point keeps its own date and commit in `bench/figures/{name}.json`. Teacher "
        + ", ".join(_pct(t) for t in sorted(teacher))
        + " on the 300-item gold subset at every point; student macro-F1 on the same subset, mean ± standard "
        f"deviation over seeds {', '.join(map(str, seeds))}. Target: within {rec['target_points']} points of the "
        "teacher.",
        "",
    ]
    rows = []
    for n, r in summary.items():
        per_seed = " / ".join(_gap(p["gap_on_subset"]) for _, p in _by_seed(rec["points"], n))
        sd = r["student_macro_f1_on_teacher_subset_std"]
        rows.append(
            [
                f"{int(n):,}",
                f"{r['train_items_mean']:,.0f}",
                _pct(r["student_macro_f1_on_teacher_subset_mean"]) + (f" ± {100 * sd:.1f}" if sd is not None else ""),
                _pct(r["student_macro_f1_mean"]),
                _gap(r["gap_on_subset_mean"]),
                per_seed,
            ]
        )
    seeds_col = f"seeds {' / '.join(map(str, seeds))} (gap)"
    columns = ["pool items (k=1)", "training labels", "student (subset)", "student (all 1,000 gold)", "gap on subset"]
    return lines + md_table([*columns, seeds_col], rows) + _notes(rec)


def student_recipe() -> list[str]:
    """The student's recipe variants on the same votes: chosen on the dev split, gold shown beside it."""
    from bench.student_recipe import COLUMNS, summarise

    rec = load("student_recipe")
    summary = summarise(rec["points"])
    best = max(summary, key=lambda n: summary[n]["dev_mean"])
    rows = []
    for name, r in sorted(summary.items(), key=lambda kv: -kv[1]["dev_mean"]):
        sets = ", ".join(f"`{k}={v}`" for k, v in rec["variants"][name].items())
        cells = [f"{r[f'{c}_mean']:.1f} ± {r[f'{c}_std'] or 0:.1f}" for c in COLUMNS]
        cells[0] = f"**{cells[0]}**" if name == best else cells[0]
        rows.append([name, sets, str(r["seeds"]), *cells])
    lines = [*provenance(rec), "", f"Set-up: {rec['setup']}.", ""] if rec.get("setup") else [*provenance(rec), ""]
    columns = ["variant", "student.* set", "seeds", "dev (chosen on)", "all gold", "teacher's gold subset"]
    return lines + md_table(columns, rows) + _notes(rec)


def other_data() -> list[str]:
    """The demo config at 1,500 pool items on each corpus: tweets, amazon, and the label curve's 1,500 point."""
    from bench.label_curve import summarise

    lines: list[str] = []
    rows = []
    for name in ("tweets_1500", "amazon_1500", "label_curve"):
        rec = load(name)
        if name != "label_curve":
            lines += [*provenance(rec), ""]
        r = summarise(rec["points"])["1500"]
        before = f"{name}_lr2e-4"
        was = (
            summarise(load(before)["points"])["1500"]["gap_on_subset_mean"]
            if (FIGURES / f"{before}.json").exists()
            else None
        )
        gap = round(100 * r["gap_on_subset_mean"], 1)
        target = rec["target_points"]
        verdict = "met" if gap >= -target else f"missed by {-gap - target:.1f}"
        per_seed = " / ".join(_gap(p["gap_on_subset"]) for _, p in _by_seed(rec["points"], "1500"))
        rows.append(
            [
                rec["name"],
                _pct(r["teacher_macro_f1_voted_mean"]),
                f"{_pct(r['student_macro_f1_on_teacher_subset_mean'])} ± "
                f"{100 * r['student_macro_f1_on_teacher_subset_std']:.1f}",
                _pct(r["student_macro_f1_mean"]),
                f"**{gap:+.1f}** ({per_seed})",
                f"within {target} points: {verdict}",
                _gap(was) if was is not None else "",
            ]
        )
    lines += [
        "The movie row is the label curve's 1,500-item point (above). 1,500 pool items, llama-server teacher, "
        "macro-F1 on the 300-item gold subset.",
        "",
    ]
    columns = ["data", "teacher", "student (subset, mean ± sd)", "student (all gold)", "gap (per seed)", "target"]
    columns.append("gap at learning rate 2e-4 (before)")
    return lines + md_table(columns, rows)


def uncertainty_selection() -> list[str]:
    rec = load("uncertainty_selection")
    curves = rec["curves"]
    rows = []
    for r, u in zip(curves["random"], curves["uncertainty"]):
        a, b = r["student_macro_f1"], u["student_macro_f1"]
        cells = [_pct(a), _pct(b)]
        if a != b:
            best = 0 if a > b else 1
            cells[best] = f"**{cells[best]}**"
        rows.append([str(r.get("night", "")), f"{r['requests_spent']:,}", *cells])
    lines = [*provenance(rec), "", f"Set-up: {rec['setup']}.", ""]
    columns = ["night", "teacher requests so far", "random", "uncertainty (champion least sure)"]
    return lines + md_table(columns, rows) + _notes(rec)


SPECIAL: dict[str, Callable[[], list[str]]] = {
    "label_curve": label_curve,
    "label_curve_lr2e-4": lambda: label_curve("label_curve_lr2e-4"),
    "student_recipe": student_recipe,
    "other_data_1500": other_data,
    "uncertainty_selection": uncertainty_selection,
}


def block(name: str) -> str:
    if name in SPECIAL:
        lines = SPECIAL[name]()
    elif (FIGURES / f"{name}.json").exists():
        lines = generic(name)
    else:
        raise SystemExit(f"docs/measurements.md names a generated block {name!r}: no bench/figures/{name}.json")
    return "\n".join(lines) + "\n"


def render(text: str | None = None) -> str:
    """``text`` (default: docs/measurements.md) with every generated block rendered from bench/figures/."""
    source = PAGE.read_text(encoding="utf-8") if text is None else text
    return BLOCK.sub(lambda m: m.group(1) + "\n" + block(m.group(2)) + "\n" + m.group(4), source)


def draw_plots() -> list[Path]:
    """The plots from the JSON, with the benches' own plot functions (nothing is measured again)."""
    from bench import label_curve, uncertainty_selection

    paths = []
    for name in ("label_curve", "label_curve_lr2e-4"):
        curve = load(name)
        what = " ".join([Path(curve["config"]).name, *(x.split("=")[-1] for x in curve.get("sets", []))])
        paths.append(REPO / "docs" / f"{name}.png")
        label_curve.plot(label_curve.summarise(curve["points"]), paths[-1], what)
    paths.append(REPO / "docs" / "uncertainty_selection.png")
    uncertainty_selection.plot(load("uncertainty_selection")["curves"], paths[-1])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--no-plots", action="store_true", help="render the tables only")
    a = ap.parse_args()
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)}")
    for path in [] if a.no_plots else draw_plots():
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
