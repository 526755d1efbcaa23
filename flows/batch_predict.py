"""The ``batch-predict`` flow: the champion labels a data set, shard by shard, and says what it cost.

The scheduled batch job on a self-hosted model that replaces per-call API spend: load
(validate the input, write shards) -> label the shards (``.map``; in this process, or on
a Dask cluster) -> merge into one Parquet file of id, label and score -> log items/s, USD
(this machine's hourly rate x the labelling time) and energy/CO2e (codecarbon, offline)
to an MLflow run of its own. ``distill predict`` runs it; ``distill serve --predict-config``
serves it on a schedule beside the nightly distillation.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped

from distill.config import PredictConfig
from distill.runtime import run_logger, task_runner_for
from tasks.accounting.carbon import grid_intensity, measure_energy
from tasks.data.readers import iter_items, write_shards
from tasks.registry.predict import ShardPrediction, merge_predictions, predict_shard, resolve_model
from tasks.registry.tracking import tracking_uri as resolve_tracking_uri
from tasks.results.data import DataReport


def job_dir(cfg: PredictConfig, model_uri: str) -> Path:
    """The job's folder under ``work_dir``, named by what makes its labelled shards valid.

    The input file (path, size, modification time), its columns, the shard size and the
    resolved model version: a rerun of the same job reuses the shards it already wrote,
    and a job on another file or with another model never does.
    """
    src = Path(cfg.input_path)
    st = src.stat() if src.exists() else None
    blob = json.dumps(
        [
            str(src.resolve()),
            st.st_size if st else None,
            st.st_mtime_ns if st else None,
            cfg.text_column,
            cfg.id_column,
            cfg.shard_rows,
            model_uri,
        ]
    )
    return Path(cfg.work_dir) / hashlib.sha256(blob.encode()).hexdigest()[:16]


@task(name="load-items")
def load_items_task(cfg: PredictConfig, folder: str) -> tuple[list[str], dict[str, Any]]:
    """Validated items as Parquet shards; the report counts what was set aside and why."""
    report = DataReport(path=cfg.input_path)
    rejected: list[dict] = []
    chunks = iter_items(
        cfg.input_path, cfg.text_column, cfg.id_column, cfg.shard_rows, report=report, rejected=rejected
    )
    shards = write_shards(chunks, Path(folder) / "input", cfg.shard_rows)
    return [str(p) for p in shards], {**report.to_dict(), "rejected": rejected[:20]}


@task(name="predict-shard", task_run_name="predict-{name}")
def predict_shard_task(
    model_uri: str, tracking_uri: str, in_path: str, out_path: str, *, batch_size: int, name: str
) -> ShardPrediction:
    return predict_shard(model_uri, tracking_uri, in_path, out_path, batch_size)


@flow(name="label-shards")
def label_shards_flow(
    model_uri: str, tracking_uri: str, shards: list[str], out_dir: str, batch_size: int
) -> list[ShardPrediction]:
    """All shards at once on the task runner this subflow is given (see tasks/pipeline/runners.py)."""
    names = [Path(p).stem for p in shards]
    futures = predict_shard_task.map(
        model_uri,
        tracking_uri,
        shards,
        [str(Path(out_dir) / f"{n}.parquet") for n in names],
        batch_size=unmapped(batch_size),
        name=names,
    )
    return [f.result() for f in futures]


@flow(name="batch-predict", log_prints=True)
def batch_predict_flow(config: PredictConfig) -> dict[str, Any]:
    """Label ``config.input_path`` with ``config.model_uri`` and log the job to MLflow."""
    import mlflow

    cfg = config
    logger = run_logger()
    uri = resolve_tracking_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(uri)
    model_uri, version = resolve_model(cfg.model_uri)  # one model for every shard, even if the alias moves
    folder = job_dir(cfg, model_uri)
    shards, report = load_items_task(cfg, str(folder))
    logger.info(
        "labelling %d items in %d shards with %s (from %s)", report["items"], len(shards), model_uri, cfg.model_uri
    )
    e = cfg.energy
    t0 = time.monotonic()
    with measure_energy(
        "batch-predict",
        e.country_iso_code,
        enabled=e.measure,
        cpu_power_w=e.cpu_power_w,
        measure_power_secs=e.measure_power_secs,
    ) as energy:
        parts = label_shards_flow.with_options(task_runner=task_runner_for(cfg.runtime))(
            model_uri, uri, shards, str(folder / "output"), cfg.batch_size
        )
    wall = time.monotonic() - t0
    items = merge_predictions([p.path for p in parts], cfg.output_path)
    labelled = sum(p.items for p in parts if not p.reused)
    rate = cfg.pricing.hardware_usd_per_hour
    summary: dict[str, Any] = {
        "items": items,
        "items_labelled_now": labelled,
        "shards": len(parts),
        "shards_reused": sum(p.reused for p in parts),
        "output_path": cfg.output_path,
        "model_uri": cfg.model_uri,
        "model_version": version,
        "wall_s": wall,
        "items_per_s": labelled / wall if labelled and wall > 0 else None,
        "usd": rate * wall / 3600,
        "usd_method": f"measured {wall:.1f} s x ${rate:g}/h ({cfg.pricing.hardware_name})",
        "usd_per_1m_items": rate * wall / 3600 / labelled * 1e6 if labelled else None,
        "kwh": energy.kwh,
        "gco2": energy.gco2,
        "kwh_method": energy.method,
        "grid_gco2_per_kwh": grid_intensity(e.country_iso_code),
        "rejected_items": report["empty_text"] + report["duplicate_ids"],
        "data": report,
        "task_runner": cfg.runtime.task_runner.value,
    }
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(
        run_name="batch-predict",
        tags={"model_uri": model_uri, "input_path": cfg.input_path, "output_path": cfg.output_path},
    ) as run:
        mlflow.log_params(
            {
                "model_uri": cfg.model_uri,
                "model_version": version or "",
                "shard_rows": cfg.shard_rows,
                "batch_size": cfg.batch_size,
                "task_runner": cfg.runtime.task_runner.value,
            }
        )
        mlflow.log_metrics(
            {
                k: float(v)
                for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
            }
        )
        mlflow.log_dict(json.loads(json.dumps(summary, default=str)), "batch_summary.json")
    summary["mlflow_run_id"] = run.info.run_id
    logger.info(
        "labelled %d items (%d now) in %.1f s: %s items/s, $%.6f, %s kWh",
        items,
        labelled,
        wall,
        f"{summary['items_per_s']:.1f}" if summary["items_per_s"] else "n/a",
        summary["usd"],
        energy.kwh,
    )
    return summary
