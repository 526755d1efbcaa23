"""The student's inference path: what `distill predict`, evaluation and the MLflow model use.

Why not a plain pipeline: sorting texts by length and padding each batch only to its own
longest text wastes no compute on padding, and the model runs in bf16 on CPUs with bf16
units (AMX/AVX512-BF16) or with int8 dynamic quantisation elsewhere (bench/student_inference.py
measures each against a plain pipeline, with its accuracy). Results come back in the
caller's order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AMX or AVX512-BF16), where bf16 beats int8 here."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def choose_precision(requested: str, device: str) -> str:
    """'auto': bf16 on GPUs that have it (else fp16); on CPU bf16 where the CPU has bf16 units, else int8."""
    if requested != "auto":
        return requested
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "int8"


class StudentPredictor:
    """Load a saved student folder (model, tokenizer, labels.json) and label texts."""

    def __init__(
        self, model_dir: str, precision: str = "fp32", max_length: int = 128, device: Optional[str] = None
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = model_dir
        self.labels: list[str] = json.loads((Path(model_dir) / "labels.json").read_text())["labels"]
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        model.eval()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = choose_precision(precision, self.device)
        if self.precision == "int8":
            if self.device != "cpu":
                raise ValueError("int8 dynamic quantisation runs on CPU only")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        elif self.precision == "bf16":
            model = model.to(torch.bfloat16)
        elif self.precision == "fp16":
            model = model.to(torch.float16)
        elif self.precision != "fp32":
            raise ValueError(f"unknown precision {precision!r}: use auto, fp32, bf16, fp16 or int8")
        self.model = model.to(self.device)
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
                enc = self.tok(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**enc).logits
                out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    def predict(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> tuple[list[str], list[float]]:
        p = self.predict_proba(texts, batch_size, progress)
        top = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=int)
        return [self.labels[i] for i in top], [float(p[j, i]) for j, i in enumerate(top)]


def measure_speed(
    pred: StudentPredictor,
    texts: list[str],
    batch_size: int,
    *,
    single_n: int = 100,
    energy: Any = None,
    min_energy_s: float = 5.0,
) -> Any:
    """items/s at ``batch_size`` (after a warm-up), its energy per item, and p50/p95 single-item latency.

    With ``energy`` (an EnergyConfig) the batched passes run under codecarbon's offline
    tracker and repeat until ``min_energy_s`` have passed, so a fast student still gives a
    reading longer than a couple of the tracker's samples.
    """
    from tasks.accounting.carbon import measure_energy  # not shipped with the model: only evaluation measures
    from tasks.results.classify import StudentSpeed

    pred.predict(texts[: min(len(texts), batch_size * 2)], batch_size)  # warm-up
    measure = energy is not None and energy.measure
    done = 0
    with measure_energy(
        "student-inference",
        energy.country_iso_code if energy else "USA",
        enabled=measure,
        cpu_power_w=getattr(energy, "cpu_power_w", None),
        measure_power_secs=getattr(energy, "measure_power_secs", 5.0),
    ) as reading:
        t0 = time.perf_counter()
        while True:
            pred.predict(texts, batch_size)
            done += len(texts)
            elapsed = time.perf_counter() - t0
            if not measure or elapsed >= min_energy_s or not texts:
                break
    items_per_s = done / elapsed if elapsed > 0 else 0.0
    lat = []
    for t in texts[:single_n]:
        s = time.perf_counter()
        pred.predict([t], 1)
        lat.append(time.perf_counter() - s)
    kwh_item = reading.kwh / done if reading.kwh is not None and done else None
    return StudentSpeed(
        student_items_per_s=items_per_s,
        student_latency_p50_ms=float(np.percentile(lat, 50) * 1000),
        student_latency_p95_ms=float(np.percentile(lat, 95) * 1000),
        student_batch_size=batch_size,
        student_speed_items=done,
        student_infer_kwh=reading.kwh,
        student_kwh_per_item=kwh_item,
        student_kwh_per_item_method=f"{reading.method}, {done:,} items in batches of {batch_size}",
    )
