"""The classifier student on a GPU: training and inference items/s, tokens/s, peak memory, share of the chip.

Runs distill's own code (``train_student``, ``StudentPredictor``), end to end as a user gets
it: texts in, labels out. What it measures, on whatever CUDA GPU it finds:

- inference on the demo's texts (pool and gold, repeated to ``--infer-items``) at each
  ``--infer-batch`` size, in fp32, bf16 and ``auto`` (which times the two on the first
  batch and keeps the faster); then the same on texts of a full ``max_length`` tokens;
- training items/s at each ``--train-batch`` size on the pool texts repeated to
  ``--train-items`` (one epoch), and, at the same batch sizes, the gold macro-F1 of a student
  trained on the demo pool's human labels (standing in for the teacher's, so the quality of a
  large batch is checked against the CPU default's batch of 16 on the same labels);
- the share of the chip's dense rate: 2 x parameters x tokens per inference, 6 x for
  training, against the card's published dense bf16 (or tf32/fp32) peak where the name is
  known (null otherwise).

Targets (issue 20, one H200-class GPU, MiniLM-L6): inference >= 50,000 items/s on the demo's
texts, training >= 10,000 items/s at a batch size that keeps the CPU-trained quality.

    .venv/bin/python bench/gpu_student.py [--infer-items 200000] [--train-items 100000]

On a machine without CUDA it says so and exits 0. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()

# dense (no sparsity) peak TFLOP/s, from the vendors' data sheets: (bf16, tf32 tensor cores, plain fp32)
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.0, 494.0, 67.0),
    "H100 80GB HBM3": (989.0, 494.0, 67.0),  # SXM
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100 NVL": (835.0, 418.0, 60.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
    "L4": (121.0, 60.0, 30.3),
    "A10": (125.0, 62.5, 31.2),
}


def peak_for(name: str) -> tuple[float, float, float] | None:
    """The first table entry whose key is in the device name (longest keys first), else None."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def repeat_to(items: list[Any], n: int) -> list[Any]:
    return (items * (n // max(1, len(items)) + 1))[:n]


def student_folder(base: str, labels: list[str], out: Path) -> str:
    """A classifier folder (fresh head on the base encoder) that StudentPredictor loads: for timing only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    (out / "labels.json").write_text(json.dumps({"labels": labels}))
    return str(out)


def voted_file(texts: list[str], labels: list[str], path: Path) -> str:
    """A voted shard as the aggregation writes it, from human labels (one sure vote each)."""
    import pandas as pd

    pd.DataFrame(
        {"text": texts, "votes": [[lab] for lab in labels], "label": labels, "confidence": [1.0] * len(texts)}
    ).to_parquet(path)
    return str(path)


def timed_predict(pred: Any, texts: list[str], batch_size: int) -> tuple[float, float]:
    """(items/s, tokens/s) of one pass after a warm-up, synchronised with the GPU."""
    import torch

    from tasks.classify.inference import tokenize

    pred.predict(texts[: batch_size * 4], batch_size)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pred.predict(texts, batch_size)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    tokens = sum(len(x) for x in tokenize(pred.tok, texts, pred.max_length))
    return len(texts) / s, tokens / s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default="data/movie/pool.parquet")
    ap.add_argument("--gold", default="data/movie/gold.parquet")
    ap.add_argument("--infer-items", type=int, default=200_000)
    ap.add_argument("--infer-batch", default="256,1024")
    ap.add_argument("--train-items", type=int, default=100_000)
    ap.add_argument("--train-batch", default="16,256,1024")
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run this on a machine with a GPU)")
        print(json.dumps({"gpu": None, "skipped": "no CUDA device"}))
        return
    import pandas as pd
    from sklearn.metrics import f1_score

    from distill.config import StudentConfig
    from tasks.classify.inference import StudentPredictor
    from tasks.classify.train import resolve_student_path, train_student

    name = torch.cuda.get_device_name(0)
    peak = peak_for(name)
    res: dict[str, Any] = {"gpu": name, "peak_tflops_bf16_tf32_fp32": peak, "max_length": a.max_length}
    pool, gold = pd.read_parquet(a.pool), pd.read_parquet(a.gold)
    labels = sorted(set(pool["label"]) | set(gold["label"]))
    base = resolve_student_path("auto")
    work = Path(tempfile.mkdtemp(prefix="gpu-student-"))
    folder = student_folder(base, labels, work / "timing-student")
    n_params = sum(p.numel() for p in StudentPredictor(folder, precision="fp32").model.parameters())
    res["params"] = n_params

    def share(tokens_per_s: float, flops_per_token: float, which: int) -> float | None:
        return None if peak is None else tokens_per_s * flops_per_token / (peak[which] * 1e12)

    fp32_peak = 1 if torch.backends.cuda.matmul.allow_tf32 else 2  # torch's fp32 matmuls skip tf32 by default
    demo = repeat_to(pool["text"].tolist() + gold["text"].tolist(), a.infer_items)
    long_text = " ".join(gold["text"].tolist()[:20])  # well past max_length tokens: truncated to exactly max_length
    full = [f"{i} {long_text}" for i in range(min(a.infer_items, 50_000))]
    for precision in ("fp32", "bf16", "auto"):
        for bs in (int(x) for x in a.infer_batch.split(",")):
            torch.cuda.reset_peak_memory_stats()
            pred = StudentPredictor(folder, precision=precision, max_length=a.max_length, device="cuda")
            items, toks = timed_predict(pred, demo, bs)
            key = f"infer_{precision}_b{bs}"
            res[f"{key}_items_per_s"] = round(items)
            res[f"{key}_tokens_per_s"] = round(toks)
            res[f"{key}_full_length_tokens_per_s"] = round(timed_predict(pred, full, bs)[1])
            res[f"{key}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            res[f"{key}_chip_share"] = share(toks, 2 * n_params, 0 if pred.precision == "bf16" else fp32_peak)
            if precision == "auto":
                res[f"{key}_picked"] = f"{pred.precision} ({pred.precision_reason})"
            print(f"{key}: {items:,.0f} items/s, {toks:,.0f} tokens/s, picked {pred.precision}", flush=True)
            del pred

    texts, human = pool["text"].tolist(), pool["label"].tolist()
    big = voted_file(repeat_to(texts, a.train_items), repeat_to(human, a.train_items), work / "voted-big.parquet")
    small = voted_file(texts, human, work / "voted-pool.parquet")
    tok = StudentPredictor(folder, precision="fp32").tok
    tokens = sum(len(x) for x in tok(texts, truncation=True, max_length=a.max_length)["input_ids"]) / len(texts)
    res["train_mean_tokens"] = round(tokens, 1)
    for bs in (int(x) for x in a.train_batch.split(",")):
        # the default learning rate at batch 16, square-root scaled with the batch
        lr = min(1e-3, StudentConfig().learning_rate * math.sqrt(bs / 16))
        cfg = StudentConfig(batch_size=bs, eval_batch_size=1024, learning_rate=lr, epochs=1, max_length=a.max_length)
        torch.cuda.reset_peak_memory_stats()
        t = train_student([big], labels=labels, out_dir=str(work / f"t{bs}"), student=cfg, min_agreement=0.0)
        seen = t.train_items * t.epochs_run
        key = f"train_b{bs}"
        res[f"{key}_items_per_s"] = round(seen / t.train_seconds) if t.train_seconds else None
        res[f"{key}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res[f"{key}_chip_share"] = share(seen / t.train_seconds * tokens, 6 * n_params, 0) if t.train_seconds else None
        quality = StudentConfig(batch_size=bs, learning_rate=lr, max_length=a.max_length)
        q = train_student([small], labels=labels, out_dir=str(work / f"q{bs}"), student=quality, min_agreement=0.0)
        pred = StudentPredictor(q.model_dir, precision="fp32", device="cuda")
        res[f"{key}_lr"] = lr
        res[f"{key}_gold_macro_f1"] = round(
            float(f1_score(gold["label"], pred.predict(gold["text"].tolist(), 256)[0], average="macro")), 4
        )
        print(
            f"{key}: {res[f'{key}_items_per_s']} items/s, gold macro-F1 {res[f'{key}_gold_macro_f1']} "
            f"(trained on {len(texts)} pool items' human labels, lr {lr:.2g})",
            flush=True,
        )
    best_infer = max(v for k, v in res.items() if k.startswith("infer_auto") and k.endswith("_items_per_s"))
    res["infer_target_50000_met"] = best_infer >= 50_000
    res["train_target_10000_met_at"] = [
        k for k, v in res.items() if k.startswith("train_b") and k.endswith("_items_per_s") and v and v >= 10_000
    ]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
