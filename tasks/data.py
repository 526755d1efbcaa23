"""Input loading: CSV, JSONL, Parquet and saved ``datasets`` folders, streamed in chunks.

Why streaming: a pool can hold millions of support tickets; memory must not grow with it.
Why the bookkeeping: bad rows are *counted and kept visible*, never silently dropped.
Empty texts and repeated ids are set aside in ``rejected.parquet`` with a reason; texts
with invalid UTF-8 are kept (bad bytes become U+FFFD) and counted; repeated texts are
kept and counted (the response cache makes their repeats free).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
    """Bad input; the message names the file, column and row."""


@dataclass
class DataReport:
    """What loading found in one input file."""

    path: str
    rows_read: int = 0
    items: int = 0
    empty_text: int = 0
    duplicate_ids: int = 0
    duplicate_texts: int = 0
    invalid_utf8: int = 0
    truncated_by_limit: bool = False
    rejected_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _fix_utf8(s: str) -> tuple[str, bool]:
    """Replace surrogate-escaped bad bytes with U+FFFD; report whether there were any."""
    try:
        s.encode("utf-8")
        return s, False
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "datasets"
        raise DataError(f"{path}: a folder but not a saved `datasets` folder (no dataset_info.json/state.json)")
    suf = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if suf in (".csv", ".tsv"):
        return "csv"
    if suf in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suf in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{path}: unknown file type {suf!r}; use .csv, .jsonl, .parquet or a saved datasets folder")


def iter_raw_chunks(path: str | Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Yield DataFrames of the named columns (as str), checking the columns exist."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input not found: {path}")
    fmt = _detect_format(path)

    def check(available: list[str]) -> None:
        missing = [c for c in columns if c not in available]
        if missing:
            raise DataError(f"{path}: column(s) {missing} not found; the file has columns {available}")

    if fmt == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            reader = pd.read_csv(path, sep=sep, dtype=object, keep_default_na=False, chunksize=chunk_rows,
                                 encoding="utf-8", encoding_errors="surrogateescape")
            first = True
            for df in reader:
                if first:
                    check(list(df.columns))
                    first = False
                yield df[columns]
        except pd.errors.ParserError as e:
            raise DataError(f"{path}: CSV parse error: {e}") from None
    elif fmt == "jsonl":
        rows: list[dict] = []
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.decode("utf-8", "surrogateescape").strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                missing = [c for c in columns if c not in obj]
                if missing:
                    raise DataError(f"{path}: line {lineno}: missing field(s) {missing}; it has {sorted(obj)}")
                rows.append({c: "" if obj[c] is None else str(obj[c]) for c in columns})
                if len(rows) >= chunk_rows:
                    yield pd.DataFrame(rows, columns=columns, dtype=object)
                    rows = []
        if rows:
            yield pd.DataFrame(rows, columns=columns, dtype=object)
    elif fmt == "parquet":
        pf = pq.ParquetFile(path)
        check(pf.schema_arrow.names)
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield _arrow_to_str_frame(batch, columns)
    else:  # datasets folder
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; point at one split's folder")
        check(list(ds.column_names))
        for batch in ds.with_format("arrow").iter(batch_size=chunk_rows):
            yield _arrow_to_str_frame(batch, columns)


def _arrow_to_str_frame(batch: pa.RecordBatch | pa.Table, columns: list[str]) -> pd.DataFrame:
    out = {}
    for c in columns:
        col = batch.column(c)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            out[c] = ["" if v is None else v.decode("utf-8", "surrogateescape") for v in col.to_pylist()]
        else:
            out[c] = ["" if v is None else str(v) for v in col.to_pylist()]
    return pd.DataFrame(out, columns=columns, dtype=object)


def _h(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def iter_items(
    path: str | Path,
    text_column: str,
    id_column: str,
    chunk_rows: int,
    limit: Optional[int] = None,
    label_column: Optional[str] = None,
    labels: Optional[list[str]] = None,
    report: Optional[DataReport] = None,
    rejected: Optional[list[dict]] = None,
) -> Iterator[pd.DataFrame]:
    """Yield clean chunks with columns id, text (and label), updating ``report`` as it goes.

    Rows set aside are appended to ``rejected`` (id, row, reason). Seen ids and texts are
    kept as 8-byte hashes, which is the only state that grows with the input.
    """
    report = report if report is not None else DataReport(path=str(path))
    cols = [id_column, text_column] + ([label_column] if label_column else [])
    seen_ids: set[int] = set()
    seen_texts: set[int] = set()
    row_no = 0
    for df in iter_raw_chunks(path, cols, chunk_rows):
        keep_ids, keep_texts, keep_labels = [], [], []
        for i in range(len(df)):
            row_no += 1
            report.rows_read += 1
            if limit is not None and report.items >= limit:
                report.truncated_by_limit = True
                break
            rid = str(df.iat[i, 0])
            text, bad = _fix_utf8(str(df.iat[i, 1]))
            rid, bad_id = _fix_utf8(rid)
            if bad or bad_id:
                report.invalid_utf8 += 1
            if not rid.strip():
                raise DataError(f"{path}: row {row_no}: column '{id_column}' is empty; every item needs an id")
            if not text.strip():
                report.empty_text += 1
                _reject(report, rejected, rid, row_no, "empty text")
                continue
            hid = _h(rid)
            if hid in seen_ids:
                report.duplicate_ids += 1
                _reject(report, rejected, rid, row_no, f"duplicate id {rid!r}")
                continue
            seen_ids.add(hid)
            ht = _h(text)
            if ht in seen_texts:
                report.duplicate_texts += 1
            seen_texts.add(ht)
            if label_column:
                raw_lab = df.iat[i, 2]
                lab = "" if raw_lab is None or (isinstance(raw_lab, float) and raw_lab != raw_lab) else str(raw_lab).strip()
                if not lab:
                    raise DataError(f"{path}: row {row_no} (id {rid!r}): column '{label_column}' is empty; every gold "
                                    f"item needs its human label or reference")
                if labels is not None and lab not in labels:
                    raise DataError(
                        f"{path}: row {row_no} (id {rid!r}): label {lab!r} in column '{label_column}' "
                        f"is not one of the prompt's labels {labels}"
                    )
                keep_labels.append(lab)
            keep_ids.append(rid)
            keep_texts.append(text)
            report.items += 1
        if keep_ids:
            out = pd.DataFrame({"id": keep_ids, "text": keep_texts})
            if label_column:
                out["label"] = keep_labels
            yield out
        if limit is not None and report.items >= limit:
            if len(df) == chunk_rows:
                report.truncated_by_limit = True
            break


def _reject(report: DataReport, rejected: Optional[list[dict]], rid: str, row: int, reason: str) -> None:
    if len(report.rejected_examples) < 10:
        report.rejected_examples.append(f"row {row} (id {rid!r}): {reason}")
    if rejected is not None:
        rejected.append({"id": rid, "row": row, "reason": reason})


def write_shards(chunks: Iterator[pd.DataFrame], out_dir: Path, shard_rows: int) -> list[Path]:
    """Re-chunk a stream of frames into Parquet shards of ``shard_rows`` items."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    paths: list[Path] = []
    buf: list[pd.DataFrame] = []
    n = 0

    def flush() -> None:
        nonlocal buf, n
        if not buf:
            return
        df = pd.concat(buf, ignore_index=True)
        while len(df) >= shard_rows or (len(df) and not more):
            part, df = df.iloc[:shard_rows], df.iloc[shard_rows:]
            p = out_dir / f"part-{len(paths):05d}.parquet"
            tmp = p.with_suffix(".tmp")
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False), tmp)
            tmp.replace(p)
            paths.append(p)
        buf = [df] if len(df) else []
        n = len(df)

    more = True
    for chunk in chunks:
        buf.append(chunk)
        n += len(chunk)
        if n >= shard_rows:
            flush()
    more = False
    flush()
    return paths
