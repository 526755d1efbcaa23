"""What human review buys: the student's gold macro-F1 before and after reviewers label 100 or 300 pool items
chosen by low_confidence, disagreement or random, paired over 3 seeds, and at what cost.

Each point is a real ``distill`` flow run of the demo config: first the base run of a seed
(no review), then, per strategy and size, the items ``distill review export`` would pick
from that base run (tasks/review/loop.py's selection, the base run's student for
``disagreement``), labelled by the bundled human pool labels standing in for the reviewers
(``data/<set>/pool_labels.parquet``: the mean of 20+ raters), written as a human-label file,
and the same run again with ``review.labels_dir`` set and the same student seed. Only the
reviewed items' labels change (``gold_share`` 0: they all train), so the paired difference
on the same gold items is what the review taught. The teacher answers come from the shared
cache. The interval is a paired bootstrap of the macro-F1 difference over the gold items of
the 3 seeds pooled (tasks/registry/paired.py, 2,000 resamples).

Cost: ``review.usd_per_label`` per reviewed item against what the same money buys in
teacher labels at the run's measured price per item (and at gpt-4o-mini's from the price
table), which the label curve (bench/figures/label_curve.json) says is worth little past
2,000 labels.

Resumable: each finished run is written at once to ``--out``; a rerun skips it.

    .venv/bin/python bench/review_value.py [--sizes 100 300] [--seeds 42 43 44]
    .venv/bin/python bench/review_value.py --config configs/nyt.yaml --pool-labels data/nyt/pool_labels.parquet \
        --strategies low_confidence random --sizes 300 --out bench/figures/review_value_nyt.json --tag nyt

Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
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

HOME = REPO / ".distill" / "bench" / "review-value"


def run(config: str, name: str, seed: int, extra: list[str]) -> dict[str, Any]:
    """One real flow run; its summary's figures and where its gold predictions are."""
    from distill.config import load_config
    from flows.distillation import distill_flow

    cfg = load_config(
        config,
        [
            f"student.seed={seed}",
            f"run_name={name}",
            f"workdir={HOME / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{HOME / 'mlflow.db'}",
            "tracking.model_name=review-value",
            "energy.measure=false",
            *extra,
        ],
    )
    t0 = time.monotonic()
    s = distill_flow(cfg, show_progress=False)
    keep = ("student_macro_f1", "student_macro_f1_on_teacher_subset", "teacher_macro_f1_voted", "train_items")
    out: dict[str, Any] = {k: s.get(k) for k in keep}
    out["per_class_recall"] = {k: v["recall"] for k, v in (s.get("student_per_class") or {}).items()}
    out["teacher_usd_per_item"] = (s.get("teacher_usd") or 0) / max(1, s.get("items") or 1)
    out["human_labelled_items"] = s.get("human_labelled_items")
    out["predictions"] = str(cfg.run_dir / "evaluation" / "student_gold_predictions.parquet")
    out.update(seconds=round(time.monotonic() - t0, 1), date=date.today().isoformat(), commit=record.commit())
    return out


def reviewed_file(base_run: Path, labels_dir: Path, *, how: str, n: int, seed: int, pool_labels: str) -> dict:
    """The items export would pick from the base run, labelled by the bundled human labels; written as version 1."""
    import pandas as pd

    from distill.config import ReviewConfig
    from tasks.data.human_labels import write_version
    from tasks.review.loop import select_for_review

    for f in labels_dir.glob("human-labels-v*.parquet"):
        f.unlink()
    review = ReviewConfig(labels_dir=str(labels_dir))
    items = select_for_review(run_dir=base_run, review=review, how=how, n=n, seed=seed, max_length=128)
    human = pd.read_parquet(pool_labels).set_index("id")["label"]
    rows = [
        {
            "id": it.id,
            "text": it.text,
            "label": str(human[it.id]),
            "reviewer": "bundled pool labels",
            "annotation_id": k,
            "task_id": k,
            "project_id": 0,
            "teacher_label": it.teacher_label,
            "teacher_confidence": it.teacher_confidence,
            "selected_by": how,
        }
        for k, it in enumerate(items)
    ]
    write_version(labels_dir, pd.DataFrame(rows))
    corrected = sum(r["label"] != r["teacher_label"] for r in rows)
    return {"reviewed": len(rows), "teacher_wrong_on_reviewed": corrected}


def paired(points: list[tuple[str, str]], labels: list[str]) -> dict[str, float]:
    """Macro-F1 after minus before on the same gold items, the seeds' items pooled, with a 95% bootstrap interval."""
    import pandas as pd

    from tasks.registry.paired import paired_macro_f1

    gold: list[str] = []
    after: list[str] = []
    before: list[str] = []
    for b, a in points:
        pb, pa = pd.read_parquet(b).set_index("id"), pd.read_parquet(a).set_index("id")
        pa = pa.loc[pb.index]
        gold += pb["label"].astype(str).tolist()
        before += pb["pred"].astype(str).tolist()
        after += pa["pred"].astype(str).tolist()
    iv = paired_macro_f1(gold, after, before, labels, confidence=0.95, resamples=2000)
    return {"diff": round(iv.diff, 4), "ci_low": round(iv.low, 4), "ci_high": round(iv.high, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--pool-labels", default="data/movie/pool_labels.parquet")
    ap.add_argument("--strategies", nargs="+", default=["low_confidence", "disagreement", "random"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[100, 300])
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    ap.add_argument("--out", default="bench/figures/review_value.json")
    ap.add_argument("--tag", default="demo")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    args = ap.parse_args()
    from distill.config import ReviewConfig, load_config
    from tasks.templates.load import load_prompt

    out_path = REPO / args.out
    doc = json.loads(out_path.read_text()) if out_path.exists() else {}
    doc.setdefault("command", "python bench/review_value.py " + " ".join(sys.argv[1:]))
    runs: dict[str, Any] = doc.setdefault("runs", {})

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=1) + "\n")

    for seed in args.seeds:
        base = f"{args.tag}-base-s{seed}"
        if base not in runs:
            runs[base] = run(args.config, base, seed, args.set)
            save()
        for how in args.strategies:
            for n in args.sizes:
                key = f"{args.tag}-{how}-{n}-s{seed}"
                if key in runs:
                    continue
                labels_dir = HOME / "labels" / key
                picked = reviewed_file(
                    HOME / "runs" / base, labels_dir, how=how, n=n, seed=seed, pool_labels=args.pool_labels
                )
                runs[key] = {**run(args.config, key, seed, [*args.set, f"review.labels_dir={labels_dir}"]), **picked}
                save()
                print(key, runs[key]["student_macro_f1"], flush=True)

    labels = list(load_prompt(load_config(args.config, args.set).prompt).labels)  # type: ignore[union-attr]
    usd = ReviewConfig().usd_per_label
    summary: dict[str, Any] = {}
    for how in args.strategies:
        for n in args.sizes:
            pairs = [(f"{args.tag}-base-s{s}", f"{args.tag}-{how}-{n}-s{s}") for s in args.seeds]
            pairs = [p for p in pairs if p[0] in runs and p[1] in runs]
            if not pairs:
                continue
            diffs = [runs[a]["student_macro_f1"] - runs[b]["student_macro_f1"] for b, a in pairs]
            # the price per teacher label as measured by the base run that sent its requests (later runs read the
            # shared cache and pay nothing)
            teacher_usd = max(runs[b]["teacher_usd_per_item"] for b, _ in pairs)
            summary[f"{how}/{n}"] = {
                "seeds": len(pairs),
                "before_mean": round(statistics.mean(runs[b]["student_macro_f1"] for b, _ in pairs), 4),
                "after_mean": round(statistics.mean(runs[a]["student_macro_f1"] for _, a in pairs), 4),
                "diff_per_seed": [round(d, 4) for d in diffs],
                "paired_pooled": paired([(runs[b]["predictions"], runs[a]["predictions"]) for b, a in pairs], labels),
                "teacher_wrong_on_reviewed_mean": statistics.mean(
                    runs[a]["teacher_wrong_on_reviewed"] for _, a in pairs
                ),
                "recall_before": {
                    c: round(statistics.mean(runs[b]["per_class_recall"].get(c, 0) for b, _ in pairs), 4)
                    for c in runs[pairs[0][0]]["per_class_recall"]
                },
                "recall_after": {
                    c: round(statistics.mean(runs[a]["per_class_recall"].get(c, 0) for _, a in pairs), 4)
                    for c in runs[pairs[0][1]]["per_class_recall"]
                },
                "review_usd": round(n * usd, 2),
                "teacher_usd_per_label": teacher_usd,
                "equal_cost_teacher_labels": round(n * usd / teacher_usd) if teacher_usd else None,
            }
    doc["summary"] = summary
    doc["usd_per_label"] = usd
    record.stamp(doc, cmd=doc["command"])  # the file's date, commit and machine: its runs' (docs/gen_figures.py)
    first = next(iter(runs.values()))
    doc["date"], doc["commit"] = first["date"], first["commit"]
    save()
    print(json.dumps({"out": args.out, **summary}))


if __name__ == "__main__":
    main()
