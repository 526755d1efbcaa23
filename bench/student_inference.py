"""Student inference speed: distill's path vs a plain transformers pipeline vs the teacher.

On the gold texts, with the same model and batch size: (a) a plain
``transformers.pipeline("text-classification")``; (b) distill's path in fp32 (texts sorted
by length, each batch padded only to its own longest text); (c) the same with int8
dynamic quantisation of the Linear layers; (d) the same in bf16. distill's 'auto' picks
bf16 where the CPU has bf16 units (AMX/AVX512-BF16), else int8. Accuracy on gold is printed beside each, so
the int8 choice is checked against the 0.5-point budget. The teacher's items/s comes
from the annotation summary of the same run.

    .venv/bin/python bench/student_inference.py [--run-dir runs/demo-movie] [--batch-size 64]

Needs a trained student: run `make demo` first. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()


def timed(fn, texts, repeats: int = 2) -> tuple[float, list[str]]:  # type: ignore[no-untyped-def]
    fn(texts[:128])  # warm-up
    best, labels = 0.0, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        labels = fn(texts)
        best = max(best, len(texts) / (time.perf_counter() - t0))
    return best, labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/demo-movie")
    ap.add_argument("--gold", default="data/movie/gold.parquet")
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    import pandas as pd
    import torch
    from sklearn.metrics import accuracy_score
    from transformers import pipeline

    from tasks.classify.inference import StudentPredictor, choose_precision

    run = Path(a.run_dir)
    model_dir = run / "student" / "model"
    if not model_dir.exists():
        sys.exit(f"no student at {model_dir}: run `make demo` first")
    gold = pd.read_parquet(a.gold)
    texts, g = gold["text"].tolist(), gold["label"].tolist()
    torch.set_num_threads(torch.get_num_threads())
    res: dict[str, float | None] = {"items": len(texts), "batch_size": a.batch_size, "threads": torch.get_num_threads()}

    pipe = pipeline(
        "text-classification",
        model=str(model_dir),
        tokenizer=str(model_dir),
        device=-1,
        batch_size=a.batch_size,
        truncation=True,
        max_length=128,
    )
    res["pipeline_items_per_s"], lab = timed(lambda ts: [o["label"] for o in pipe(ts)], texts)
    res["pipeline_accuracy"] = accuracy_score(g, lab)
    for name, q in (("distill_fp32", "fp32"), ("distill_int8", "int8"), ("distill_bf16", "bf16")):
        p = StudentPredictor(str(model_dir), precision=q)
        res[f"{name}_items_per_s"], lab = timed(lambda ts, p=p: p.predict(ts, a.batch_size)[0], texts)
        res[f"{name}_accuracy"] = accuracy_score(g, lab)
    summ = run / "annotation_summary.json"
    res["teacher_items_per_s"] = json.loads(summ.read_text()).get("teacher_items_per_s") if summ.exists() else None
    auto = choose_precision("auto", "cpu")
    res["auto_precision"] = auto  # type: ignore[assignment]
    best = res[f"distill_{auto}_items_per_s"]
    res["int8_accuracy_cost_points"] = 100 * (res["distill_fp32_accuracy"] - res["distill_int8_accuracy"])  # type: ignore[operator]
    res["fp32_vs_pipeline"] = res["distill_fp32_items_per_s"] / res["pipeline_items_per_s"]  # type: ignore[operator]
    res["int8_vs_pipeline"] = res["distill_int8_items_per_s"] / res["pipeline_items_per_s"]  # type: ignore[operator]
    res["bf16_vs_pipeline"] = res["distill_bf16_items_per_s"] / res["pipeline_items_per_s"]  # type: ignore[operator]
    res["bf16_accuracy_cost_points"] = 100 * (res["distill_fp32_accuracy"] - res["distill_bf16_accuracy"])  # type: ignore[operator]
    res["auto_vs_pipeline"] = best / res["pipeline_items_per_s"]  # type: ignore[operator]
    res["best_vs_teacher"] = best / res["teacher_items_per_s"] if res["teacher_items_per_s"] else None  # type: ignore[operator]
    for k in ("pipeline", "distill_fp32", "distill_int8", "distill_bf16"):
        print(f"{k:<14} {res[f'{k}_items_per_s']:8.1f} items/s   gold accuracy {100 * res[f'{k}_accuracy']:.1f}%")
    print(f"teacher        {res['teacher_items_per_s'] or float('nan'):8.2f} items/s")
    print(
        f"vs pipeline: fp32 {res['fp32_vs_pipeline']:.2f}x, int8 {res['int8_vs_pipeline']:.2f}x "
        f"({res['int8_accuracy_cost_points']:+.2f} accuracy points), bf16 {res['bf16_vs_pipeline']:.2f}x "
        f"({res['bf16_accuracy_cost_points']:+.2f} points); distill's choice here: {auto}, "
        f"{res['auto_vs_pipeline']:.2f}x the pipeline and {res['best_vs_teacher'] or float('nan'):.0f}x the teacher"
    )
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
