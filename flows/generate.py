"""The ``generate`` task's stages after aggregation: train a LoRA student, evaluate it, register it.

Called from :func:`flows.distill.distill_flow` once the annotate subflow has produced the
teacher's medoids (pool and gold subset). Each stage is a thin Prefect task over a plain
function in tasks/generate_task.py, logs into a nested MLflow run, and the summary keeps
the cost and carbon keys of the classify path, so the same cost table renders.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task

from distill.config import DistillConfig
from tasks.carbon import measure_energy
from tasks.costs import cost_chart, projection

GATE_FIGURES = {"bertscore_f1": "BERTScore F1", "rougeL": "ROUGE-L"}


@task(name="train-generator")
def train_generator_task(voted_pool: list[str], cfg: DistillConfig, out_dir: str, show_progress: bool) -> dict[str, Any]:
    from tasks.generate_task import train_generator
    from tasks.prompting import load_prompt

    return train_generator(voted_pool, load_prompt(cfg.prompt), out_dir, cfg.student, show_progress)  # type: ignore[arg-type]


@task(name="evaluate-generator")
def evaluate_generator_task(voted_gold: list[str], cfg: DistillConfig, adapter_dir: str, base_dir: str,
                            out_dir: str) -> dict[str, Any]:
    from tasks.generate_task import evaluate_generator
    from tasks.prompting import load_prompt

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
def register_generator_task(model_uri: str, cfg: DistillConfig, score: float, metric: str, voted_gold: list[str],
                            run_id: str) -> dict[str, Any]:
    import pandas as pd

    from tasks.registry import register_generator_and_gate

    df = pd.concat([pd.read_parquet(p, columns=["text", "label_gold"]) for p in voted_gold])
    return register_generator_and_gate(model_uri, cfg.tracking.model_name, score, metric, df["text"].tolist(),
                                       df["label_gold"].tolist(), cfg.gate.min_score, cfg.gate.min_improvement, run_id)


def generate_stages(cfg: DistillConfig, ann: dict[str, Any], run_id: str, show_progress: bool,
                    stage_s: dict[str, float]) -> dict[str, Any]:
    """Train, evaluate and register the generator student; returns the summary's student, gate and cost parts."""
    import mlflow
    import pandas as pd

    from flows.distill import COST_KEYS, _numeric
    from tasks.generator_model import log_generator_model
    from tasks.prompting import load_prompt

    run_dir = cfg.run_dir
    voted_pool = sorted(str(p) for p in Path(ann["votes_dir"]).glob("*.parquet"))
    voted_gold = sorted(str(p) for p in (run_dir / "votes" / "gold").glob("*.parquet"))
    if not voted_gold:
        raise ValueError("task generate needs gold references to judge the student: data.gold_path gave no items")
    en = cfg.energy
    t0 = time.monotonic()
    with measure_energy("student-train", en.country_iso_code, en.measure, en.cpu_power_w,
                        en.measure_power_secs) as train_energy:
        tr = train_generator_task(voted_pool, cfg, str(run_dir / "student"), show_progress)
    stage_s["train"] = time.monotonic() - t0
    tr.update(train_energy.as_dict("student_train"))
    tr["student_train_usd"] = cfg.pricing.hardware_usd_per_hour * train_energy.duration_s / 3600
    tr["student_train_usd_method"] = (f"measured {train_energy.duration_s:.0f} s x ${cfg.pricing.hardware_usd_per_hour:g}/h "
                                      f"({cfg.pricing.hardware_name})")
    with mlflow.start_run(run_name="train", nested=True):
        mlflow.log_params({k: str(v)[:500] for k, v in tr.items() if not isinstance(v, (int, float)) or isinstance(v, bool)})
        mlflow.log_metrics(_numeric(tr))

    t0 = time.monotonic()
    ev = evaluate_generator_task(voted_gold, cfg, tr["model_dir"], tr["base_model_dir"], str(run_dir / "evaluation"))
    stage_s["evaluate"] = time.monotonic() - t0
    t_ips = ann.get("teacher_items_per_s")
    ev["speed_ratio"] = ev["student_items_per_s"] / t_ips if t_ips else None
    with mlflow.start_run(run_name="evaluate", nested=True):
        mlflow.log_metrics(_numeric({k: v for k, v in ev.items() if k != "student_examples"}))
        mlflow.log_dict(ev, "evaluation.json")
        gen = run_dir / "evaluation" / "generations.parquet"
        if gen.exists():
            mlflow.log_table(pd.read_parquet(gen), "generations.json")

    costs = {k: v for k, v in ann.items() if k.startswith("teacher_") and
             (k in COST_KEYS or k.endswith("_method") or k in ("teacher_requests_billed", "teacher_attempts",
                                                               "teacher_usd_failed_attempts", "teacher_prices",
                                                               "teacher_usd_per_mtok_equivalent"))}
    costs.update({k: v for k, v in tr.items() if k.startswith("student_train_")})
    costs.update(projection(cfg, ann, ev.get("student_items_per_s"), ev.get("student_kwh_per_item"),
                            ev.get("student_kwh_per_item_method", "not measured")))
    with __import__("contextlib").suppress(Exception):
        mlflow.log_artifact(cost_chart(costs, run_dir / "evaluation" / "cost_per_1m.png"), "plots")
    mlflow.log_metrics(_numeric({k: costs.get(k) for k in COST_KEYS}))
    mlflow.log_dict(costs, "costs.json")

    t0 = time.monotonic()
    template = load_prompt(cfg.prompt)
    metric = "bertscore_f1" if cfg.gate.metric in ("auto", "bertscore_f1") else "rougeL"
    score = ev[f"student_{metric}"]
    info = log_generator_model(tr["model_dir"], tr.get("merged_dir"), template, cfg.student,
                               pd.read_parquet(voted_pool[0], columns=["text"])["text"].tolist()[:2])
    reg = register_generator_task(info.model_uri, cfg, score, metric, voted_gold, run_id)
    stage_s["register"] = time.monotonic() - t0
    # the teacher's output tokens per second while it was busy answering (tokens per request x requests/s)
    rps, ok = ann.get("teacher_requests_per_s"), ann.get("requests_ok") or 0
    teacher_tps = (ann.get("tokens_out") or 0) / ok * rps if rps and ok else None
    return {**{k: v for k, v in ev.items()}, **reg, **costs,
            **{k: tr[k] for k in ("train_items", "val_items", "excluded_abstained", "global_steps", "train_loss_first",
                                  "train_loss", "val_loss_before", "val_loss", "quantize_4bit", "student_dtype",
                                  "precision_reason", "trainable_params", "lora_r", "base_model")},
            "teacher_tokens_per_s": teacher_tps, "student_precision": tr["student_dtype"]}


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def generate_table(s: dict[str, Any]) -> str:
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


__all__ = ["generate_stages", "generate_table"]
