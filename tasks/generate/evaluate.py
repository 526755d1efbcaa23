"""Judge the generate task on the human references: the teacher (single samples and medoid) and the LoRA student.

ROUGE and BERTScore (tasks/generate/metrics.py) against the gold subset's human texts, the
same items for teacher and student; the student's speed is measured after a warm-up.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from distill.config import GeneratorStudentConfig
from tasks.generate.aggregate import frames
from tasks.generate.medoid import word_count
from tasks.generate.metrics import bertscore, output_shares, rouge
from tasks.results.generate import GeneratorEvaluation, GeneratorGoldScores
from tasks.templates.generation import GenerationTemplate


def texts_of(xs: Any) -> list[str]:
    return ["" if x is None or (isinstance(x, float) and x != x) else str(x) for x in xs]


def teacher_gold_scores(voted_gold: list[str], max_words: Optional[int]) -> Optional[GeneratorGoldScores]:
    """The teacher on the human references: each single sample (mean over the k) and the medoid.

    A single sample is held to the medoid's rules: one that is invalid (empty, truncated, over
    length) scores as an empty text, as an abstaining medoid does. Scoring the raw text instead
    would credit one sample for answers the aggregation is not allowed to use.
    """
    df = frames(voted_gold)
    if df.empty:
        return None
    refs = texts_of(df["label_gold"])
    k = len(df["votes"].iloc[0])
    valid = df["sample_valid"] if "sample_valid" in df else [[True] * k] * len(df)
    singles_b, singles_r = [], []
    for j in range(k):
        preds = texts_of(v[j] if j < len(v) and ok[j] else None for v, ok in zip(df["votes"], valid))
        singles_b.append(bertscore(preds, refs).f1)
        singles_r.append(rouge(preds, refs).rougeL)
    med = texts_of(df["label"])
    b, r = bertscore(med, refs), rouge(med, refs)
    shares = output_shares([None if t == "" else t for t in med], max_words)
    return GeneratorGoldScores(
        gold_items_scored=len(df),
        teacher_bertscore_f1_single=sum(singles_b) / k,
        teacher_rougeL_single=sum(singles_r) / k,
        teacher_bertscore_f1_single_by_sample=singles_b,
        teacher_bertscore_f1_medoid=b.f1,
        teacher_bertscore_precision_medoid=b.precision,
        teacher_bertscore_recall_medoid=b.recall,
        teacher_rouge1_medoid=r.rouge1,
        teacher_rouge2_medoid=r.rouge2,
        teacher_rougeL_medoid=r.rougeL,
        teacher_share_empty_medoid=shares["empty"],
        teacher_mean_words_medoid=sum(word_count(t) for t in med) / len(med),
        reference_mean_words=sum(word_count(t) for t in refs) / len(refs),
        bertscore_model=b.model,
        bertscore_num_layers=b.num_layers,
    )


def evaluate_generator(
    voted_gold: list[str],
    *,
    template: GenerationTemplate,
    adapter_dir: str,
    base_dir: str,
    student: GeneratorStudentConfig,
    out_dir: str,
) -> GeneratorEvaluation:
    """Generate for every gold-subset item, score against the references, time it (after a warm-up).

    Energy and the speed ratio to the teacher are the stage's to add (it measures the whole call).
    """
    from tasks.generate.inference import generate, load_generator

    df = frames(voted_gold)
    refs = texts_of(df["label_gold"])
    model, tok = load_generator(adapter_dir, base_dir)
    instr = [template.student_instruction(t) for t in df["text"]]
    generate(model, tok, instr[:1], max_new_tokens=4, batch_size=1)  # warm-up
    t0 = time.perf_counter()
    outs = generate(
        model,
        tok,
        instr,
        max_new_tokens=student.max_new_tokens,
        batch_size=student.eval_batch_size,
        max_source_tokens=student.max_source_tokens,
    )
    wall = time.perf_counter() - t0
    preds = [o.text for o in outs]
    b, r = bertscore(preds, refs), rouge(preds, refs)
    shares = output_shares(preds, template.max_words)
    ev = GeneratorEvaluation(
        student_items_scored=len(preds),
        student_bertscore_f1=b.f1,
        student_bertscore_precision=b.precision,
        student_bertscore_recall=b.recall,
        student_rouge1=r.rouge1,
        student_rouge2=r.rouge2,
        student_rougeL=r.rougeL,
        student_share_empty=shares["empty"],
        student_share_too_long=shares["over_length"],
        student_share_truncated=sum(o.finish_reason == "length" for o in outs) / max(1, len(outs)),
        student_items_per_s=len(preds) / wall if wall > 0 else 0.0,
        student_tokens_per_s=sum(o.new_tokens for o in outs) / wall if wall > 0 else 0.0,
        student_mean_words=sum(word_count(p) for p in preds) / max(1, len(preds)),
        student_batch_size=student.eval_batch_size,
        student_examples=[
            {"id": str(i), "reference": ref, "student": p, "teacher": t or f"(abstained: {why or 'no valid sample'})"}
            for i, ref, t, why, p in list(
                zip(df["id"], refs, texts_of(df["label"]), texts_of(df.get("abstain_reason", [None] * len(df))), preds)
            )[:5]
        ],
    )
    od = Path(out_dir)
    od.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "id": df["id"],
            "reference": refs,
            "teacher_medoid": texts_of(df["label"]),
            "student": preds,
            "student_finish_reason": [o.finish_reason for o in outs],
            # per item, for the gate's paired comparison with the champion (tasks/generate/register.py)
            "student_bertscore_f1": b.per_item_f1,
            "student_rougeL": r.per_item_rougeL,
        }
    ).to_parquet(od / "generations.parquet")
    (od / "student_eval.json").write_text(json.dumps(asdict(ev), indent=2))
    return ev
