"""Input loading: CSV, JSONL, Parquet and saved ``datasets`` folders, streamed in chunks.

Why streaming: a pool can hold millions of support tickets; memory must not grow with it.
Why the bookkeeping: bad rows are *counted and kept visible*, never silently dropped.
Empty texts and repeated ids are set aside in ``rejected.parquet`` with a reason; texts
with invalid UTF-8 are kept (bad bytes become U+FFFD) and counted; repeated texts are
kept and counted (the response cache makes their repeats free).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from distill.config import DataConfig
from tasks.data import remote
from tasks.data.hashset import HashSet64
from tasks.data.remote import RemoteError, is_url, public
from tasks.results.data import DataReport
from tasks.templates.base import has_markup


class DataError(ValueError):
    """Bad input; the message names the file, column and row."""


ROW_EXAMPLES = 10  # rows named per finding in a report (counts are always complete)
_MAX_SPELLINGS = 50  # distinct variant spellings / bad labels listed one by one


def _row_ref(row: int, rid: str) -> str:
    return f"row {row} (id {rid!r})"


def _note(rows: list[str], row: int, rid: str) -> None:
    if len(rows) < ROW_EXAMPLES:
        rows.append(_row_ref(row, rid))


_MOJIBAKE_RE = re.compile(
    "[\u00c2\u00c3][\u00a0-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]|\u00e2\u20ac")


def looks_mojibake(text: str) -> bool:
    """UTF-8 bytes once decoded as Latin-1/cp1252 ("Ã©" for "é", "â€™" for "’"); a cheap test first."""
    if "\u00c3" not in text and "\u00c2" not in text and "\u00e2" not in text:
        return False
    return _MOJIBAKE_RE.search(text) is not None


def label_key(s: str) -> str:
    """What two spellings of one label share: Unicode form (NFKC), case, zero-width characters and spacing."""
    s = unicodedata.normalize("NFKC", s).replace("\u200b", "").replace("\ufeff", "")
    return " ".join(s.split()).casefold()


class LabelChecker:
    """Gold labels against the prompt's label set.

    Why this rule: a spelling that matches exactly one label up to case, spacing and
    Unicode form ("Positive", " positive ", a full-width or NBSP-padded one) is that label
    written differently: it is normalised and *reported* (counts per spelling, first rows).
    Anything else (a label outside the set, one that would match two labels) is never
    guessed: the whole file is read, then rejected with a count per bad label and the rows
    that carry it, so one pass shows every problem.
    """

    def __init__(self, labels: list[str], path: str, column: str, report: DataReport) -> None:
        self.labels = list(labels)
        self.exact = set(labels)
        keys: dict[str, list[str]] = {}
        for lab in labels:
            keys.setdefault(label_key(lab), []).append(lab)
        self.index = {k: v[0] for k, v in keys.items() if len(v) == 1}  # ambiguous spellings map to nothing
        self.path, self.column, self.report = path, column, report
        self.bad: dict[str, list] = {}  # bad label -> [count, first rows]
        self.bad_total = 0

    def check(self, raw: str, row: int, rid: str) -> Optional[str]:
        """The label ``raw`` stands for, or None when it is outside the set (recorded for :meth:`finish`)."""
        if raw in self.exact:
            return raw
        lab = self.index.get(label_key(raw))
        if lab is not None:
            spelling = f"{raw!r} -> {lab!r}"
            v = self.report.label_variants
            if spelling in v or len(v) < _MAX_SPELLINGS:
                v[spelling] = v.get(spelling, 0) + 1
            else:
                v["(other spellings)"] = v.get("(other spellings)", 0) + 1
            _note(self.report.label_variant_rows, row, rid)
            return lab
        self.bad_total += 1
        key = raw if (raw in self.bad or len(self.bad) < _MAX_SPELLINGS) else "(other labels)"
        entry = self.bad.setdefault(key, [0, []])
        entry[0] += 1
        if len(entry[1]) < 5:
            entry[1].append(_row_ref(row, rid))
        return None

    def finish(self) -> None:
        if not self.bad_total:
            return
        parts = [f"{lab!r} x{n} ({', '.join(rows)}{', ...' if n > len(rows) else ''})"
                 for lab, (n, rows) in sorted(self.bad.items(), key=lambda kv: -kv[1][0])]
        raise DataError(
            f"{self.path}: column '{self.column}': {self.bad_total} row(s) have a label that is not one of the "
            f"prompt's labels {self.labels} (case, spacing and Unicode form aside): {'; '.join(parts)}. Nothing was "
            f"dropped or guessed: fix these rows, or add the labels to the prompt")


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


def _detect_remote_format(url: str) -> str:
    name = PurePosixPath(urlsplit(url).path)
    suf = "".join(name.suffixes[-2:]).lower() if name.suffix.lower() == ".gz" else name.suffix.lower()
    for fmt, sufs in (("csv", (".csv", ".tsv")), ("jsonl", (".jsonl", ".ndjson", ".json")), ("parquet", (".parquet", ".pq"))):
        if suf in sufs:
            return fmt
    raise DataError(
        f"{public(url)}: unknown file type {suf!r}; a remote input is one .csv, .jsonl or .parquet file "
        "(a dataset on the hub: hf://datasets/ORG/NAME/PATH/TO/FILE.parquet)"
    )


def _open_input(path: str | Path, storage_options: Optional[dict[str, Any]]) -> tuple[Any, str, str, str]:
    """(what to read: a local path or an open remote file, its name for messages, format, suffix)."""
    if is_url(str(path)):
        url = str(path)
        try:
            if not remote.exists(url, storage_options):
                raise DataError(f"input not found: {public(url)}")
            if remote.is_dir(url, storage_options):
                raise DataError(f"{public(url)}: a folder; a remote input is one .csv, .jsonl or .parquet file")
            fmt = _detect_remote_format(url)
            return remote.open_binary(url, storage_options), public(url), fmt, PurePosixPath(urlsplit(url).path).suffix
        except RemoteError as e:
            raise DataError(str(e)) from None
    local = Path(path)
    if not local.exists():
        raise DataError(f"input not found: {local}")
    return local, str(local), _detect_format(local), local.suffix


def iter_raw_chunks(
    path: str | Path, columns: list[str], chunk_rows: int, storage_options: Optional[dict[str, Any]] = None
) -> Iterator[pd.DataFrame]:
    """Yield DataFrames of the named columns (as str), checking the columns exist.

    ``path`` is a local file or folder, or an fsspec URL (tasks/data/remote.py) read through
    a file object in chunks as a local file is; a remote read that breaks off is one error
    naming the URL and the rows read, raised before anything is sent to the teacher.
    """
    source, name, fmt, suffix = _open_input(path, storage_options)
    rows_done = 0
    try:
        for df in _chunks(source, name, fmt=fmt, suffix=suffix, columns=columns, chunk_rows=chunk_rows):
            rows_done += len(df)
            yield df
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (a remote filesystem's own errors: a cut stream, a denied read)
        if not is_url(str(path)):
            raise
        raise DataError(
            f"{name}: reading stopped after {rows_done:,} rows ({type(e).__name__}: {remote.describe(e)})"
        ) from None
    finally:
        if not isinstance(source, Path):
            source.close()


def _chunks(
    source: Any, name: str, *, fmt: str, suffix: str, columns: list[str], chunk_rows: int
) -> Iterator[pd.DataFrame]:
    def check(available: list[str]) -> None:
        missing = [c for c in columns if c not in available]
        if missing:
            raise DataError(f"{name}: column(s) {missing} not found; the file has columns {available}")

    if fmt == "csv":
        sep = "\t" if suffix.lower() == ".tsv" else ","
        try:
            reader = pd.read_csv(
                source,
                sep=sep,
                dtype=object,
                keep_default_na=False,
                chunksize=chunk_rows,
                encoding="utf-8",
                encoding_errors="surrogateescape",
            )
            first = True
            for df in reader:
                if first:
                    check(list(df.columns))
                    first = False
                yield df[columns]
        except pd.errors.ParserError as e:
            raise DataError(f"{name}: CSV parse error: {e}") from None
    elif fmt == "jsonl":
        rows: list[dict] = []
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
            for lineno, raw in enumerate(fh, start=1):
                line = raw.decode("utf-8", "surrogateescape").strip()
                if lineno == 1:
                    line = line.lstrip("\ufeff")  # a byte-order mark some editors write
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{name}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{name}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                missing = [c for c in columns if c not in obj]
                if missing:
                    raise DataError(f"{name}: line {lineno}: missing field(s) {missing}; it has {sorted(obj)}")
                rows.append({c: "" if obj[c] is None else str(obj[c]) for c in columns})
                if len(rows) >= chunk_rows:
                    yield pd.DataFrame(rows, columns=columns, dtype=object)
                    rows = []
        if rows:
            yield pd.DataFrame(rows, columns=columns, dtype=object)
    elif fmt == "parquet":
        pf = pq.ParquetFile(source)
        check(pf.schema_arrow.names)
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield _arrow_to_str_frame(batch, columns)
    else:  # datasets folder
        import datasets

        ds = datasets.load_from_disk(str(source))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{name}: a DatasetDict with splits {list(ds)}; point at one split's folder")
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
    *,
    limit: Optional[int] = None,
    label_column: Optional[str] = None,
    labels: Optional[list[str]] = None,
    report: Optional[DataReport] = None,
    rejected: Optional[list[dict]] = None,
    fit: Optional[Callable[[str], tuple[Optional[str], Optional[str]]]] = None,
    storage_options: Optional[dict[str, Any]] = None,
) -> Iterator[pd.DataFrame]:
    """Yield clean chunks with columns id, text (and label), updating ``report`` as it goes.

    Rows set aside are appended to ``rejected`` (id, row, reason). Seen ids and texts are
    kept as 8-byte hashes, which is the only state that grows with the input. ``fit``
    (the teacher's context, :class:`tasks.data.load.ContextGuard`) returns a text as it is, cut
    to fit (with a note), or None and the reason it was rejected.
    """
    shown = public(str(path))  # a URL without credentials or query string
    report = report if report is not None else DataReport(path=shown)
    cols = [id_column, text_column] + ([label_column] if label_column else [])
    seen_ids = HashSet64()  # 8 bytes per item, not a Python set's ~75 (tasks/data/hashset.py)
    seen_texts = HashSet64()
    checker = LabelChecker(labels, shown, label_column, report) if (label_column and labels is not None) else None
    row_no = 0
    for df in iter_raw_chunks(path, cols, chunk_rows, storage_options):
        keep_ids, keep_texts, keep_labels = [], [], []
        raw_texts = df.iloc[:, 1].tolist()
        raw_labels = df.iloc[:, 2].tolist() if label_column else []
        fixed_ids = [_fix_utf8(str(x)) for x in df.iloc[:, 0].tolist()]
        id_hashes = [_h(r) for r, _ in fixed_ids]
        id_seen_before = seen_ids.contains_many(id_hashes)  # ids of earlier chunks: one search for the chunk
        chunk_ids: set[int] = set()
        text_hashes: list[int] = []
        for i in range(len(df)):
            row_no += 1
            report.rows_read += 1
            if limit is not None and report.items >= limit:
                report.truncated_by_limit = True
                break
            text, bad = _fix_utf8(str(raw_texts[i]))
            rid, bad_id = fixed_ids[i]
            if bad or bad_id:
                report.invalid_utf8 += 1
                _note(report.invalid_utf8_rows, row_no, rid)
            if not rid.strip():
                raise DataError(f"{shown}: row {row_no}: column '{id_column}' is empty; every item needs an id")
            if looks_mojibake(text):
                report.suspect_mojibake += 1
                _note(report.suspect_mojibake_rows, row_no, rid)
            if has_markup(text):
                report.control_markup += 1
                _note(report.control_markup_rows, row_no, rid)
            if not text.strip():
                report.empty_text += 1
                _reject(report, rejected, rid, row_no, "empty text")
                continue
            hid = id_hashes[i]
            if id_seen_before[i] or hid in chunk_ids:
                report.duplicate_ids += 1
                _reject(report, rejected, rid, row_no, f"duplicate id {rid!r}")
                continue
            chunk_ids.add(hid)
            if fit is not None:
                fitted, note = fit(text)
                if fitted is None:
                    report.overlong_rejected += 1
                    if len(report.overlong_rows) < ROW_EXAMPLES:
                        report.overlong_rows.append(f"{_row_ref(row_no, rid)}: {note}")
                    _reject(report, rejected, rid, row_no, note or "longer than the teacher's context")
                    continue
                if note is not None:
                    report.overlong_truncated += 1
                    if len(report.overlong_rows) < ROW_EXAMPLES:
                        report.overlong_rows.append(f"{_row_ref(row_no, rid)}: {note}")
                    text = fitted
            text_hashes.append(_h(text))  # duplicate texts are only counted: settled after the chunk
            if label_column:
                raw_lab = raw_labels[i]
                raw_lab = "" if raw_lab is None or (isinstance(raw_lab, float) and raw_lab != raw_lab) else str(raw_lab)
                raw_lab, bad_lab = _fix_utf8(raw_lab)
                if bad_lab and not (bad or bad_id):
                    report.invalid_utf8 += 1
                    _note(report.invalid_utf8_rows, row_no, rid)
                if not raw_lab.strip():
                    raise DataError(f"{shown}: row {row_no} (id {rid!r}): column '{label_column}' is empty; every gold "
                                    f"item needs its human label or reference")
                if checker is not None:
                    lab = checker.check(raw_lab, row_no, rid)
                    if lab is None:
                        continue  # the file is rejected at the end (checker.finish), every bad row listed
                else:
                    lab = raw_lab.strip()
                keep_labels.append(lab)
            keep_ids.append(rid)
            keep_texts.append(text)
            report.items += 1
        seen_ids.update(chunk_ids)
        chunk_texts: set[int] = set()
        for ht, before in zip(text_hashes, seen_texts.contains_many(text_hashes)):
            report.duplicate_texts += before or ht in chunk_texts
            chunk_texts.add(ht)
        seen_texts.update(chunk_texts)
        if keep_ids:
            out = pd.DataFrame({"id": keep_ids, "text": keep_texts})
            if label_column:
                out["label"] = keep_labels
            yield out
        if limit is not None and report.items >= limit:
            if len(df) == chunk_rows:
                report.truncated_by_limit = True
            break
    if checker is not None:
        checker.finish()


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


def read_gold(data: DataConfig, labels: list[str]) -> pd.DataFrame:
    """The whole gold file (``data.gold_path``, local or a URL), its labels checked against ``labels``: what the
    student is scored and gated on (tasks/classify/stages.py) and what reviewed items are added to
    (tasks/data/human_labels.py)."""
    frames = list(
        iter_items(
            data.gold_path or "",
            data.text_column,
            data.id_column,
            100_000,
            label_column=data.gold_label_column,
            labels=labels,
            storage_options=data.storage_options,
        )
    )
    return pd.concat(frames, ignore_index=True)
