"""Choose the student's training recipe on the human-labelled dev split, never on gold.

One annotate run of the config (the teacher's answers come from the shared cache) gives the
voted pool; each variant (a set of ``student.*`` overrides) is then trained on exactly those
votes with each seed, by the same ``train_student`` a run calls, and scored three ways:

- ``dev``: macro-F1 on the dev split beside the pool (``data/movie/dev.parquet``, 300 items
  rated by people and kept out of pool and gold). The choice is made on this column.
- ``gold`` and ``subset``: macro-F1 on all gold and on the teacher's seeded gold subset,
  reported so a reader can see whether the dev choice held up; never used to choose.

Resumable: each finished (variant, seed) is written at once to ``--out`` and skipped by the
next call.

    .venv/bin/python bench/student_recipe.py \
        --variant lr2e-4:learning_rate=2e-4 --variant lr1e-4:learning_rate=1e-4 --variant lr5e-5:learning_rate=5e-5

Last line: one JSON object: per variant the mean and standard deviation of each column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()

from bench import record  # noqa: E402

HOME = REPO / ".distill" / "bench" / "student-recipe"
COLUMNS = ("dev", "gold", "subset")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,key=value`` -> (name, {key: value}), values read as JSON where they parse."""
    name, _, sets = text.partition(":")
    over: dict[str, Any] = {}
    for kv in filter(None, sets.split(",")):
        key, _, value = kv.partition("=")
        try:
            over[key] = json.loads(value)
        except json.JSONDecodeError:
            over[key] = value
    return name, over


def macro_f1(truth: list[str], pred: list[str], labels: list[str]) -> float:
    """The run's own macro-F1 (tasks/classify/evaluate.py: over the prompt's labels, 0 for a class never predicted)."""
    from tasks.classify.evaluate import scores

    return round(100 * scores(truth, pred, labels)["macro_f1"], 2)


def votes_of(config: str, sets: list[str]) -> tuple[Any, list[str], list[str]]:
    """The config, its voted pool files and the teacher's gold-subset ids, from one (cached) annotate run."""
    import pandas as pd

    from distill.config import load_config
    from flows.annotate import annotate_flow

    cfg = load_config(config, [f"workdir={HOME / 'runs'}", "run_name=recipe-votes", *sets])
    annotate_flow(cfg, show_progress=False)
    pool = sorted(str(p) for p in (cfg.run_dir / "votes" / "pool").glob("*.parquet"))
    subset = pd.concat(pd.read_parquet(p, columns=["id"]) for p in (cfg.run_dir / "votes" / "gold").glob("*.parquet"))
    return cfg, pool, subset["id"].tolist()


def run_variant(cfg: Any, pool: list[str], subset_ids: list[str], over: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one student on the votes with ``over`` and ``seed``; score it on dev, gold and the gold subset."""
    import pandas as pd

    from tasks.classify.inference import StudentPredictor
    from tasks.classify.train import train_student
    from tasks.templates.load import load_prompt

    student = cfg.student.model_copy(update={**over, "seed": seed})
    labels = load_prompt(cfg.prompt).labels
    out = HOME / "students" / f"s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    tr = train_student(
        pool,
        labels=labels,
        out_dir=str(out),
        student=student,
        min_agreement=cfg.vote.min_agreement,
        show_progress=False,
    )
    seconds = time.monotonic() - t0
    pred = StudentPredictor(tr.model_dir, precision=student.precision, max_length=student.max_length)
    col = cfg.data.gold_label_column
    dev = pd.read_parquet(Path(cfg.data.pool_path).with_name("dev.parquet"))
    gold = pd.read_parquet(cfg.data.gold_path)
    gold = gold.assign(pred=pred.predict(gold[cfg.data.text_column].astype(str).tolist())[0])
    sub = gold[gold[cfg.data.id_column].isin(set(subset_ids))]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "dev": macro_f1(dev["label"].tolist(), pred.predict(dev[cfg.data.text_column].astype(str).tolist())[0], labels),
        "gold": macro_f1(gold[col].tolist(), gold["pred"].tolist(), labels),
        "subset": macro_f1(sub[col].tolist(), sub["pred"].tolist(), labels),
        "val_teacher_labels": round(100 * tr.val_macro_f1, 2),
        "epochs_run": round(tr.epochs_run, 2),
        "train_items": tr.train_items,
        "train_seconds": round(seconds, 1),
        "commit": record.commit(),
    }


def summarise(points: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: mean and sample standard deviation of each column over the seeds done."""
    by: dict[str, list[dict[str, Any]]] = {}
    for key, p in points.items():
        by.setdefault(key.rsplit("/", 1)[0], []).append(p)
    out: dict[str, dict[str, Any]] = {}
    for name, ps in by.items():
        row: dict[str, Any] = {"seeds": len(ps)}
        for c in COLUMNS:
            vals = [p[c] for p in ps]
            row[f"{c}_mean"] = round(statistics.mean(vals), 2)
            row[f"{c}_std"] = round(statistics.stdev(vals), 2) if len(vals) > 1 else None
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,... (student.* overrides)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[42, 43, 44])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for the annotate run")
    ap.add_argument("--out", default="bench/figures/student_recipe.json")
    a = ap.parse_args()
    out = REPO / a.out
    store: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"points": {}, "variants": {}}
    if store.get("config", a.config) != a.config or store.get("sets", a.sets) != a.sets:
        sys.exit(
            f"{out} holds variants of {store['config']} {store.get('sets')}, not {a.config} {a.sets}: another --out"
        )
    store.update(config=a.config, sets=a.sets)
    HOME.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    variants = [parse_variant(v) for v in a.variant]
    todo = [(n, o, s) for n, o in variants for s in a.seeds if f"{n}/{s}" not in store["points"]]
    if todo:
        cfg, pool, subset_ids = votes_of(a.config, a.sets)
        for name, over, seed in todo:
            store["variants"][name] = over
            p = run_variant(cfg, pool, subset_ids, over, seed)
            store["points"][f"{name}/{seed}"] = p
            store = record.write(a.out, store)  # stamped, and written whole or not at all
            print(
                f"{name} seed {seed}: dev {p['dev']:.1f}  gold {p['gold']:.1f}  subset {p['subset']:.1f}  "
                f"({p['epochs_run']} epochs, {p['train_seconds']:.0f} s)",
                flush=True,
            )
    summary = summarise(store["points"])
    for name, r in sorted(summary.items(), key=lambda kv: -kv[1]["dev_mean"]):
        print(
            f"{name:>12}: "
            + "  ".join(f"{c} {r[f'{c}_mean']:.1f} ± {r[f'{c}_std'] or 0:.1f}" for c in COLUMNS)
            + f"  ({r['seeds']} seeds; choose on dev)"
        )
    print(json.dumps({"config": a.config, "out": a.out, "variants": summary}))


if __name__ == "__main__":
    main()
