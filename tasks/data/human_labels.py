"""Reviewers' labels as versioned Parquet files, and what a run makes of them.

Why versioned files and not the review tool itself: a run must be reproducible and must not
depend on a Label Studio being up at 2 am. ``distill review import`` pulls the finished
annotations and writes a new ``human-labels-vNNNN.parquet`` only when they changed (so
importing twice changes nothing); a run reads the newest (or a pinned) version, and the
version and its digest go to MLflow and the model card. Every annotation is kept, one row
each (two reviewers who disagree are two rows); the rule that turns them into one label per
item lives here, in ``resolve``, and is a config choice (``review.on_disagreement``).

An item is either training data or gold, never both: the share of reviewed items that
grows the gold (``review.gold_share``) is chosen by a hash of the item's id, so an item
keeps its role in every later version and every run.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from pandas.core.util.hashing import hash_pandas_object

from distill.config import DataConfig, ReviewConfig
from tasks.data.readers import read_gold

FILE_RE = re.compile(r"^human-labels-v(\d{4,})\.parquet$")
# one row per annotation; the columns a run needs come first
COLUMNS = [
    "id",
    "text",
    "label",
    "reviewer",
    "updated_at",
    "annotation_id",
    "task_id",
    "project_id",
    "run_id",
    "prompt_version",
    "teacher_label",
    "teacher_confidence",
    "selected_by",
]


class HumanLabelsError(ValueError):
    """A human-label file that cannot be used as it is; the message names the file and the row."""


def versions(labels_dir: str | Path) -> dict[int, Path]:
    """The versioned files in ``labels_dir``, by version number."""
    d = Path(labels_dir)
    if not d.is_dir():
        return {}
    out = {}
    for p in d.iterdir():
        m = FILE_RE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def file_for(labels_dir: str | Path, version: Optional[int] = None) -> Optional[Path]:
    """The file of ``version`` (None: the newest), or None when the folder holds none."""
    vs = versions(labels_dir)
    if not vs:
        return None
    if version is None:
        return vs[max(vs)]
    if version not in vs:
        raise HumanLabelsError(
            f"review.labels_version {version}: {labels_dir} holds versions {', '.join(map(str, vs))}"
        )
    return vs[version]


def canonical(df: pd.DataFrame) -> pd.DataFrame:
    """The same annotations always give the same frame (column order, row order, dtypes)."""
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    out = pd.DataFrame(df.loc[:, COLUMNS]).copy()
    for c in ("id", "text", "label", "reviewer", "updated_at", "run_id", "prompt_version", "teacher_label"):
        out[c] = out[c].astype("string")
    for c in ("annotation_id", "task_id", "project_id"):
        out[c] = out[c].astype("Int64")
    out["teacher_confidence"] = out["teacher_confidence"].astype("Float64")
    out["selected_by"] = out["selected_by"].astype("string")
    return out.sort_values(["id", "annotation_id"], kind="stable").reset_index(drop=True)


def digest(df: pd.DataFrame) -> str:
    """A content digest of the annotations (not of the file's bytes, which Parquet writers vary)."""
    h = hashlib.sha256()
    h.update(hash_pandas_object(canonical(df), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def for_mlflow(path: str | Path) -> pd.DataFrame:
    """The file as MLflow logs it as a dataset: its integer ids as floats (MLflow's schema inference warns that an
    integer column cannot hold a missing value, which these can)."""
    df = pd.read_parquet(path)
    for c in ("annotation_id", "task_id", "project_id"):
        if c in df.columns:
            df[c] = df[c].astype("float64")
    return df


@dataclass
class Written:
    path: Path
    version: int
    digest: str
    new: bool  # False: the annotations equal the newest version's, nothing was written


def write_version(labels_dir: str | Path, df: pd.DataFrame) -> Written:
    """Write the annotations as the next version, unless they equal the newest one (idempotent import)."""
    d = Path(labels_dir)
    d.mkdir(parents=True, exist_ok=True)
    df = canonical(df)
    dg = digest(df)
    vs = versions(d)
    if vs:
        newest = max(vs)
        if digest(pd.read_parquet(vs[newest])) == dg:
            return Written(vs[newest], newest, dg, new=False)
    version = (max(vs) if vs else 0) + 1
    path = d / f"human-labels-v{version:04d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)  # a reader never sees half a file
    return Written(path, version, dg, new=True)


def to_gold(item_id: str, share: float) -> bool:
    """Whether a reviewed item grows the gold: a stable draw from its id (the same in every run)."""
    if share <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < share


@dataclass
class Reviewed:
    """A run's view of the human labels: one label per item, split into training and gold."""

    path: str
    version: int
    digest: str
    annotations: int
    items: int
    train: dict[str, str] = field(default_factory=dict)  # id -> the label it trains with (precedence 'human')
    gold: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["id", "text", "label"]))
    kept_teacher: set[str] = field(default_factory=set)  # reviewed, training with the teacher's label
    excluded: set[str] = field(default_factory=set)  # out of training and gold (on_disagreement: exclude)
    disagreements: int = 0

    @property
    def not_for_training(self) -> set[str]:
        """Ids the student must not train on: gold (no leak) and excluded items."""
        return set(self.gold["id"]) | self.excluded


def resolve(df: pd.DataFrame, review: ReviewConfig, labels: list[str], *, source: str) -> Reviewed:
    """One label per reviewed item under the config's rules; a label outside the set is an error naming the row."""
    df = canonical(df)
    bad = df[~df["label"].isin(labels)]
    if len(bad):
        r = bad.iloc[0]
        raise HumanLabelsError(
            f"{source}: item {r['id']!r} (annotation {r['annotation_id']}) has label {r['label']!r}, not one of "
            f"{labels}; {len(bad)} such row(s)"
        )
    out = Reviewed(source, 0, digest(df), annotations=len(df), items=len(set(df["id"])))
    gold_rows = []
    for item_id, g in df.groupby("id", sort=True):
        item_id = str(item_id)
        chosen = _one_label(g, review)
        out.disagreements += int(len(set(g["label"])) > 1)
        if chosen is None:
            (out.excluded if review.on_disagreement.value == "exclude" else out.kept_teacher).add(item_id)
            continue
        if to_gold(item_id, review.gold_share):
            gold_rows.append({"id": item_id, "text": str(g["text"].iloc[0]), "label": chosen})
        elif review.precedence.value == "human":
            out.train[item_id] = chosen
        else:
            out.kept_teacher.add(item_id)
    if gold_rows:
        out.gold = pd.DataFrame(gold_rows)
    return out


def _one_label(g: pd.DataFrame, review: ReviewConfig) -> Optional[str]:
    """The item's label: the agreed one, or by ``on_disagreement`` (None: no human label for it)."""
    if len(set(g["label"])) == 1:
        return str(g["label"].iloc[0])
    if review.on_disagreement.value == "latest":
        latest = g.sort_values(["updated_at", "annotation_id"], kind="stable").iloc[-1]
        return str(latest["label"])
    return None


def load_reviewed(review: ReviewConfig, labels: list[str]) -> Optional[Reviewed]:
    """The run's human labels (None when review.labels_dir is unset or holds no version yet)."""
    if not review.labels_dir:
        return None
    path = file_for(review.labels_dir, review.labels_version)
    if path is None:
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001  (a torn or foreign file: name it)
        raise HumanLabelsError(f"{path}: not a readable human-label file: {e}") from None
    missing = [c for c in ("id", "text", "label") if c not in df.columns]
    if missing:
        raise HumanLabelsError(f"{path}: missing column(s) {missing}")
    out = resolve(df, review, labels, source=str(path))
    m = FILE_RE.match(path.name)
    out.version = int(m.group(1)) if m else 0
    return out


def gold_with_reviews(data: DataConfig, review: ReviewConfig, *, labels: list[str], out_dir: Path) -> DataConfig:
    """The data section the student is scored with: the gold file plus the reviewed items that grow it.

    Without such items it is ``data`` unchanged. With them, the gold file and those items are
    written to ``out_dir/gold_with_reviews.parquet`` (the same file in every stage of the
    run, so the gate and the evaluation score one gold set) and the returned section points
    at it; the teacher keeps its seeded subset of the original gold.
    """
    reviewed = load_reviewed(review, labels) if data.gold_path else None
    if reviewed is None or not len(reviewed.gold):
        return data
    gold = read_gold(data, labels)
    clash = set(gold["id"].astype(str)) & set(reviewed.gold["id"])
    if clash:
        raise HumanLabelsError(
            f"{reviewed.path}: reviewed item id(s) {sorted(clash)[:3]} are also ids in {data.gold_path}: the pool's "
            "and the gold's ids must differ for reviewed items to grow the gold"
        )
    both = pd.concat([gold[["id", "text", "label"]], reviewed.gold[["id", "text", "label"]]], ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gold_with_reviews.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    both.columns = [data.id_column, data.text_column, data.gold_label_column]
    both.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return data.model_copy(update={"gold_path": str(path), "storage_options": {}})
