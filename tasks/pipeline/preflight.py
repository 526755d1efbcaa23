"""Checks before any spend: output paths writable, disk for the student, the teacher answering a probe.

Why: a run that pays the teacher for an hour and then cannot write its student (disk full,
read-only folder) or reach its tracking store has wasted the hour. Everything that can be
checked without paying is checked before the first request; the teacher itself is checked
with one item's requests through the same client and cache as the run, so the probe is not
an extra cost: annotation then finds those answers in the cache, and the run's ledger
counts them like any other request.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

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
        from tasks.generate.lora import base_model_dir

        base = str(base_model_dir()) if st.base_model == "smollm2-135m-instruct" else st.base_model
    if not Path(base).exists():  # a hub id or a base not converted yet: nothing to measure here
        return None
    size = _folder_bytes(Path(base))
    copies = 3 if st.kind == "classifier" else (2 if getattr(st, "merge", False) else 1)
    return copies * size + 100 * MB


def _writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".distill-write-check-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"{what} {folder} is not writable: {e.strerror or e}") from None


def check_outputs(cfg: DistillConfig, free_bytes: Optional[int] = None) -> dict[str, Any]:
    """Run folder and cache folder writable, and room on the run folder's disk for the student."""
    _writable(cfg.run_dir, "run folder (workdir/run_name)")
    _writable(Path(cfg.client.cache_path).resolve().parent, "folder of the response cache (client.cache_path)")
    need = student_bytes_needed(cfg)
    free = shutil.disk_usage(cfg.run_dir).free if free_bytes is None else free_bytes
    if need is not None and free < need:
        raise PreflightError(f"not enough disk for the student in {cfg.run_dir}: about {need / MB:,.0f} MB needed "
                             f"({cfg.student.kind} weights while training), {free / MB:,.0f} MB free")
    return {"disk_free_mb": free / MB, "student_mb_needed": None if need is None else need / MB}


def probe_item(cfg: DistillConfig, shards: list[str], out_dir: Path) -> Optional[Path]:
    """One real item (the first of the first non-empty shard) as a one-row Parquet file."""
    import pyarrow.parquet as pq

    for p in shards:
        f = pq.ParquetFile(p)
        if f.metadata.num_rows:
            out_dir.mkdir(parents=True, exist_ok=True)
            one = f.read_row_group(0).slice(0, 1)
            path = out_dir / "probe-input.parquet"
            pq.write_table(one, path)
            return path
    return None


def check_probe(part: str, base_url: str, model: str) -> Optional[str]:
    """The probe's answers as written by annotation: an error if no sample came back at all."""
    import pandas as pd

    row = pd.read_parquet(part).iloc[0]
    if any(s in ("ok", "invalid") for s in row["sample_status"]):
        return None  # an answer came back; one outside the label set is the model's, counted like any other
    errors = sorted({str(e) for e in row["sample_errors"] if e})
    return (f"teacher at {base_url} (model {model!r}) did not answer a probe request for item {row['id']!r}: "
            f"{'; '.join(errors)[:600] or 'no answer'}; no other request was sent")


def remove_probe(out_dir: Path) -> None:
    for name in ("probe-input.parquet", "probe.parquet"):
        with_name = out_dir / name
        if with_name.exists():
            os.unlink(with_name)
