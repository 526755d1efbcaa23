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
from collections.abc import Callable
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
    """'auto' on CPU: bf16 where the CPU has bf16 units, else int8; on CUDA decided by measuring (below).

    On CUDA 'auto' becomes 'auto-measure': the predictor loads in fp32 and times fp32
    against bf16 on the caller's first batch (``StudentPredictor._measure_cuda_precision``).
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        return "auto-measure"
    return "bf16" if cpu_has_fast_bf16() else "int8"


TOKENIZE_CHUNK = 8192  # texts tokenised per call: enough to sort by length, bounded memory for huge inputs


def tokenize(tok: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of ``texts``, truncated to ``max_length``, in one batched call of the (fast) tokenizer.

    Padding is left to ``pad_batch``: a batch is padded only to its own longest text.
    """
    return tok(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]


def pad_id_of(tok: Any) -> int:
    """The token that pads a batch: the tokenizer's own, else 0 (masked out either way)."""
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) as int64 tensors, right-padded to the longest row, as the tokenizer pads."""
    import torch

    width = max((len(x) for x in ids), default=0)
    arr = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        arr[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(arr), torch.from_numpy(mask)


def best_time(fn: Callable[[], Any], *, sync: Callable[[], None], repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after one warm-up, ``sync`` waiting for the device."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


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
        self.precision_reason = "as requested" if precision != "auto" else f"auto on {self.device}"
        self.pad_id = pad_id_of(self.tok)
        if self.precision == "int8":
            if self.device != "cpu":
                raise ValueError("int8 dynamic quantisation runs on CPU only")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        elif self.precision == "bf16":
            model = model.to(torch.bfloat16)
        elif self.precision == "fp16":
            model = model.to(torch.float16)
        elif self.precision not in ("fp32", "auto-measure"):
            raise ValueError(f"unknown precision {precision!r}: use auto, fp32, bf16, fp16 or int8")
        self.model = model.to(self.device)
        self.max_length = max_length

    def predict_proba(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities in the caller's order.

        Texts are tokenised a chunk at a time in one call of the fast (Rust) tokenizer, sorted
        by token count and padded per batch to the batch's longest; on CUDA each batch's
        probabilities stay on the GPU until the chunk is done, so the GPU works on one batch
        while this thread pads the next instead of waiting for every result to come back.
        """
        import torch

        if not texts:
            return np.zeros((0, len(self.labels)))
        if self.device == "cuda" and self.precision == "auto-measure":
            self._measure_cuda_precision(texts, batch_size)
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=-(-len(texts) // batch_size), desc="student", unit="batch")
        with torch.inference_mode():
            for start in range(0, len(texts), TOKENIZE_CHUNK):
                chunk = texts[start : start + TOKENIZE_CHUNK]
                ids = tokenize(self.tok, chunk, self.max_length)
                order = np.argsort([len(x) for x in ids], kind="stable")
                parts = []
                for b in range(0, len(chunk), batch_size):
                    idx = order[b : b + batch_size]
                    parts.append(self._forward(pad_batch([ids[i] for i in idx], self.pad_id)))
                    if bar is not None:
                        bar.update(1)
                probs = torch.cat(parts).float().cpu().numpy()
                out[start + order] = probs
        if bar is not None:
            bar.close()
        return out

    def _forward(self, batch: tuple[Any, Any]) -> Any:
        """Softmax probabilities of one padded batch, left on the model's device."""
        import torch

        input_ids, mask = batch
        if self.device == "cuda":
            input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
            mask = mask.pin_memory().to(self.device, non_blocking=True)
        elif self.device != "cpu":
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        return torch.softmax(logits.float(), dim=-1)

    def _measure_cuda_precision(self, texts: list[str], batch_size: int) -> None:
        """'auto' on CUDA: keep whichever of fp32 and bf16 labels this model's batches faster.

        On an H200 a MiniLM-L6 student ran faster in fp32 than in bf16 (55,174 vs 30,653
        items/s with the tokenizer out of the loop): small encoders are bound by kernel
        launches and casts, not by the tensor cores' rate, so "bf16 because the GPU has it"
        was the slower choice there. Larger models go the other way. Rather than a rule
        drawn from one card, each precision labels the same batch of the caller's texts a
        few times, once per predictor, and the faster stays (``precision_reason`` says by how much).
        """
        import torch

        sample = texts[: batch_size * 4]
        ids = tokenize(self.tok, sample, self.max_length)
        ids.sort(key=len)
        batch = pad_batch(ids[-batch_size:], self.pad_id)
        fp32 = self.model
        timings: dict[str, float] = {}
        candidates = {"fp32": fp32}
        if torch.cuda.is_bf16_supported():
            import copy

            candidates["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
        with torch.inference_mode():
            for name, model in candidates.items():
                self.model = model
                timings[name] = best_time(lambda: self._forward(batch), sync=torch.cuda.synchronize)
        best = min(timings, key=lambda k: timings[k])
        self.model = candidates[best]
        self.precision = best
        shown = ", ".join(f"{k} {len(batch[0]) / v:,.0f} items/s" for k, v in timings.items())
        self.precision_reason = f"auto on CUDA, measured on a batch of {len(batch[0])}: {shown}"

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
