"""In-memory data from Python: a ``pandas.DataFrame`` or a ``datasets.Dataset`` as a run's pool or gold.

Why written to Parquet first: a flow's parameters are stored by Prefect and shown in its UI,
so a million rows must not travel as one; and a run that resumes must find the same input.
Each frame is written once, into the run folder under a name from its content's digest:
the same data gives the same file (the stages' keys see an unchanged input, and a rerun
resumes), other data a new one. The flow then gets the file's path, as from a config.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd
from pandas.core.util.hashing import hash_pandas_object



def frame_digest(frame: Any) -> str:
    """A digest of a DataFrame's columns and values, or of a Dataset's fingerprint (what ``datasets`` caches on)."""
    h = hashlib.sha256()
    if isinstance(frame, pd.DataFrame):
        h.update(repr(list(frame.columns)).encode())
        hashed = hash_pandas_object(frame, index=False)
        h.update(hashed.to_numpy().tobytes())
    elif hasattr(frame, "_fingerprint") and hasattr(frame, "to_parquet"):  # datasets.Dataset
        h.update(str(frame._fingerprint).encode())
    else:
        raise TypeError(f"expected a pandas.DataFrame or a datasets.Dataset, got {type(frame).__name__}")
    return h.hexdigest()[:16]


def write_frame(frame: Any, folder: Path, name: str) -> Path:
    """Write ``frame`` as ``folder/<name>-<digest>.parquet`` unless that file is there (atomic: a temp file renamed)."""
    out = folder / f"{name}-{frame_digest(frame)}.parquet"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if isinstance(frame, pd.DataFrame):
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_parquet(str(tmp))
    tmp.replace(out)
    return out
