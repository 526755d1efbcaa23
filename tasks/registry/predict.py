"""Label a data set with a registered student, shard by shard: what the batch-predict flow runs.

Why shards of Parquet: a million support tickets must not sit in one Python list or pass
through Prefect results; each shard is read, labelled and written by one task, so shards
can run on a Dask cluster and a rerun skips the shards already written. The model is
resolved from its alias to a version once, when the job starts, so every shard uses the
same model even if the champion moves while the job runs; each worker process loads it
once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class ShardPrediction:
    path: str
    items: int
    seconds: float  # labelling time of this shard (0 when reused)
    reused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_model(model_uri: str) -> tuple[str, Optional[str]]:
    """``models:/NAME@alias`` -> (``models:/NAME/VERSION``, version); other URIs are returned as they are."""
    if not (model_uri.startswith("models:/") and "@" in model_uri):
        return model_uri, None
    import mlflow

    name, alias = model_uri[len("models:/") :].split("@", 1)
    v = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    return f"models:/{name}/{v.version}", str(v.version)


@lru_cache(maxsize=4)
def _model(model_uri: str, tracking_uri: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


def predict_shard(model_uri: str, tracking_uri: str, in_path: str, out_path: str, batch_size: int) -> ShardPrediction:
    """Run the model over one shard into ``out_path`` (id + its output columns); a no-op if that part already exists."""
    out = Path(out_path)
    if out.exists():
        return ShardPrediction(str(out), pq.ParquetFile(out).metadata.num_rows, 0.0, reused=True)
    df = pq.read_table(in_path).to_pandas()
    model = _model(model_uri, tracking_uri)
    t0 = time.perf_counter()
    parts = [
        model.predict(pd.DataFrame({"text": df["text"].iloc[i : i + batch_size * 16]}))
        for i in range(0, len(df), batch_size * 16)
    ]
    pred = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"label": [], "score": []})
    seconds = time.perf_counter() - t0
    if len(pred) != len(df):
        raise ValueError(
            f"{model_uri} returned {len(pred)} rows for the {len(df)} items of {in_path}: no row may be lost"
        )
    # a classifier returns label and score, a generator text and finish_reason: every column is kept, after the id
    res = pd.DataFrame({"id": df["id"].values, **{c: pred[c].values for c in pred.columns}})
    if "score" in res:
        res["score"] = res["score"].astype(float)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(res, preserve_index=False), tmp)
    tmp.replace(out)  # a part exists only when complete
    return ShardPrediction(str(out), len(res), seconds)


def merge_predictions(parts: list[str], output_path: str) -> int:
    """Concatenate the labelled shards into ``output_path`` (.parquet, or .csv); returns the item count."""
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = [pq.read_table(p) for p in parts]
    table = pa.concat_tables(tables) if tables else pa.table({"id": [], "label": [], "score": []})
    if out.suffix.lower() == ".csv":
        table.to_pandas().to_csv(out, index=False)
    else:
        tmp = out.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(out)
    return table.num_rows
