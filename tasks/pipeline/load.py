"""The load stage: template, prices and data checked and sharded, tonight's items chosen, before anything is sent.

Why in the pipeline layer: loading touches several concepts at once (the template and its
task type, the teacher's prices, the data files and their context guard, the selection
against the registry's champion) and decides whether earlier annotation parts are still
valid (the fingerprint). Everything that can refuse a run refuses it here: a template
that does not suit the task or cannot give k distinct variants, an unpriced teacher, a
bad data file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from prefect import task

from distill.config import DistillConfig, SampleVariation, SelectionConfig, TrackingConfig
from distill.runtime import run_logger
from tasks.accounting.pricing import resolve_prices
from tasks.data import remote
from tasks.data.frames import write_frame
from tasks.data.load import ContextGuard, PreparedInputs, prepare_inputs
from tasks.data.remote import is_url
from tasks.data.select import select_items
from tasks.pipeline.task_types import check_template_suits
from tasks.results.data import Selection
from tasks.results.stages import Loaded
from tasks.teacher.tokenizer import counter_for
from tasks.templates.load import Template, load_prompt


def context_guard(cfg: DistillConfig, template: Template) -> Optional[ContextGuard]:
    """The guard of a run, or None when its teacher's context is not known (a remote teacher without
    teacher.context_tokens: its 'context length exceeded' errors are final and counted instead)."""
    t = cfg.teacher
    ctx = t.n_ctx if t.local else t.context_tokens
    if ctx is None:
        return None
    return ContextGuard(template, ctx, t.max_tokens, cfg.data.overlong, lambda: counter_for(t))


def prepare(cfg: DistillConfig, template: Template) -> PreparedInputs:
    """The run's pool and gold as shards under ``run_dir/input`` (no Prefect: ``distill plan`` calls it too)."""
    return prepare_inputs(
        cfg.data,
        labels=template.labels or None,
        out_dir=Path(cfg.run_dir) / "input",
        guard=context_guard(cfg, template),
    )


@task(name="load-data")
def load_task(cfg: DistillConfig, template_path: str) -> PreparedInputs:
    return prepare(cfg, load_prompt(template_path))


@task(name="select-items")
def select_task(
    pool_shards: list[str], run_dir: str, selection: SelectionConfig, tracking: TrackingConfig, chunk_rows: int
) -> Selection:
    """Tonight's items (tasks/data/select.py); the champion is looked up in the configured registry."""
    if selection.strategy.value != "all":
        import mlflow

        from tasks.registry.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(tracking.tracking_uri))
    return select_items(
        pool_shards,
        Path(run_dir),
        strategy=selection.strategy.value,
        max_new=selection.max_new_items,
        seed=selection.seed,
        model_uri=f"models:/{tracking.model_name}@{selection.champion_alias}",
        chunk_rows=chunk_rows,
    )


def input_fingerprint(cfg: DistillConfig, template: Template, selected_shards: Optional[list[str]] = None) -> str:
    """Hash of what makes existing annotation parts valid; a change invalidates them (the cache stays).

    With a selection, the chosen items change night by night in the same files, so their
    ids are part of the hash.
    """

    def stat(path: Optional[str]) -> Optional[list[Any]]:
        if path and is_url(path):  # a remote file's size and ETag (or modification time): a new upload is new data
            return remote.stat(path, cfg.data.storage_options)
        if not path or not Path(path).exists():
            return None
        st = Path(path).stat()
        return [st.st_size, st.st_mtime_ns]

    blob = json.dumps(
        {
            "data": cfg.data.model_dump(mode="json"),
            "prompt": template.template_hash(),
            "selected": _ids_hash(selected_shards) if selected_shards is not None else None,
            "files": [stat(cfg.data.pool_path), stat(cfg.data.gold_path)],
            "teacher": cfg.teacher.model_dump(mode="json", exclude={"startup_timeout_s", "n_threads", "tokenizer"}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ids_hash(shards: list[str]) -> str:
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for p in shards:
        for i in pq.read_table(p, columns=["id"]).column("id").to_pylist():
            h.update(str(i).encode() + b"\0")
    return h.hexdigest()[:16]


def load_inputs(cfg: DistillConfig) -> Loaded:
    """Template, prices and data checked and sharded, tonight's items chosen; nothing sent yet."""
    logger = run_logger()
    template = load_prompt(cfg.prompt)
    check_template_suits(cfg.task, template, cfg.prompt)
    if cfg.teacher.variation == SampleVariation.prompt_variants:
        template.check_variants(cfg.teacher.samples)  # k distinct prompts, or a clear refusal before any request
    prices = resolve_prices(cfg.teacher, cfg.pricing)  # an unpriced teacher fails here, before any request
    for p in prices:
        logger.info("teacher price: %s", p.describe())
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = load_task(cfg, template.source)
    pr = inputs.pool_report
    logger.info(
        "loaded %d pool items (%d empty texts and %d repeated ids set aside, %d repeated texts, "
        "%d rows with invalid UTF-8)",
        pr.items,
        pr.empty_text,
        pr.duplicate_ids,
        pr.duplicate_texts,
        pr.invalid_utf8,
    )
    sel = select_task(inputs.pool_shards, str(run_dir), cfg.selection, cfg.tracking, cfg.data.chunk_rows)
    chosen = cfg.selection.strategy.value != "all"
    if chosen:
        logger.info(
            "selection: %d items labelled before, %d chosen tonight, %d deferred (%s)",
            sel.labelled_before,
            sel.selected,
            sel.deferred,
            sel.method,
        )
    fp = input_fingerprint(cfg, template, sel.pool_shards if chosen else None)
    manifest = run_dir / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != fp:
        logger.info(
            "config, prompt or items changed since the last run in %s: re-annotating (from cache where possible)",
            run_dir,
        )
        for sub in ("annotations", "votes"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    manifest.write_text(json.dumps({"fingerprint": fp, "prompt_hash": template.template_hash()}))
    return Loaded(
        template,
        prices,
        sel.pool_shards,
        inputs.gold_shards,
        inputs.pool_report,
        inputs.gold_report,
        inputs.pool_rejected,
        sel,
        fp,
    )


def with_frames(cfg: DistillConfig, *, pool: Optional[Any] = None, gold: Optional[Any] = None) -> DistillConfig:
    """``cfg`` with ``data.pool_path``/``data.gold_path`` pointing at the frames, written into the run folder."""
    folder = cfg.run_dir / "inputs"
    data = cfg.data.model_copy(
        update={
            **({"pool_path": str(write_frame(pool, folder, "pool"))} if pool is not None else {}),
            **({"gold_path": str(write_frame(gold, folder, "gold"))} if gold is not None else {}),
        }
    )
    return cfg.model_copy(update={"data": data})
