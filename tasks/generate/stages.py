"""The ``generate`` task type's train, evaluate and register stages, its summary and its table.

A LoRA (QLoRA with CUDA) causal-LM student trained on the teacher's medoids, judged by
ROUGE and BERTScore against human references, registered as a pyfunc that writes text.
Each stage is a plain function over a thin Prefect task in tasks/generate/work.py's terms
and returns a typed result (tasks/results/stages.py); the summary keeps the cost and
carbon keys of the classify path, so the same cost table renders.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import task

from distill.config import DistillConfig
from tasks.accounting.carbon import measure_energy
from tasks.accounting.costs import training_cost
from tasks.results.stages import Aggregation, Evaluation, Registration, Trained

PRIMARY_METRIC = "bertscore_f1"  # the gate's default figure; gate.metric may choose rougeL
GATE_FIGURES = {"bertscore_f1": "BERTScore F1", "rougeL": "ROUGE-L"}
TABLE_KEYS = ["teacher_bertscore_f1_single", "teacher_bertscore_f1_medoid", "teacher_rougeL_single",
              "teacher_rougeL_medoid", "student_bertscore_f1", "student_rougeL", "student_items_per_s",
              "teacher_items_per_s", "speed_ratio", "promoted"]
ANNOTATION_KEYS = ("items", "votes", "invalid_votes", "abstained", "mean_agreement", "requests_sent", "requests_cached",
                   "tokens_in", "tokens_out", "requests_deduplicated", "variation", "aggregation", "items_new",
                   "items_reused", "gold_items_scored", "teacher_items_per_s", "teacher_bertscore_f1_single",
                   "teacher_rougeL_single", "teacher_bertscore_f1_single_by_sample", "teacher_bertscore_f1_medoid",
                   "teacher_bertscore_precision_medoid", "teacher_bertscore_recall_medoid", "teacher_rouge1_medoid",
                   "teacher_rouge2_medoid", "teacher_rougeL_medoid", "teacher_share_empty_medoid",
                   "teacher_mean_words_medoid", "reference_mean_words", "bertscore_model", "bertscore_num_layers")
TRAIN_KEYS = ("train_items", "val_items", "excluded_abstained", "global_steps", "train_loss_first", "train_loss",
              "val_loss_before", "val_loss", "quantize_4bit", "student_dtype", "precision_reason", "trainable_params",
              "lora_r", "base_model")


@task(name="train-generator")
def train_generator_task(voted_pool: list[str], cfg: DistillConfig, out_dir: str, show_progress: bool) -> dict[str, Any]:
    from tasks.generate.work import train_generator
    from tasks.templates.label import load_prompt

    return train_generator(voted_pool, load_prompt(cfg.prompt), out_dir, cfg.student, show_progress)  # type: ignore[arg-type]


@task(name="evaluate-generator")
def evaluate_generator_task(voted_gold: list[str], cfg: DistillConfig, adapter_dir: str, base_dir: str,
                            out_dir: str) -> dict[str, Any]:
    from tasks.generate.work import evaluate_generator
    from tasks.templates.label import load_prompt

    en = cfg.energy
    with measure_energy("student-generate", en.country_iso_code, en.measure, en.cpu_power_w,
                        en.measure_power_secs) as reading:
        ev = evaluate_generator(voted_gold, load_prompt(cfg.prompt), adapter_dir, base_dir, cfg.student,  # type: ignore[arg-type]
                                out_dir)
    out = ev.summary()
    out["student_examples"] = ev.examples
    out["student_infer_kwh"] = reading.kwh
    out["student_kwh_per_item"] = reading.kwh / ev.items if reading.kwh is not None and ev.items else None
    out["student_kwh_per_item_method"] = f"{reading.method}, {ev.items:,} items generated in batches of {ev.batch_size}"
    return out


@task(name="register-generator")
def register_generator_task(model_uri: Any, cfg: DistillConfig, score: float, metric: str, voted_gold: list[str],
                            run_id: str, candidate: Optional[str] = None) -> dict[str, Any]:
    import pandas as pd

    from tasks.registry.gate import register_generator_and_gate

    df = pd.concat([pd.read_parquet(p, columns=["text", "label_gold"]) for p in voted_gold])
    return register_generator_and_gate(model_uri, cfg.tracking.model_name, score, metric, df["text"].tolist(),
                                       df["label_gold"].tolist(), cfg.gate.min_score, cfg.gate.min_improvement, run_id,
                                       candidate)


def train_stage(cfg: DistillConfig, agg: Aggregation, show_progress: bool) -> Trained:
    """LoRA-tune the generator on the pool's medoids (instruction -> text, loss on the answer tokens)."""
    if not agg.gold_paths:
        raise ValueError("task generate needs gold references to judge the student: data.gold_path gave no items")
    with training_cost(cfg.energy, cfg.pricing) as cost:
        tr = train_generator_task(agg.pool_paths, cfg, str(cfg.run_dir / "student"), show_progress)
    tr.update(cost)
    return Trained(tr["model_dir"], tr, tr.get("merged_dir"))


def evaluate_stage(cfg: DistillConfig, agg: Aggregation, model: Trained, teacher_items_per_s: Optional[float]) -> Evaluation:
    """ROUGE and BERTScore of the student's texts against the human references, and its speed."""
    ev = evaluate_generator_task(agg.gold_paths, cfg, model.model_dir, model.figures["base_model_dir"],
                                 str(cfg.run_dir / "evaluation"))
    ev["speed_ratio"] = ev["student_items_per_s"] / teacher_items_per_s if teacher_items_per_s else None
    gen = cfg.run_dir / "evaluation" / "generations.parquet"
    metric = PRIMARY_METRIC if cfg.gate.metric in ("auto", PRIMARY_METRIC) else "rougeL"
    return Evaluation(ev, metric, documents={"evaluation.json": ev},
                      tables={"generations.json": str(gen)} if gen.exists() else {})


def register_stage(cfg: DistillConfig, agg: Aggregation, model: Trained, ev: Evaluation, run_id: str) -> Registration:
    """Log the generator pyfunc (adapter + base, or merged), register it, gate on the configured metric."""
    import pandas as pd

    from tasks.generate.pyfunc import log_generator_model
    from tasks.templates.label import load_prompt

    def log_model() -> str:  # not called when a rerun finds this student already registered
        return log_generator_model(model.model_dir, model.merged_dir, load_prompt(cfg.prompt), cfg.student,
                                   pd.read_parquet(agg.pool_paths[0], columns=["text"])["text"].tolist()[:2]).model_uri

    reg = register_generator_task(log_model, cfg, ev.score, ev.primary_metric, agg.gold_paths, run_id, model.uid)
    return Registration.from_gate(reg)


def summary(ann: dict[str, Any], model: Trained, ev: Evaluation, reg: Registration, costs: dict[str, Any]) -> dict[str, Any]:
    """The generate run's figures for ``--summary-json``: teacher single/medoid and student, speed, gate, cost."""
    # the teacher's output tokens per second while it was busy answering (tokens per request x requests/s)
    rps, ok = ann.get("teacher_requests_per_s"), ann.get("requests_ok") or 0
    teacher_tps = (ann.get("tokens_out") or 0) / ok * rps if rps and ok else None
    return {"task": "generate",
            **{k: v for k, v in ann.items() if k in ANNOTATION_KEYS or k.startswith("samples_invalid_")},
            **ev.figures, **reg.summary(), **costs, **{k: model.figures[k] for k in TRAIN_KEYS},
            "teacher_tokens_per_s": teacher_tps, "student_precision": model.figures["student_dtype"]}


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def table(s: dict[str, Any]) -> str:
    """Teacher (single samples, medoid) against the student on the human references, speed and the gate."""
    n = s.get("gold_items_scored")
    rows = [
        "== distill run (generate): teacher vs student on human references ==",
        "| model | gold items | BERTScore F1 | BERTScore P | BERTScore R | ROUGE-1 | ROUGE-2 | ROUGE-L | empty | items/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher, 1 sample (mean of the k) | {n} | {_f(s.get('teacher_bertscore_f1_single'))} | | | | | "
        f"{_f(s.get('teacher_rougeL_single'))} | | {_f(s.get('teacher_items_per_s'), '.2f')} |",
        f"| teacher, medoid of k={s.get('samples_per_item')} | {n} | {_f(s.get('teacher_bertscore_f1_medoid'))} | "
        f"{_f(s.get('teacher_bertscore_precision_medoid'))} | {_f(s.get('teacher_bertscore_recall_medoid'))} | "
        f"{_f(s.get('teacher_rouge1_medoid'))} | {_f(s.get('teacher_rouge2_medoid'))} | {_f(s.get('teacher_rougeL_medoid'))} | "
        f"{_f(s.get('teacher_share_empty_medoid'), '.1%')} | |",
        f"| student (LoRA, zero-shot) | {s.get('student_items_scored')} | {_f(s.get('student_bertscore_f1'))} | "
        f"{_f(s.get('student_bertscore_precision'))} | {_f(s.get('student_bertscore_recall'))} | {_f(s.get('student_rouge1'))} | "
        f"{_f(s.get('student_rouge2'))} | {_f(s.get('student_rougeL'))} | {_f(s.get('student_share_empty'), '.1%')} | "
        f"{_f(s.get('student_items_per_s'), '.2f')} |",
        "",
        f"Teacher texts: medoid of k={s.get('samples_per_item')} ({s.get('variation')}), mean agreement "
        f"{_f(s.get('mean_agreement'))}; {s.get('invalid_votes')} of {s.get('votes')} pool samples invalid "
        f"({', '.join(f'{k[16:]} {v}' for k, v in s.items() if k.startswith('samples_invalid_') and v) or 'none'}), "
        f"{s.get('abstained')} items abstained. Student trained on {s.get('train_items')} medoids "
        f"({s.get('base_model')}, LoRA r={s.get('lora_r')}, {s.get('precision_reason')}); loss "
        f"{_f(s.get('train_loss_first'))} -> {_f(s.get('train_loss'))}. BERTScore: {s.get('bertscore_model', 'MiniLM')}, "
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
        rows.append(f"  e.g. reference: {ex['reference']}\n       teacher:   {ex['teacher']}\n       student:   {ex['student']}")
    return "\n".join(rows)


