"""The student's inference path: what `distill predict`, evaluation and the MLflow model use.

Why not a plain pipeline: sorting texts by length and padding each batch only to its own
longest text wastes no compute on padding, and int8 dynamic quantisation of the Linear
layers speeds a CPU encoder up further (bench/student_inference.py measures both and the
accuracy cost). Results come back in the caller's order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np


class StudentPredictor:
    """Load a saved student folder (model, tokenizer, labels.json) and label texts."""

    def __init__(self, model_dir: str, quantize_int8: bool = False, max_length: int = 128,
                 device: Optional[str] = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = model_dir
        self.labels: list[str] = json.loads((Path(model_dir) / "labels.json").read_text())["labels"]
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        model.eval()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if quantize_int8 and self.device == "cpu":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.to(self.device)
        self.quantized = quantize_int8 and self.device == "cpu"
        self.max_length = max_length

    def predict_proba(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, len(self.labels)))
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        batches: Iterable[int] = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(texts) // batch_size), desc="student", unit="batch")
        with torch.inference_mode():
            for start in batches:
                idx = order[start : start + batch_size]
                enc = self.tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits
                out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    def predict(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> tuple[list[str], list[float]]:
        p = self.predict_proba(texts, batch_size, progress)
        top = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=int)
        return [self.labels[i] for i in top], [float(p[j, i]) for j, i in enumerate(top)]


def measure_speed(pred: StudentPredictor, texts: list[str], batch_size: int, single_n: int = 100) -> dict[str, Any]:
    """items/s at ``batch_size`` over all texts (after a warm-up) and p50/p95 latency of single items."""
    pred.predict(texts[: min(len(texts), batch_size * 2)], batch_size)  # warm-up
    t0 = time.perf_counter()
    pred.predict(texts, batch_size)
    items_per_s = len(texts) / (time.perf_counter() - t0)
    lat = []
    for t in texts[:single_n]:
        s = time.perf_counter()
        pred.predict([t], 1)
        lat.append(time.perf_counter() - s)
    return {"student_items_per_s": items_per_s, "student_latency_p50_ms": float(np.percentile(lat, 50) * 1000),
            "student_latency_p95_ms": float(np.percentile(lat, 95) * 1000), "student_batch_size": batch_size}
