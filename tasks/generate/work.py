"""The ``generate`` task type's stages: medoid aggregation, teacher scores on gold, LoRA student, evaluation.

Why one module: these are the places where writing text differs from labelling it
(tasks/pipeline/task_types.py puts them behind the same seam as classification). The teacher's k
samples of an item are aggregated into their medoid (tasks/generate/medoid.py); the student learns
``template.student_instruction(document) -> medoid`` with LoRA (tasks/generate/lora.py); both
are scored against the human references with ROUGE and BERTScore (tasks/generate/metrics.py).
Data moves between stages as Parquet shards, as for classification.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.templates.generation import GenerationTemplate, effective_finish_reason
from tasks.generate.medoid import medoid_frame, medoid_stats, sample_invalid_reason, word_count
from tasks.generate.metrics import bertscore, output_shares, rouge


def _write(df: pd.DataFrame, dst: Path) -> str:
    tmp = dst.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(dst)
    return str(dst)


def _frames(paths: list[str]) -> pd.DataFrame:
    frames = [pq.read_table(p).to_pandas() for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _effective_finishes(ann: pd.DataFrame, k: int) -> list[list[Optional[str]]]:
    """Each sample's finish reason as it bears on the kept text (see ``effective_finish_reason``)."""
    if "finish_reasons" not in ann:
        return [[None] * k for _ in range(len(ann))]
    answers = ann["answers"] if "answers" in ann else [[None] * k] * len(ann)
    return [[effective_finish_reason(a, v, fr) for a, v, fr in zip(ans, vs, frs)]
            for ans, vs, frs in zip(answers, ann["votes"], ann["finish_reasons"])]


# -- aggregate ---------------------------------------------------------------------------------------------
def medoid_shards(ann_paths: list[str], out_dir: str, k: int, similarity: str, max_words: Optional[int]) -> list[str]:
    """Aggregate each annotation shard's k texts per item into its medoid; every item is kept (abstentions too).

    Columns added, as the vote adds them for labels: ``label`` (the medoid text, None when
    the item abstains), ``confidence`` (its agreement: mean similarity to the other valid
    samples), ``medoid_sample``, ``n_valid_votes``, ``n_votes``, ``invalid_reasons``, ``abstain_reason``.
    """
    od = Path(out_dir)
    od.mkdir(parents=True, exist_ok=True)
    outs = []
    for p in ann_paths:
        ann = pq.read_table(p).to_pandas()
        fins = _effective_finishes(ann, k)
        long = [{"item_id": i, "sample": j, "text": v, "finish_reason": fr}
                for i, (vs, frs) in enumerate(zip(ann["votes"], fins)) for j, (v, fr) in enumerate(zip(vs, frs))]
        med = medoid_frame(pd.DataFrame(long, columns=["item_id", "sample", "text", "finish_reason"]), k=k,
                           method=similarity, max_words=max_words)
        med = med.set_index("item_id").reindex(range(len(ann)))
        out = ann.copy()
        out["sample_valid"] = [[sample_invalid_reason(v, fr, max_words) is None for v, fr in zip(vs, frs)]
                               for vs, frs in zip(ann["votes"], fins)]
        for src, dst in (("text", "label"), ("agreement", "confidence"), ("medoid_sample", "medoid_sample"),
                         ("n_valid", "n_valid_votes"), ("invalid_reasons", "invalid_reasons"),
                         ("abstain_reason", "abstain_reason")):
            out[dst] = pd.Series(med[src].tolist(), index=out.index, dtype=object)
        out["n_votes"] = k
        outs.append(_write(out, od / Path(p).name))
    return outs


def medoid_summary(voted_paths: list[str], k: int) -> dict[str, Any]:
    """Items, samples, invalid samples by reason, abstentions and mean agreement, under the summary's keys."""
    df = _frames(voted_paths)
    if df.empty:
        return {"items": 0, "votes": 0, "invalid_votes": 0, "abstained": 0}
    st = medoid_stats(df.rename(columns={"label": "text", "confidence": "agreement"}))
    out: dict[str, Any] = {"items": int(st["items"]), "votes": int(st["items"]) * k,
                           "invalid_votes": int(st["samples_invalid"]), "abstained": int(st["items_abstained"]),
                           "mean_agreement": st.get("mean_agreement")}
    out.update({k2: v for k2, v in st.items() if k2.startswith("samples_invalid_")})
    return out


# -- teacher on gold -----------------------------------------------------------------------------------------
def _texts(xs: Any) -> list[str]:
    return ["" if x is None or (isinstance(x, float) and x != x) else str(x) for x in xs]


def teacher_gold_scores(voted_gold: list[str], max_words: Optional[int]) -> dict[str, Any]:
    """The teacher on the human references: each single sample (mean over the k) and the medoid.

    A single sample is held to the medoid's rules: one that is invalid (empty, truncated, over
    length) scores as an empty text, as an abstaining medoid does. Scoring the raw text instead
    would credit one sample for answers the aggregation is not allowed to use.
    """
    df = _frames(voted_gold)
    if df.empty:
        return {}
    refs = _texts(df["label_gold"])
    k = len(df["votes"].iloc[0])
    valid = df["sample_valid"] if "sample_valid" in df else [[True] * k] * len(df)
    singles_b, singles_r = [], []
    for j in range(k):
        preds = _texts(v[j] if j < len(v) and ok[j] else None for v, ok in zip(df["votes"], valid))
        singles_b.append(bertscore(preds, refs).f1)
        singles_r.append(rouge(preds, refs).rougeL)
    med = _texts(df["label"])
    b, r = bertscore(med, refs), rouge(med, refs)
    shares = output_shares([None if t == "" else t for t in med], max_words)
    return {
        "gold_items_scored": len(df),
        "teacher_bertscore_f1_single": sum(singles_b) / k, "teacher_rougeL_single": sum(singles_r) / k,
        "teacher_bertscore_f1_single_by_sample": singles_b,
        "teacher_bertscore_f1_medoid": b.f1, "teacher_bertscore_precision_medoid": b.precision,
        "teacher_bertscore_recall_medoid": b.recall, "teacher_rouge1_medoid": r.rouge1,
        "teacher_rouge2_medoid": r.rouge2, "teacher_rougeL_medoid": r.rougeL,
        "teacher_share_empty_medoid": shares["empty"], "teacher_mean_words_medoid":
            sum(word_count(t) for t in med) / len(med),
        "reference_mean_words": sum(word_count(t) for t in refs) / len(refs),
        "bertscore_model": b.model, "bertscore_num_layers": b.num_layers,
    }


# -- train ---------------------------------------------------------------------------------------------------
def training_pairs(voted_pool: list[str], template: GenerationTemplate) -> tuple[list[str], list[str], int]:
    """(zero-shot instruction, medoid) for every item that did not abstain, and how many abstained."""
    df = _frames(voted_pool)
    keep = df[df["label"].notna()] if not df.empty else df
    return ([template.student_instruction(t) for t in keep["text"]], [str(x) for x in keep["label"]],
            len(df) - len(keep))


def lora_params(student: Any) -> Any:
    """The config's GeneratorStudentConfig as tasks.lora_student's parameters."""
    from tasks.generate.lora import LoraParams

    return LoraParams(base_model=student.base_model, r=student.lora_r, alpha=student.lora_alpha,
                      dropout=student.lora_dropout, target_modules=tuple(student.target_modules),
                      learning_rate=student.learning_rate, epochs=student.epochs, max_steps=student.max_steps,
                      batch_size=student.batch_size, max_source_tokens=student.max_source_tokens,
                      max_target_tokens=student.max_target_tokens, max_new_tokens=student.max_new_tokens,
                      seed=student.seed, quantize=student.quantize, merge=student.merge)


def train_generator(voted_pool: list[str], template: GenerationTemplate, out_dir: str, student: Any,
                    show_progress: bool = True) -> dict[str, Any]:
    """LoRA-tune the student on the teacher's medoids; the summary keys the report and MLflow read."""
    from tasks.generate.lora import train_lora

    instructions, targets, abstained = training_pairs(voted_pool, template)
    if len(targets) < 4:
        raise ValueError(f"only {len(targets)} items with a teacher text ({abstained} abstained): too few to train a student")
    res = train_lora(instructions, targets, out_dir, lora_params(student), progress=show_progress)
    return {"model_dir": res.adapter_dir, "base_model_dir": res.base_model_dir, "merged_dir": res.merged_dir,
            "train_items": res.train_examples, "val_items": res.eval_examples, "excluded_abstained": abstained,
            "device": res.precision.device, "quantize_4bit": res.precision.quantize_4bit,
            "student_dtype": res.precision.dtype, "precision_reason": res.precision.reason, "global_steps": res.steps,
            "train_loss_first": res.first_loss, "train_loss": res.last_loss, "val_loss_before": res.eval_loss_before,
            "val_loss": res.eval_loss_after, "train_seconds": res.seconds, "trainable_params": res.trainable_params,
            "total_params": res.total_params, "lora_r": student.lora_r, "base_model": student.base_model}


# -- evaluate ------------------------------------------------------------------------------------------------
@dataclass
class GeneratorEval:
    """The student on the teacher's gold subset (same items, same references), with its speed."""

    items: int
    bertscore_f1: float
    bertscore_precision: float
    bertscore_recall: float
    rouge1: float
    rouge2: float
    rougeL: float
    share_empty: float
    share_too_long: float
    share_truncated: float
    items_per_s: float
    tokens_per_s: float
    mean_words: float
    batch_size: int
    examples: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        out = {f"student_{k}": v for k, v in d.items() if k not in ("examples", "items", "batch_size")}
        out.update({"student_items_scored": self.items, "student_batch_size": self.batch_size})
        return out


def evaluate_generator(voted_gold: list[str], template: GenerationTemplate, adapter_dir: str, base_dir: str,
                       student: Any, out_dir: str) -> GeneratorEval:
    """Generate for every gold-subset item, score against the references, time it (after a warm-up)."""
    from tasks.generate.lora import generate, load_generator

    df = _frames(voted_gold)
    refs = _texts(df["label_gold"])
    model, tok = load_generator(adapter_dir, base_dir)
    instr = [template.student_instruction(t) for t in df["text"]]
    generate(model, tok, instr[:1], max_new_tokens=4, batch_size=1)  # warm-up
    t0 = time.perf_counter()
    outs = generate(model, tok, instr, max_new_tokens=student.max_new_tokens, batch_size=student.eval_batch_size,
                    max_source_tokens=student.max_source_tokens)
    wall = time.perf_counter() - t0
    preds = [o.text for o in outs]
    b, r = bertscore(preds, refs), rouge(preds, refs)
    shares = output_shares(preds, template.max_words)
    ev = GeneratorEval(
        items=len(preds), bertscore_f1=b.f1, bertscore_precision=b.precision, bertscore_recall=b.recall,
        rouge1=r.rouge1, rouge2=r.rouge2, rougeL=r.rougeL, share_empty=shares["empty"],
        share_too_long=shares["over_length"],
        share_truncated=sum(o.finish_reason == "length" for o in outs) / max(1, len(outs)),
        items_per_s=len(preds) / wall if wall > 0 else 0.0,
        tokens_per_s=sum(o.new_tokens for o in outs) / wall if wall > 0 else 0.0,
        mean_words=sum(word_count(p) for p in preds) / max(1, len(preds)), batch_size=student.eval_batch_size,
        examples=[{"id": str(i), "reference": ref, "student": p,
                   "teacher": t or f"(abstained: {why or 'no valid sample'})"}
                  for i, ref, t, why, p in list(zip(df["id"], refs, _texts(df["label"]),
                                                    _texts(df.get("abstain_reason", [None] * len(df))), preds))[:5]],
    )
    od = Path(out_dir)
    od.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": df["id"], "reference": refs, "teacher_medoid": _texts(df["label"]), "student": preds,
                  "student_finish_reason": [o.finish_reason for o in outs]}).to_parquet(od / "generations.parquet")
    (od / "student_eval.json").write_text(json.dumps(asdict(ev), indent=2))
    return ev
