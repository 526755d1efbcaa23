"""The load stage: validate the pool and gold files and write them as Parquet shards.

Why a stage of its own: every later stage reads shards from disk, never big Python lists
passed through Prefect results; and the data report (empty texts, repeated ids, invalid
UTF-8, rows set aside) is produced once, up front, before any request is paid for.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from distill.config import DistillConfig
from distill.tasks.data import DataReport, iter_items, write_shards


def _write_rejected(rows: list[dict], path: Path) -> Optional[str]:
    if not rows:
        if path.exists():
            path.unlink()
        return None
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), path)
    return str(path)


def prepare_inputs(cfg: DistillConfig, labels: Optional[list[str]], out_dir: Path) -> dict[str, Any]:
    """Write pool shards (and the seeded gold subset for scoring the teacher) under ``out_dir``."""
    d = cfg.data
    pool_report = DataReport(path=d.pool_path)
    rejected: list[dict] = []
    chunks = iter_items(d.pool_path, d.text_column, d.id_column, d.chunk_rows, limit=d.pool_limit,
                        report=pool_report, rejected=rejected)
    pool_shards = write_shards(chunks, out_dir / "pool", d.chunk_rows)
    result: dict[str, Any] = {
        "pool_shards": [str(p) for p in pool_shards],
        "pool_report": pool_report.to_dict(),
        "pool_rejected": _write_rejected(rejected, out_dir / "pool_rejected.parquet"),
        "gold_shards": [],
        "gold_report": None,
    }
    if d.gold_path:
        gold_report = DataReport(path=d.gold_path)
        g_rej: list[dict] = []
        frames = list(iter_items(d.gold_path, d.text_column, d.id_column, d.chunk_rows,
                                 label_column=d.gold_label_column, labels=labels, report=gold_report,
                                 rejected=g_rej))
        gold = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "text", "label"])
        gold = gold.rename(columns={"label": "label_gold"})
        if d.gold_teacher_limit is not None and len(gold) > d.gold_teacher_limit:
            idx = sorted(random.Random(d.seed).sample(range(len(gold)), d.gold_teacher_limit))
            gold = gold.iloc[idx].reset_index(drop=True)
        result["gold_shards"] = [str(p) for p in write_shards(iter([gold]), out_dir / "gold", d.chunk_rows)] if len(gold) else []
        result["gold_report"] = gold_report.to_dict()
        result["gold_rejected"] = _write_rejected(g_rej, out_dir / "gold_rejected.parquet")
    return result


@task(name="load-data")
def load_task(cfg: DistillConfig, labels: Optional[list[str]], out_dir: str) -> dict[str, Any]:
    return prepare_inputs(cfg, labels, Path(out_dir))
