"""``distill review export`` and ``distill review import``: items out to reviewers, their labels back as a file.

Why this shape: export picks from a finished run's voted pool (tasks/review/select.py) and
creates or updates one Label Studio project per registered model, sending only items that
are neither in the project nor reviewed before; the project's id is kept in the labels
folder (``labelstudio.json``) so import knows where to look. Import reads every annotation
of the project, checks all of them before anything is written (a label outside the set
names its task and writes nothing), merges them with the newest human-label version (an
annotation edited in Label Studio replaces its old row; one from a deleted project is kept)
and writes a new version only when something changed, then logs it to MLflow as a dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from distill.config import ReviewConfig, TrackingConfig
from tasks.data.human_labels import COLUMNS, Written, file_for, for_mlflow, write_version
from tasks.review.formats import argilla_records, chosen_label, label_config, labelstudio_tasks
from tasks.review.labelstudio import LabelStudio, ProjectGone
from tasks.review.select import ReviewItem, add_student, candidates, pick

STATE_FILE = "labelstudio.json"


class ReviewError(ValueError):
    """A review command that cannot go on; the message names the file, task or field."""


def labels_dir(review: ReviewConfig) -> Path:
    if not review.labels_dir:
        raise ReviewError(
            "review.labels_dir is not set: name the folder for the human-label files, beside the gold (e.g. "
            "`--set review.labels_dir=data/movie/reviews`)"
        )
    return Path(review.labels_dir)


def reviewed_ids(review: ReviewConfig) -> frozenset[str]:
    """Ids of every item with a human label in the newest version (never sent for review again)."""
    path = file_for(labels_dir(review), None)
    return frozenset(pd.read_parquet(path, columns=["id"])["id"].astype(str)) if path else frozenset()


def project_title(review: ReviewConfig, tracking: TrackingConfig) -> str:
    return review.project or f"{tracking.model_name} review"


def _run_facts(run_dir: Path) -> tuple[str, str]:
    """The run's MLflow run id and prompt version (its prompt hash), for each task's provenance."""
    run_id = prompt = "unknown"
    s = run_dir / "distill_summary.json"
    if s.is_file():
        run_id = str(json.loads(s.read_text()).get("mlflow_run_id") or run_id)
    a = run_dir / "annotation_summary.json"
    if a.is_file():
        prompt = str(json.loads(a.read_text()).get("prompt_hash") or prompt)
    return run_id, prompt


@dataclass
class Exported:
    selected: int
    sent: int  # tasks created in Label Studio (0 for a file)
    already_in_project: int
    where: str  # the project's data page, or the file


def select_for_review(
    *, run_dir: Path, review: ReviewConfig, how: str, n: int, seed: int, max_length: int
) -> list[ReviewItem]:
    """The run's items chosen for review, none reviewed before."""
    try:
        items = candidates(run_dir / "votes" / "pool")
    except FileNotFoundError as e:
        raise ReviewError(str(e)) from None
    if how == "disagreement":
        items = add_student(items, str(run_dir / "student" / "model"), max_length=max_length)
    try:
        return pick(items, how, n, seed=seed, exclude=reviewed_ids(review))
    except ValueError as e:
        raise ReviewError(str(e)) from None


def export_review(  # noqa: PLR0913
    *,
    run_dir: Path,
    review: ReviewConfig,
    tracking: TrackingConfig,
    labels: list[str],
    how: str,
    n: int,
    seed: int = 0,
    max_length: int = 128,
    fmt: str = "labelstudio",
    out: Optional[Path] = None,
) -> Exported:
    """Send (or write) the chosen items; see the module docstring."""
    items = select_for_review(run_dir=run_dir, review=review, how=how, n=n, seed=seed, max_length=max_length)
    run_id, prompt = _run_facts(run_dir)
    model_version = f"distill teacher, prompt {prompt}"
    if fmt in ("labelstudio-json", "argilla-json"):
        if out is None:
            raise ReviewError(f"--format {fmt} writes a file: give --out FILE")
        recs = (
            labelstudio_tasks(items, run_id=run_id, prompt_version=prompt, model_version=model_version)
            if fmt == "labelstudio-json"
            else argilla_records(items, run_id=run_id, prompt_version=prompt, agent=model_version)
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(recs, indent=1, ensure_ascii=False), encoding="utf-8")
        return Exported(len(items), 0, 0, str(out))
    if fmt != "labelstudio":
        raise ReviewError(f"--format {fmt!r}: use labelstudio (the API), labelstudio-json or argilla-json")
    ls = LabelStudio(review.url, token_env=review.api_key_env)
    title = project_title(review, tracking)
    project = _project_for(ls, review, title, labels)
    in_project = {str((t.get("data") or {}).get("distill_id")) for t in ls.tasks(project["id"])}
    fresh = [it for it in items if it.id not in in_project]
    tasks = labelstudio_tasks(fresh, run_id=run_id, prompt_version=prompt, model_version=model_version)
    sent = ls.import_tasks(project["id"], tasks)
    return Exported(len(items), sent, len(items) - len(fresh), f"{ls.url}/projects/{project['id']}/data")


def _state(review: ReviewConfig) -> dict[str, Any]:
    p = labels_dir(review) / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def _project_for(ls: LabelStudio, review: ReviewConfig, title: str, labels: list[str]) -> dict[str, Any]:
    """The review project: the one this folder names if it still exists, else by title, else a new one."""
    state = _state(review)
    project = ls.project(int(state["project_id"])) if state.get("project_id") else None
    project = project or ls.find_project(title)
    if project is None:
        project = ls.create_project(title, label_config(labels), "Items distill's teacher was unsure of.")
    d = labels_dir(review)
    d.mkdir(parents=True, exist_ok=True)
    (d / STATE_FILE).write_text(json.dumps({"url": ls.url, "project_id": project["id"], "title": title}, indent=1))
    return project


@dataclass
class Imported:
    written: Written
    annotations: int
    items: int
    skipped: int  # annotations a reviewer cancelled (skipped) or left empty
    project_id: int


def annotation_rows(tasks: list[dict[str, Any]], *, labels: list[str], project_id: int) -> tuple[pd.DataFrame, int]:
    """One row per finished annotation; every label is checked before any row is kept (nothing half imported)."""
    rows, skipped, bad = [], 0, []
    for t in tasks:
        data = t.get("data") or {}
        for a in t.get("annotations") or []:
            if a.get("was_cancelled"):
                skipped += 1
                continue
            try:
                lab = chosen_label(a.get("result") or [])
            except ValueError as e:
                bad.append(f"task {t.get('id')}: {e}")
                continue
            if lab is None:
                skipped += 1
                continue
            if lab not in labels:
                bad.append(
                    f"task {t.get('id')} (item {data.get('distill_id')!r}): label {lab!r} is not one of {labels}"
                )
                continue
            rows.append(
                {
                    "id": str(data.get("distill_id")),
                    "text": data.get("text"),
                    "label": lab,
                    "reviewer": str(a.get("completed_by")),
                    "updated_at": str(a.get("updated_at") or a.get("created_at") or ""),
                    "annotation_id": int(a["id"]),
                    "task_id": int(t["id"]),
                    "project_id": project_id,
                    "run_id": data.get("run_id"),
                    "prompt_version": data.get("prompt_version"),
                    "teacher_label": data.get("teacher_label"),
                    "teacher_confidence": data.get("teacher_confidence"),
                    "selected_by": data.get("selected_by"),
                }
            )
    if bad:
        raise ReviewError(f"{len(bad)} annotation(s) cannot be imported, nothing was written: " + "; ".join(bad[:3]))
    return pd.DataFrame(rows, columns=COLUMNS), skipped


def import_review(*, review: ReviewConfig, labels: list[str], project_id: Optional[int] = None) -> Imported:
    """Pull the project's finished annotations and write them as a new human-label version (if anything changed)."""
    d = labels_dir(review)
    pid = project_id or _state(review).get("project_id")
    if not pid:
        raise ReviewError(f"{d / STATE_FILE}: no Label Studio project recorded: run `distill review export` first")
    ls = LabelStudio(review.url, token_env=review.api_key_env)
    if ls.project(int(pid)) is None:
        raise ProjectGone(
            f"Label Studio project {pid} (recorded in {d / STATE_FILE}) no longer exists at {ls.url}: nothing was "
            "imported; `distill review export` creates a new one"
        )
    new, skipped = annotation_rows(ls.tasks(int(pid)), labels=labels, project_id=int(pid))
    before = file_for(d, None)
    if before is not None:
        old = pd.read_parquet(before)
        keep = ~pd.Series(list(zip(old["project_id"], old["annotation_id"]))).isin(
            set(zip(new["project_id"], new["annotation_id"]))
        )
        new = pd.concat([old[keep.to_numpy()], new], ignore_index=True)
    written = write_version(d, pd.DataFrame(new))
    return Imported(written, len(new), len(set(new["id"])), skipped, int(pid))


def log_import(imported: Imported, *, tracking: TrackingConfig, review: ReviewConfig) -> Optional[str]:
    """The new version as an MLflow dataset (name, digest, source) in a run of the experiment; its run id."""
    if not imported.written.new:
        return None
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    from tasks.registry.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(tracking.tracking_uri))
    mlflow.set_experiment(tracking.experiment)
    w = imported.written
    with mlflow.start_run(run_name=f"review-import-v{w.version}") as run:
        ds = from_pandas(for_mlflow(w.path), source=str(w.path), name="human-labels")
        mlflow.log_input(ds, context="review")
        mlflow.log_params(
            {"review.labels_version": w.version, "review.project_id": imported.project_id, "review.url": review.url}
        )
        mlflow.log_metrics({"review_annotations": imported.annotations, "review_items": imported.items})
        mlflow.set_tag("distill.kind", "review-import")
        return run.info.run_id
