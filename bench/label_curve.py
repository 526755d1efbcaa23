"""The label-budget curve with seeds: the student's gold macro-F1 against the number of teacher labels.

Each point is a real ``distill`` flow run of the demo config (annotate, aggregate, train,
evaluate on human gold, gate) with ``data.pool_limit=N`` and ``student.seed=S``; only
those two change. The teacher answers come from the shared cache (a smaller pool is the
start of a larger one, and a seed changes only the student), so the teacher is asked for
each item once, whichever point asks first. The gap is student minus teacher on the
teacher's seeded gold subset (the same 300 items at every point); every choice the run
makes is made on teacher labels or the dev split, never on gold.

Resumable across sessions: each finished (N, seed) is written at once to ``--out`` (the
committed JSON, with the date and commit of that point) and skipped by the next call; a run
killed part-way resumes from its last finished stage (its run folder is kept under
``.distill/bench/label-curve``). ``--plot-only`` redraws the PNG from the JSON.

    .venv/bin/python bench/label_curve.py [--points 250 500 1000 1500 2000 4000] [--seeds 42 43 44]
    .venv/bin/python bench/label_curve.py --points 1500 --out bench/figures/amazon_1500.json \
        --png docs/amazon_1500.png --name "amazon product reviews" --target-points 3 \
        --set data.pool_path=data/amazon/pool.parquet --set data.gold_path=data/amazon/gold.parquet

Last line: one JSON object: per point the mean and standard deviation over the seeds done.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()

from bench import record  # noqa: E402
from bench.plotting import save_figure  # noqa: E402

HOME = REPO / ".distill" / "bench" / "label-curve"
KEEP = [
    "train_items",
    "teacher_macro_f1_voted",
    "student_macro_f1_on_teacher_subset",
    "student_macro_f1",
    "teacher_subset_items",
    "requests_sent",
    "requests_cached",
]


def run_point(config: str, n: int, seed: int, extra: list[str], tag: str) -> dict[str, Any]:
    """One real flow run; the figures this curve keeps, with when, where and how long."""
    from distill.config import load_config
    from flows.distillation import distill_flow

    cfg = load_config(
        config,
        [
            f"data.pool_limit={n}",
            f"student.seed={seed}",
            f"run_name=curve-{tag}-{n}-s{seed}",
            f"workdir={HOME / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{HOME / 'mlflow.db'}",
            "tracking.model_name=label-curve",
            "energy.measure=false",
            *extra,
        ],
    )
    t0 = time.monotonic()
    s = distill_flow(cfg, show_progress=False)
    out: dict[str, Any] = {k: s.get(k) for k in KEEP}
    out["gap_on_subset"] = s["student_macro_f1_on_teacher_subset"] - s["teacher_macro_f1_voted"]
    out.update(
        seconds=round(time.monotonic() - t0, 1), date=date.today().isoformat(), commit=record.commit(), sets=extra
    )
    return out


def summarise(points: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per N: mean and sample standard deviation over the seeds done (std None with one seed)."""
    by_n: dict[int, list[dict[str, Any]]] = {}
    for key, p in points.items():
        by_n.setdefault(int(key.split("/")[0]), []).append(p)
    out = {}
    for n in sorted(by_n):
        ps = by_n[n]
        row: dict[str, Any] = {"seeds": len(ps), "train_items_mean": statistics.mean(p["train_items"] for p in ps)}
        for k in ("student_macro_f1_on_teacher_subset", "student_macro_f1", "gap_on_subset", "teacher_macro_f1_voted"):
            vals = [p[k] for p in ps]
            row[f"{k}_mean"] = round(statistics.mean(vals), 4)
            row[f"{k}_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else None
        out[str(n)] = row
    return out


def plot(summary: dict[str, dict[str, Any]], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    ns = [int(n) for n in summary]
    row = [summary[str(n)] for n in ns]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(
        ns,
        [100 * r["student_macro_f1_on_teacher_subset_mean"] for r in row],
        yerr=[100 * (r["student_macro_f1_on_teacher_subset_std"] or 0) for r in row],
        marker="o",
        capsize=4,
        label="student (mean ± sd over seeds)",
    )
    teacher = 100 * statistics.mean(r["teacher_macro_f1_voted_mean"] for r in row)
    ax.axhline(teacher, color="black", lw=1, label=f"teacher {teacher:.1f}")
    ax.axhline(teacher - 2, color="#c0504d", ls="--", lw=1, label="target: teacher - 2 points")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ns))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ns, [f"{n:,}" for n in ns], rotation=30)
    ax.set_xlabel("teacher-labelled pool items (k=1)")
    ax.set_ylabel("macro-F1 on the teacher's gold subset (%)")
    seeds = max(r["seeds"] for r in row)
    ax.set_title(f"Student vs teacher labels: {what} ({seeds} seeds a point)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--points", type=int, nargs="*", default=[250, 500, 1000, 1500, 2000, 4000])
    ap.add_argument("--seeds", type=int, nargs="*", default=[42, 43, 44])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every point")
    ap.add_argument("--out", default="bench/figures/label_curve.json")
    ap.add_argument("--png", default="docs/label_curve.png")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--name", default="movie (the demo)", help="the data's name in docs/measurements.md")
    ap.add_argument("--target-points", type=float, default=2.0, help="the gap the issue allows this data, in points")
    a = ap.parse_args()
    out = REPO / a.out
    fresh: dict[str, Any] = {
        "config": a.config,
        "sets": a.sets,
        "points": {},
        "name": a.name,
        "target_points": int(a.target_points) if a.target_points.is_integer() else a.target_points,
    }
    store: dict[str, Any] = json.loads(out.read_text()) if out.exists() else fresh
    if (store["config"], store.get("sets", [])) != (a.config, a.sets):
        sys.exit(
            f"{out} holds a curve of {store['config']} {store.get('sets')}, not {a.config} {a.sets}: another --out"
        )
    HOME.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    for n in [] if a.plot_only else a.points:
        for seed in a.seeds:
            key = f"{n}/{seed}"
            if key in store["points"]:
                continue
            p = run_point(a.config, n, seed, a.sets, Path(a.out).stem)
            store["points"][key] = p
            record.stamp(store)  # the file's date, commit, command and machine: its last point's (docs/gen_figures.py)
            tmp = out.with_suffix(".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(store, indent=1, sort_keys=True))
            tmp.replace(out)  # a point is either in the file whole or not at all
            print(
                f"N={n:>5} seed {seed}: {p['train_items']} trained, student "
                f"{p['student_macro_f1_on_teacher_subset']:.3f} vs teacher {p['teacher_macro_f1_voted']:.3f} "
                f"(gap {100 * p['gap_on_subset']:+.1f} points), "
                f"{p['seconds']:.0f} s",
                flush=True,
            )
    summary = summarise(store["points"])
    if summary:
        what = " ".join([Path(a.config).name, *(x.split("=")[-1] for x in a.sets)])
        plot(summary, REPO / a.png, what)
        for n, r in summary.items():
            sd = r["gap_on_subset_std"]
            print(
                f"N={int(n):>5}: gap {100 * r['gap_on_subset_mean']:+.1f} points"
                + (f" ± {100 * sd:.1f}" if sd is not None else "")
                + f" over {r['seeds']} seed(s), student {100 * r['student_macro_f1_on_teacher_subset_mean']:.1f} on "
                f"the subset, {100 * r['student_macro_f1_mean']:.1f} on all gold"
            )
    print(json.dumps({"config": a.config, "sets": a.sets, "out": a.out, "png": a.png, "curve": summary}))


if __name__ == "__main__":
    main()
