"""Nightly teacher budget: items the champion is least sure of vs items drawn at random, over simulated nights.

Two lineages of nightly runs on the demo data, each a real ``distill`` flow run (select,
annotate, aggregate, train, evaluate on human gold, register behind the gate) with its
own run folder (so its own ledger of labelled items) and its own registered model (so
its own champion). Every night each lineage may label ``--per-night`` new items of the
first ``--candidates`` pool items: ``random`` draws them at random, ``uncertainty`` takes
those its current champion scores lowest. The first night has no champion yet, so both
draw the same random items. Printed per night: teacher requests spent so far and the
student's macro-F1 on all 1,000 gold items; the curve goes to a PNG.

The candidates' answers are usually in the response cache already (bench/label_budget.py
asks the same k=1 prompts), so the teacher requests counted are those each lineage
would have paid for, whether or not this machine had to send them today.

    .venv/bin/python bench/uncertainty_selection.py [--nights 4] [--per-night 200] [--candidates 2400]
        [--out bench/figures/uncertainty_selection.json]   # the docs' figures (docs/gen_figures.py draws them)

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()

from bench import record  # noqa: E402
from bench.plotting import save_figure  # noqa: E402


def night(config: str, lineage: str, n: int, *, per_night: int, candidates: int, tracking: str) -> dict:
    from distill.config import load_config
    from flows.distillation import distill_flow

    cfg = load_config(
        config,
        [
            f"run_name=selection-{lineage}",
            "teacher.samples=1",
            f"data.pool_limit={candidates}",
            f"selection.strategy={lineage}",
            f"selection.max_new_items={per_night}",
            "selection.seed=7",
            f"tracking.tracking_uri={tracking}",
            f"tracking.model_name=selection-{lineage}",
            "gate.min_macro_f1=0.0",
            "energy.measure=false",
        ],
    )
    s = distill_flow(cfg, show_progress=False)
    k = cfg.teacher.samples
    out = {
        "night": n,
        "items_in_run": s["items"],
        "requests_spent": s["items"] * k,
        "student_macro_f1": s["student_macro_f1"],
        "student_macro_f1_on_teacher_subset": s["student_macro_f1_on_teacher_subset"],
        "promoted": s["promoted"],
        "selection_method": s.get("selection_method"),
    }
    print(
        f"night {n} {lineage:<11} {out['items_in_run']:>5} items labelled, {out['requests_spent']:>5} teacher "
        f"requests: "
        f"student macro-F1 {out['student_macro_f1']:.3f} on all gold ({'promoted' if out['promoted'] else 'kept'}) "
        f"[{out['selection_method']}]",
        flush=True,
    )
    return out


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, pts in curves.items():
        ax.plot([p["requests_spent"] for p in pts], [100 * p["student_macro_f1"] for p in pts], marker="o", label=name)
    ax.set_xlabel("teacher requests spent (cumulative)")
    ax.set_ylabel("student macro-F1 on 1,000 gold items")
    ax.set_title("Nightly budget: uncertainty vs random selection")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--nights", type=int, default=4)
    ap.add_argument("--per-night", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=2400)
    ap.add_argument("--png", default="bench/results/uncertainty_selection.png")
    ap.add_argument(
        "--out", help="also write the curves, dated, to this JSON (bench/figures/uncertainty_selection.json: the docs)"
    )
    a = ap.parse_args()
    tracking = f"sqlite:///{tempfile.mkdtemp(prefix='selection-')}/mlflow.db"
    for lineage in ("random", "uncertainty"):  # a fresh ledger per bench run
        import shutil

        shutil.rmtree(REPO / "runs" / f"selection-{lineage}", ignore_errors=True)
    curves: dict[str, list[dict]] = {"random": [], "uncertainty": []}
    for n in range(1, a.nights + 1):
        for lineage in curves:
            curves[lineage].append(
                night(a.config, lineage, n, per_night=a.per_night, candidates=a.candidates, tracking=tracking)
            )
    plot(curves, REPO / a.png)
    if a.out:
        record.write(
            a.out, {"nights": a.nights, "per_night": a.per_night, "candidates": a.candidates, "curves": curves}
        )
    last = {k: v[-1] for k, v in curves.items()}
    print(
        f"\nafter {a.nights} nights ({last['random']['requests_spent']:,} teacher requests each): random "
        f"{last['random']['student_macro_f1']:.3f}, uncertainty {last['uncertainty']['student_macro_f1']:.3f} "
        f"macro-F1 on gold; curve: {a.png}"
    )
    print(
        json.dumps(
            {"nights": a.nights, "per_night": a.per_night, "candidates": a.candidates, "curves": curves, "png": a.png}
        )
    )


if __name__ == "__main__":
    main()
