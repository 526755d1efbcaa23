"""A model card for every registered version: what made it, how good it is on human gold, what it costs.

Why: whoever opens the MLflow registry sees a version number and tags; the card says which
teacher and prompt labelled which data, the gold figures of teacher and student (with the
gate's interval), per class and calibrated or not, the money and CO2 per run and per 1M
items with how each was obtained, the gate's decision, and the commit and config. Every
figure is taken from the run's summary (the ``--summary-json``), so the card cannot
disagree with it; the "Figures" table names each summary key beside its value, for people
and for the test that checks them. The card is the version's description (the registry UI
renders it as Markdown), the run's ``model_card.md`` artifact and a file in the run folder.

The prompt goes to MLflow's prompt registry under ``<model name>-prompt``: a new version
only when the template's text changed; the model version's ``prompt_uri`` tag links to it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# the summary keys shown in the Figures table, in this order, where the run has them
GOLD_KEYS = [
    "teacher_macro_f1_voted",
    "teacher_macro_f1_single",
    "teacher_subset_items",
    "student_macro_f1",
    "student_macro_f1_on_teacher_subset",
    "student_accuracy",
    "majority_baseline_macro_f1",
    "gold_items",
    "teacher_bertscore_f1_medoid",
    "student_bertscore_f1",
    "student_rougeL",
    "gold_items_scored",
]
GATE_KEYS = ["gate_improvement", "gate_improvement_ci_low", "gate_improvement_ci_high", "previous_champion_version"]
CALIBRATION_KEYS = ["teacher_ece", "student_ece"]
COST_KEYS = [
    "teacher_usd",
    "student_train_usd",
    "teacher_gco2",
    "student_train_gco2",
    "teacher_usd_per_1m",
    "student_usd_per_1m",
    "cost_ratio_per_1m",
    "teacher_kgco2_per_1m",
    "student_kgco2_per_1m",
    "co2_ratio_per_1m",
    "review_usd",
]
DATA_KEYS = [
    "items",
    "train_items",
    "abstained",
    "samples_per_item",
    "human_labelled_items",
    "human_share",
    "review_items",
    "review_disagreements",
    "gold_items_from_review",
    "review_labels_version",
    "review_labels_digest",
]


@dataclass
class CardFacts:
    """What the card needs beyond the summary: where the labels came from, and the code and config that ran."""

    task: str
    labels: list[str]
    teacher_model: str
    endpoint: str  # "embedded llama-server", or the endpoint's host (never a key)
    teacher_mode: str
    prompt_path: str
    prompt_text: str
    prompt_uri: Optional[str]
    pool_source: str
    gold_source: str
    digests: dict[str, str] = field(default_factory=dict)  # MLflow dataset name -> digest
    student_base: str = ""
    prompt_hash: str = ""
    commit: str = "unknown"
    config: dict[str, Any] = field(default_factory=dict)


def fmt(v: Any) -> str:
    """How a figure is written in the card: floats to 4 decimals, the rest as text, missing as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _rows(summary: dict[str, Any], keys: Iterable[str]) -> list[str]:
    return [f"| `{k}` | {fmt(summary[k])} |" for k in keys if k in summary]


def _methods(summary: dict[str, Any], keys: Iterable[str]) -> list[str]:
    return [f"- `{k}`: {summary[f'{k}_method']}" for k in keys if summary.get(f"{k}_method")]


def _per_class(per_class: Optional[dict[str, dict[str, float]]], title: str) -> list[str]:
    if not per_class:
        return []
    out = [f"**{title}**", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for lab, r in per_class.items():
        out.append(f"| {lab} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1-score']:.4f} | {int(r['support'])} |")
    return [*out, ""]


def _review_line(summary: dict[str, Any]) -> str:
    """The human-reviewed share of the training labels, in words."""
    if summary.get("review_labels_version") is None:
        return "- human-reviewed share of the training labels: 0 (no review in this run; every label is the teacher's)"
    return (
        f"- human-reviewed share of the training labels: {fmt(summary.get('human_share'))} "
        f"({fmt(summary.get('human_labelled_items'))} items with a reviewer's label, human-label file version "
        f"{fmt(summary.get('review_labels_version'))}; {fmt(summary.get('gold_items_from_review'))} reviewed items "
        "grew the gold instead)"
    )


DESCRIPTION_LIMIT = 5000  # characters of a model version's description in MLflow's SQL stores (String(5000))


def render_model_card(summary: dict[str, Any], facts: CardFacts, *, compact: bool = False) -> str:
    """The card's Markdown: every figure from ``summary``, every fact from ``facts``.

    ``compact``: without the prompt's text, the teacher's per-class table and the config
    (the version's description has 5,000 characters in MLflow's SQL stores; the full card
    is the run's artifact, which the compact one names).
    """
    name, version = summary.get("model_name"), summary.get("model_version")
    decision = "promoted to champion" if summary.get("promoted") else "not promoted (challenger)"
    table = ["| summary key | value |", "|---|---|"]
    lines = [
        f"# {name} version {version}",
        "",
        f"A {facts.task} student distilled by distill from `{facts.teacher_model}`; {decision}.",
        "",
        "## Task and labels",
        "",
        f"- task: {facts.task}",
        f"- labels: {', '.join(facts.labels) if facts.labels else 'free text'}",
        f"- student base model: `{facts.student_base}`",
        "",
        "## Teacher",
        "",
        f"- model: `{facts.teacher_model}` ({facts.endpoint}, {facts.teacher_mode} mode)",
        f"- samples per item: {fmt(summary.get('samples_per_item'))}, aggregation: {fmt(summary.get('aggregation'))}",
        f"- prompt: `{facts.prompt_path}`, hash `{summary.get('prompt_hash') or facts.prompt_hash or 'n/a'}`"
        + (f", registered as `{facts.prompt_uri}`" if facts.prompt_uri else ""),
        "",
        *([] if compact else ["```yaml", facts.prompt_text.rstrip(), "```", ""]),
        "## Data",
        "",
        f"- pool: `{facts.pool_source}`",
        f"- gold (human labels): `{facts.gold_source}`",
        *[f"- digest of `{k}` (MLflow dataset): `{v}`" for k, v in sorted(facts.digests.items())],
        _review_line(summary),
        "",
        *table,
        *_rows(summary, DATA_KEYS),
        "",
        "## Gold figures",
        "",
        "Teacher and student on human gold; the teacher on its seeded gold subset, the student on all gold and on "
        "that subset. The gate's interval is the paired bootstrap of (this version - the champion) on the same "
        "gold items.",
        "",
        *table,
        *_rows(summary, GOLD_KEYS),
        *_rows(summary, GATE_KEYS),
        "",
        "## Per class",
        "",
        *_per_class(summary.get("student_per_class"), "student, all gold"),
        *([] if compact else _per_class(summary.get("teacher_per_class_voted"), "teacher, its gold subset")),
        "## Calibration",
        "",
        "Expected calibration error of the confidences (lower is better).",
        "",
        *table,
        *_rows(summary, CALIBRATION_KEYS),
        "",
        "## Cost and CO2",
        "",
        *table,
        *_rows(summary, COST_KEYS),
        "",
        "How each was obtained:",
        "",
        *_methods(summary, COST_KEYS),
        "",
        "## Gate",
        "",
        f"- decision: {decision}",
        f"- reason: {summary.get('gate_reason')}",
        "",
        "## Provenance",
        "",
        f"- MLflow run: `{summary.get('mlflow_run_id')}`",
        f"- code: commit `{facts.commit}`",
        f"- run name: `{summary.get('run_name')}`",
        "",
    ]
    if compact:
        lines += [
            f"The full card, with the prompt's text and the config: `model_card.md` of MLflow run "
            f"`{summary.get('mlflow_run_id')}`.",
            "",
        ]
    else:
        lines += [
            "<details><summary>config (no secrets: keys come from the environment)</summary>",
            "",
            "```json",
            json.dumps(facts.config, indent=1, sort_keys=True, default=str),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def git_commit(repo: Path) -> str:
    """The checkout's commit (with '+changes' when tracked files differ), or 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def register_prompt(model_name: str, text: str, *, source: str, prompt_hash: str) -> str:
    """The template in MLflow's prompt registry: a new version only when its text changed; returns its URI."""
    from mlflow import genai  # pyright: ignore[reportPrivateImportUsage]  (mlflow.genai is public API)

    name = f"{model_name}-prompt"
    try:
        latest = genai.load_prompt(f"prompts:/{name}@latest")
    except Exception:  # no such prompt yet (the store raises its own not-found error)
        latest = None
    if latest is not None and latest.template == text:
        return latest.uri
    p = genai.register_prompt(
        name=name,
        template=text,
        commit_message=f"{source} (hash {prompt_hash})",
        tags={"distill.prompt_hash": prompt_hash, "distill.source": source},
    )
    return p.uri


def publish_model_card(summary: dict[str, Any], facts: CardFacts, *, out_path: Path) -> str:
    """Write the card, log it as the run's ``model_card.md``, make its compact form the version's description."""
    import mlflow

    card = render_model_card(summary, facts)
    short = render_model_card(summary, facts, compact=True)
    if len(short) > DESCRIPTION_LIMIT:  # many classes: the tables are what grows
        short = short[: DESCRIPTION_LIMIT - 80].rsplit("\n", 1)[0] + "\n\n(cut here: see the run's model_card.md)\n"
    out_path.write_text(card)
    mlflow.log_text(card, "model_card.md")
    name, version = summary.get("model_name"), summary.get("model_version")
    if name and version:
        client = mlflow.MlflowClient()
        client.update_model_version(str(name), str(version), description=short)
        client.set_model_version_tag(str(name), str(version), "model_card", "model_card.md")
        if facts.prompt_uri:
            client.set_model_version_tag(str(name), str(version), "prompt_uri", facts.prompt_uri)
    return card
