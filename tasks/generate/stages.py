"""The ``generate`` task type's stages: the medoid of the k texts, the LoRA student trained, evaluated, registered.

A LoRA (QLoRA with CUDA) causal-LM student trained on the teacher's medoids, judged by
ROUGE and BERTScore against human references, registered as a pyfunc that writes text.
Each stage receives the config sections it reads and returns a typed result
(tasks/results/stages.py); the Prefect tasks here are thin wrappers over the plain
functions of tasks/generate/; the summary keeps the cost and carbon keys of the classify
path, so the same cost table renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import task

from distill.config import EnergyConfig, GateConfig, GeneratorStudentConfig, PricingConfig, VoteConfig
from tasks.accounting.carbon import measure_energy
from tasks.accounting.costs import training_cost
from tasks.generate.aggregate import medoid_shards, medoid_summary
from tasks.generate.evaluate import evaluate_generator, teacher_gold_scores
from tasks.generate.pyfunc import log_generator_model
from tasks.generate.register import register_generator
from tasks.generate.train import train_generator
from tasks.results.generate import GeneratorEvaluation, GeneratorTraining
from tasks.results.stages import Aggregation, Evaluation, Registration, Trained
from tasks.templates.generation import GenerationTemplate

GENERATIONS_TABLE = (
    "generations.json"  # the evaluation's table of generations (and per-item scores), by its MLflow name
)

PRIMARY_METRIC = "bertscore_f1"  # the gate's default figure; gate.metric may choose rougeL
GATE_FIGURES = {"bertscore_f1": "BERTScore F1", "rougeL": "ROUGE-L"}
TABLE_KEYS = [
    "teacher_bertscore_f1_single",
    "teacher_bertscore_f1_medoid",
    "teacher_rougeL_single",
    "teacher_rougeL_medoid",
    "student_bertscore_f1",
    "student_rougeL",
    "student_items_per_s",
    "teacher_items_per_s",
    "speed_ratio",
    "promoted",
]
ANNOTATION_KEYS = (
    "items",
    "votes",
    "invalid_votes",
    "abstained",
    "mean_agreement",
    "requests_sent",
    "requests_cached",
    "tokens_in",
    "tokens_out",
    "requests_deduplicated",
    "variation",
    "aggregation",
    "items_new",
    "items_reused",
    "gold_items_scored",
    "teacher_items_per_s",
    "teacher_bertscore_f1_single",
    "teacher_rougeL_single",
    "teacher_bertscore_f1_single_by_sample",
    "teacher_bertscore_f1_medoid",
    "teacher_bertscore_precision_medoid",
    "teacher_bertscore_recall_medoid",
    "teacher_rouge1_medoid",
    "teacher_rouge2_medoid",
    "teacher_rougeL_medoid",
    "teacher_share_empty_medoid",
    "teacher_mean_words_medoid",
    "reference_mean_words",
    "bertscore_model",
    "bertscore_num_layers",
)
TRAIN_KEYS = (
    "train_items",
    "val_items",
    "excluded_abstained",
    "global_steps",
    "train_loss_first",
    "train_loss",
    "val_loss_before",
    "val_loss",
    "quantize_4bit",
    "student_dtype",
    "precision_reason",
    "trainable_params",
    "lora_r",
    "base_model",
)


@task(name="aggregate", task_run_name="aggregate-{name}")
def medoid_task(
    ann_paths: list[str],
    out_dir: str,
    name: str,
    *,
    samples: int,
    vote: VoteConfig,  # noqa: ARG001
    max_words: Optional[int],
) -> list[str]:
    return medoid_shards(ann_paths, out_dir, samples, vote.similarity.value, max_words)


def aggregate_stage(
    pool: list[str], gold: list[str], *, vote: VoteConfig, template: GenerationTemplate, samples: int, votes_dir: Path
) -> Aggregation:
    """The medoid of each item's k texts, for the pool and the gold subset; the teacher scored on the references."""
    voted = {
        split: medoid_task(
            paths, str(votes_dir / split), split, samples=samples, vote=vote, max_words=template.max_words
        )
        for split, paths in (("pool", pool), ("gold", gold))
    }
    scores = teacher_gold_scores(voted["gold"], template.max_words) if voted["gold"] else None
    if scores is not None:
        g = medoid_summary(voted["gold"], samples)
        scores.gold_invalid_votes, scores.gold_abstained = g.invalid_votes, g.abstained
    return Aggregation(
        voted["pool"], voted["gold"], str(votes_dir / "pool"), medoid_summary(voted["pool"], samples), scores
    )


@task(name="train-generator")
def train_generator_task(
    voted_pool: list[str],
    *,
    template: GenerationTemplate,
    out_dir: str,
    student: GeneratorStudentConfig,
    show_progress: bool,
) -> GeneratorTraining:
    return train_generator(voted_pool, template=template, out_dir=out_dir, student=student, show_progress=show_progress)


def train_stage(
    agg: Aggregation,
    *,
    student: GeneratorStudentConfig,
    template: GenerationTemplate,
    energy: EnergyConfig,
    pricing: PricingConfig,
    out_dir: Path,
    show_progress: bool,
) -> Trained:
    """LoRA-tune the generator on the pool's medoids (instruction -> text, loss on the answer tokens)."""
    if not agg.gold_paths:
        raise ValueError("task generate needs gold references to judge the student: data.gold_path gave no items")
    with training_cost(energy, pricing) as meter:
        tr = train_generator_task(
            agg.pool_paths, template=template, out_dir=str(out_dir), student=student, show_progress=show_progress
        )
    assert meter.cost is not None
    return Trained(tr.model_dir, tr, meter.cost, tr.merged_dir)


@task(name="evaluate-generator")
def evaluate_generator_task(
    voted_gold: list[str],
    *,
    template: GenerationTemplate,
    adapter_dir: str,
    base_dir: str,
    student: GeneratorStudentConfig,
    energy: EnergyConfig,
    out_dir: str,
) -> GeneratorEvaluation:
    with measure_energy(
        "student-generate",
        energy.country_iso_code,
        enabled=energy.measure,
        cpu_power_w=energy.cpu_power_w,
        measure_power_secs=energy.measure_power_secs,
    ) as reading:
        ev = evaluate_generator(
            voted_gold, template=template, adapter_dir=adapter_dir, base_dir=base_dir, student=student, out_dir=out_dir
        )
    n = ev.student_items_scored
    ev.student_infer_kwh = reading.kwh
    ev.student_kwh_per_item = reading.kwh / n if reading.kwh is not None and n else None
    ev.student_kwh_per_item_method = f"{reading.method}, {n:,} items generated in batches of {ev.student_batch_size}"
    return ev


def evaluate_stage(
    agg: Aggregation,
    model: Trained,
    *,
    student: GeneratorStudentConfig,
    template: GenerationTemplate,
    gate_metric: str,
    energy: EnergyConfig,
    out_dir: Path,
    teacher_items_per_s: Optional[float],
) -> Evaluation:
    """ROUGE and BERTScore of the student's texts against the human references, and its speed."""
    assert isinstance(model.figures, GeneratorTraining)
    ev = evaluate_generator_task(
        agg.gold_paths,
        template=template,
        adapter_dir=model.model_dir,
        base_dir=model.figures.base_model_dir,
        student=student,
        energy=energy,
        out_dir=str(out_dir),
    )
    ev.speed_ratio = ev.student_items_per_s / teacher_items_per_s if teacher_items_per_s else None
    gen = out_dir / "generations.parquet"
    metric = PRIMARY_METRIC if gate_metric in ("auto", PRIMARY_METRIC) else "rougeL"
    score = ev.student_bertscore_f1 if metric == "bertscore_f1" else ev.student_rougeL
    return Evaluation(ev, metric, score, tables={GENERATIONS_TABLE: str(gen)} if gen.exists() else {})


@task(name="register-generator")
def register_generator_task(
    log_model: Any,
    *,
    voted_gold: list[str],
    generations_path: Optional[str],
    model_name: str,
    score: float,
    metric: str,
    gate: GateConfig,
    run_id: str,
    candidate: Optional[str],
) -> Registration:
    """Reads the gold documents and the challenger's per-item scores itself: big lists never travel as parameters."""
    import pandas as pd

    df = pd.concat([pd.read_parquet(p, columns=["id", "text", "label_gold"]) for p in voted_gold])
    challenger = None
    column = "student_bertscore_f1" if metric == "bertscore_f1" else "student_rougeL"
    if generations_path and Path(generations_path).exists() and gate.bootstrap_resamples > 0:
        gen = pd.read_parquet(generations_path)
        if column in gen.columns:  # generations of an evaluation before 2026-12-05 have no per-item scores
            by_id: dict[str, float] = dict(zip(gen["id"].astype(str), gen[column].astype(float)))
            challenger = [by_id[str(i)] for i in df["id"]]
    return register_generator(
        log_model,
        model_name=model_name,
        score=score,
        metric=metric,
        documents=df["text"].tolist(),
        references=df["label_gold"].tolist(),
        gate=gate,
        challenger_scores=challenger,
        run_id=run_id,
        candidate=candidate,
    )


def register_stage(
    agg: Aggregation,
    model: Trained,
    ev: Evaluation,
    *,
    student: GeneratorStudentConfig,
    template: GenerationTemplate,
    model_name: str,
    gate: GateConfig,
    run_id: str,
) -> Registration:
    """Log the generator pyfunc (adapter + base, or merged), register it, gate on the configured metric."""
    import pandas as pd

    def log_model() -> str:  # not called when a rerun finds this student already registered
        texts = pd.read_parquet(agg.pool_paths[0], columns=["text"])["text"].tolist()[:2]
        return log_generator_model(model.model_dir, model.merged_dir, template, student, texts).model_uri

    return register_generator_task(
        log_model,
        voted_gold=agg.gold_paths,
        generations_path=ev.tables.get(GENERATIONS_TABLE),
        model_name=model_name,
        score=ev.score,
        metric=ev.primary_metric,
        gate=gate,
        run_id=run_id,
        candidate=model.uid,
    )


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def table(s: dict[str, Any]) -> str:
    """Teacher (single samples, medoid) against the student on the human references, speed and the gate."""
    n = s.get("gold_items_scored")
    rows = [
        "== distill run (generate): teacher vs student on human references ==",
        "| model | gold items | BERTScore F1 | BERTScore P | BERTScore R | ROUGE-1 | ROUGE-2 | ROUGE-L | empty | "
        "items/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher, 1 sample (mean of the k) | {n} | {_f(s.get('teacher_bertscore_f1_single'))} | | | | | "
        f"{_f(s.get('teacher_rougeL_single'))} | | {_f(s.get('teacher_items_per_s'), '.2f')} |",
        f"| teacher, medoid of k={s.get('samples_per_item')} | {n} | {_f(s.get('teacher_bertscore_f1_medoid'))} | "
        f"{_f(s.get('teacher_bertscore_precision_medoid'))} | {_f(s.get('teacher_bertscore_recall_medoid'))} | "
        f"{_f(s.get('teacher_rouge1_medoid'))} | {_f(s.get('teacher_rouge2_medoid'))} | "
        f"{_f(s.get('teacher_rougeL_medoid'))} | "
        f"{_f(s.get('teacher_share_empty_medoid'), '.1%')} | |",
        f"| student (LoRA, zero-shot) | {s.get('student_items_scored')} | {_f(s.get('student_bertscore_f1'))} | "
        f"{_f(s.get('student_bertscore_precision'))} | {_f(s.get('student_bertscore_recall'))} | "
        f"{_f(s.get('student_rouge1'))} | "
        f"{_f(s.get('student_rouge2'))} | {_f(s.get('student_rougeL'))} | {_f(s.get('student_share_empty'), '.1%')} | "
        f"{_f(s.get('student_items_per_s'), '.2f')} |",
        "",
        f"Teacher texts: medoid of k={s.get('samples_per_item')} ({s.get('variation')}), mean agreement "
        f"{_f(s.get('mean_agreement'))}; {s.get('invalid_votes')} of {s.get('votes')} pool samples invalid "
        f"({', '.join(f'{k[16:]} {v}' for k, v in s.items() if k.startswith('samples_invalid_') and v) or 'none'}), "
        f"{s.get('abstained')} items abstained. Student trained on {s.get('train_items')} medoids "
        f"({s.get('base_model')}, LoRA r={s.get('lora_r')}, {s.get('precision_reason')}); loss "
        f"{_f(s.get('train_loss_first'))} -> {_f(s.get('train_loss'))}. BERTScore: "
        f"{s.get('bertscore_model', 'MiniLM')}, "
        f"layer {s.get('bertscore_num_layers', 6)}, no baseline rescaling.",
        f"Speed: student {_f(s.get('student_tokens_per_s'), '.1f')} tokens/s, teacher "
        f"{_f(s.get('teacher_tokens_per_s'), '.1f')} tokens/s; student items/s is "
        f"{_f(s.get('speed_ratio'), '.1f')}x the teacher's on this machine.",
        f"Gate ({GATE_FIGURES.get(s.get('gate_metric', ''), s.get('gate_metric'))}): "
        f"{'PROMOTED to champion' if s.get('promoted') else 'not promoted'} - {s.get('gate_reason')}",
        f"MLflow run {s.get('mlflow_run_id')}, model {s.get('model_name')} version {s.get('model_version')}.",
        "Stage seconds: " + ", ".join(f"{k} {v}" for k, v in (s.get("stage_seconds") or {}).items()),
    ]
    for ex in (s.get("student_examples") or [])[:2]:
        rows.append(
            f"  e.g. reference: {ex['reference']}\n       teacher:   {ex['teacher']}\n       student:   {ex['student']}"
        )
    return "\n".join(rows)
