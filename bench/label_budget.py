"""Where a fixed teacher budget buys the most: k=1 vs k=3, hard vs soft labels, and the label curve.

Every configuration is a real ``distill`` flow run (annotate, aggregate, train,
evaluate on human gold) on the demo data with the local teacher, differing only by the
``--set`` overrides printed beside it. At the same number of pool requests R:

- k=1 labels R items; k=3 labels R/3 items (three distinct prompt variants each);
- hard: majority labels, no soft term: exactly what a run without log-probabilities
  gets (the greedy answers are the same with or without them, bench/teacher_throughput.py);
- soft: mean-probability labels and the teacher's label distribution as the target
  (``--soft``: soft weight 1, temperature 2 by default).

Then the curves: the student's macro-F1 gap to its teacher on the same gold subset against
the number of teacher-labelled items, hard and soft, saved as a PNG. The teacher of the
gap is the stricter of its single answer and its aggregate on that subset. Since
log-probabilities cost the local teacher time, the curves also answer the equal-time
question: compare soft at n items with hard at n x (speed without / with them).

Answers are cached, so variants shared between configurations are asked once (k=1's
sample is k=3's sample 0, a smaller pool is the start of a larger one).

    .venv/bin/python bench/label_budget.py [--requests 2400] [--curve 150 300 600 1200 2400]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()

from bench.plotting import save_figure  # noqa: E402

KEEP = [
    "train_items",
    "teacher_macro_f1_single",
    "teacher_macro_f1_voted",
    "student_macro_f1",
    "majority_baseline_macro_f1",
    "student_macro_f1_on_teacher_subset",
    "student_accuracy_on_teacher_subset",
    "teacher_ece",
    "student_ece",
    "requests_sent",
    "requests_cached",
    "probability_source",
    "val_macro_f1",
]


def run(config: str, name: str, sets: list[str], tracking: str) -> dict:
    from distill.config import load_config
    from flows.distillation import distill_flow

    cfg = load_config(
        config,
        sets
        + [
            f"run_name=budget-{name}",
            f"tracking.tracking_uri={tracking}",
            "tracking.model_name=label-budget",
            "energy.measure=false",
        ],
    )
    t0 = time.monotonic()
    s = distill_flow(cfg, show_progress=False)
    out = {k: s.get(k) for k in KEEP}
    teacher = max(s["teacher_macro_f1_voted"], s["teacher_macro_f1_single"])  # the stricter reference
    out["teacher_best_macro_f1"] = teacher
    out["gap_on_subset"] = s["student_macro_f1_on_teacher_subset"] - teacher
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["sets"] = sets
    print(
        f"{name:<14} items {out['train_items']:>5}  teacher {teacher:.3f}  student "
        f"{out['student_macro_f1_on_teacher_subset']:.3f} (subset) {out['student_macro_f1']:.3f} (all gold)  "
        f"gap {100 * out['gap_on_subset']:+.1f} pts  [{' '.join(sets)}]",
        flush=True,
    )
    return out


def plot(curves: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [100 * curve[x]["gap_on_subset"] for x in xs], marker="o", label=f"{name} labels")
        for x in xs:
            ax.annotate(
                f"{100 * curve[x]['student_macro_f1_on_teacher_subset']:.1f}",
                (x, 100 * curve[x]["gap_on_subset"]),
                fontsize=7,
                xytext=(3, 4),
                textcoords="offset points",
            )
    ax.axhline(0, color="grey", lw=1)
    ax.axhline(-1, color="#c0504d", ls="--", lw=1, label="target: -1 point")
    ax.set_xscale("log")
    ax.set_xlabel("teacher-labelled items (k=1)")
    ax.set_ylabel("student - teacher macro-F1, gold subset (points)")
    ax.set_title("Student's gap to its teacher vs teacher labels")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--requests", type=int, default=2400, help="pool requests per configuration (R)")
    ap.add_argument("--curve", type=int, nargs="*", default=[150, 300, 600, 1200, 2400])
    ap.add_argument(
        "--soft",
        nargs="*",
        default=["student.soft_label_weight=1.0", "student.distill_temperature=2.0"],
        help="the overrides that make a run 'soft'",
    )
    ap.add_argument("--png", default="bench/results/label_budget_gap.png")
    ap.add_argument("--only", nargs="*", help="grid rows to run (k1_hard k1_soft k3_hard k3_soft); no curves")
    ap.add_argument(
        "--curve-only",
        nargs="*",
        choices=["hard", "soft", "default"],
        help="skip the grid; curves for these label kinds only ('default': the config's own recipe)",
    )
    a = ap.parse_args()
    tracking = f"sqlite:///{tempfile.mkdtemp(prefix='label-budget-')}/mlflow.db"
    r = a.requests
    kinds = {
        "hard": ["vote.aggregation=majority", "student.soft_label_weight=0.0"],
        "soft": ["vote.aggregation=mean_probability", *a.soft],
        "default": [],
    }
    if a.curve_only:
        curves_only = {
            kind: {
                n: run(a.config, f"{kind}_{n}", ["teacher.samples=1", f"data.pool_limit={n}", *kinds[kind]], tracking)
                for n in a.curve
            }
            for kind in a.curve_only
        }
        plot(curves_only, REPO / a.png)
        print(f"gap curve: {a.png}")
        print(
            json.dumps(
                {
                    "curves": {
                        kind: {
                            str(n): {
                                k: c[n][k]
                                for k in (
                                    "train_items",
                                    "gap_on_subset",
                                    "student_macro_f1_on_teacher_subset",
                                    "student_macro_f1",
                                    "teacher_best_macro_f1",
                                )
                            }
                            for n in c
                        }
                        for kind, c in curves_only.items()
                    },
                    "png": a.png,
                }
            )
        )
        return
    kinds.pop("default")
    grid = {
        f"k{k}_{kind}": [f"teacher.samples={k}", f"data.pool_limit={r // k}", *sets]
        for k in (1, 3)
        for kind, sets in kinds.items()
    }
    results = {name: run(a.config, name, sets, tracking) for name, sets in grid.items() if not a.only or name in a.only}
    if a.only:
        print(json.dumps({"requests": r, "grid": results}))
        return
    curves: dict[str, dict[int, dict]] = {"hard": {}, "soft": {}}
    for kind, sets in kinds.items():
        for n in a.curve:
            curves[kind][n] = (
                results[f"k1_{kind}"]
                if n == r
                else run(a.config, f"{kind}_{n}", ["teacher.samples=1", f"data.pool_limit={n}", *sets], tracking)
            )
    plot(curves, REPO / a.png)
    print(f"\nat {r:,} pool requests:")
    for name, res in results.items():
        print(
            f"  {name:<8} {res['train_items']:>5} labels: student macro-F1 {res['student_macro_f1']:.3f} on all gold, "
            f"{res['student_macro_f1_on_teacher_subset']:.3f} on the teacher's subset "
            f"(teacher {res['teacher_best_macro_f1']:.3f}, gap {100 * res['gap_on_subset']:+.1f} points)"
        )
    print(f"gap curve: {a.png}")
    print(
        json.dumps(
            {
                "requests": r,
                "grid": results,
                "curves": {
                    kind: {
                        str(n): {
                            k: c[n][k]
                            for k in (
                                "train_items",
                                "gap_on_subset",
                                "student_macro_f1_on_teacher_subset",
                                "student_macro_f1",
                                "teacher_best_macro_f1",
                            )
                        }
                        for n in c
                    }
                    for kind, c in curves.items()
                },
                "png": a.png,
            }
        )
    )


if __name__ == "__main__":
    main()
