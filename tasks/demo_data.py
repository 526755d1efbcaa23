"""Bundled demo data: human-rated sentiment corpora from the vaderSentiment 3.3.2 sdist.

Why these: they are real human judgements (each snippet's mean of 20+ ratings, -4..+4;
Hutto and Gilbert, ICWSM 2014) that can be fetched from the package registry offline.
They are fetched by ``distill data fetch`` (run by ``make demo``), never committed.

Mappings (documented in the README):
- movie (binary): mean > +0.5 -> positive, mean < -0.5 -> negative; |mean| <= 0.5 dropped
  as ambiguous (10,605 -> about 9,900 items).
- nyt (3-class): mean < -0.5 -> negative, mean > +0.5 -> positive, otherwise neutral.
- amazon and tweets (binary, as movie): product-review snippets and tweets, for checking
  that the demo's recipe holds on binary data it was not tuned on (point the demo config
  at them; they are never used to choose a prompt or a default).
Each gets a seeded stratified split into three parts:
- gold (1,000 items): human labels for the final evaluation only;
- dev (300 items): human labels for choosing prompts and vote strategies (never gold);
- pool (the rest): what the teacher annotates. Its human labels are kept aside in
  pool_labels.parquet for analysis only, never used for training or prompting.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

VADER_VERSION = "3.3.2"
CORPORA = {
    "movie": {"file": "movieReviewSnippets_GroundTruth.txt", "classes": 2, "gold_size": 1000, "dev_size": 300},
    "nyt": {"file": "nytEditorialSnippets_GroundTruth.txt", "classes": 3, "gold_size": 1000, "dev_size": 300},
    "amazon": {"file": "amazonReviewSnippets_GroundTruth.txt", "classes": 2, "gold_size": 1000, "dev_size": 300},
    "tweets": {"file": "tweets_GroundTruth.txt", "classes": 2, "gold_size": 1000, "dev_size": 300},
}
SEED = 13
AMBIGUOUS = 0.5


def fetch_sdist(cache_dir: Path) -> Path:
    """``pip download`` the vaderSentiment sdist (idempotent) and return the ratings folder."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / "hutto_ICWSM_2014"
    if (out / CORPORA["movie"]["file"]).exists():
        return out
    sdist = cache_dir / f"vaderSentiment-{VADER_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"vaderSentiment=={VADER_VERSION}", "-d", str(cache_dir)],
            check=True,
        )
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner = tf.extractfile(member)
        assert inner is not None
        with tarfile.open(fileobj=inner) as tf2:
            tf2.extractall(cache_dir, filter="data")
    return out


def read_ratings(path: Path) -> pd.DataFrame:
    """Read a *_GroundTruth.txt file: UTF-8 in the 3.3.2 sdist (latin-1 as a fallback)."""
    kw: dict[str, Any] = dict(sep="\t", quoting=csv.QUOTE_NONE, header=None, names=["id", "mean", "text"],
                              dtype={"id": str, "mean": float, "text": str})
    try:
        df = pd.read_csv(path, encoding="utf-8", **kw)
    except UnicodeDecodeError:
        df = pd.read_csv(path, encoding="latin-1", **kw)
    df["text"] = df["text"].fillna("").str.strip()
    return df


def to_labels(df: pd.DataFrame, classes: int) -> pd.DataFrame:
    if classes == 2:
        df = df[df["mean"].abs() > AMBIGUOUS].copy()
        df["label"] = ["positive" if m > 0 else "negative" for m in df["mean"]]
    else:
        df = df.copy()
        df["label"] = ["positive" if m > AMBIGUOUS else "negative" if m < -AMBIGUOUS else "neutral" for m in df["mean"]]
    return df


def build_corpus(name: str, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    spec = CORPORA[name]
    df = to_labels(read_ratings(raw_dir / spec["file"]), spec["classes"])
    df = df[df["text"].str.len() > 0]
    df["id"] = name + "-" + df["id"].astype(str)
    rest, gold = train_test_split(df, test_size=spec["gold_size"], random_state=SEED, stratify=df["label"])
    pool, dev = train_test_split(rest, test_size=spec["dev_size"], random_state=SEED, stratify=rest["label"])
    pool = pool.sample(frac=1.0, random_state=SEED).reset_index(drop=True)  # shuffled: pool_limit takes a fair sample
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    pool[["id", "text"]].to_parquet(d / "pool.parquet", index=False)
    pool[["id", "label", "mean"]].to_parquet(d / "pool_labels.parquet", index=False)
    gold[["id", "text", "label", "mean"]].reset_index(drop=True).to_parquet(d / "gold.parquet", index=False)
    dev[["id", "text", "label", "mean"]].reset_index(drop=True).to_parquet(d / "dev.parquet", index=False)
    info = {"corpus": name, "source": f"vaderSentiment=={VADER_VERSION} {spec['file']}", "seed": SEED,
            "pool": len(pool), "dev": len(dev), "gold": len(gold), "labels": gold["label"].value_counts().to_dict()}
    (d / "info.json").write_text(json.dumps(info, indent=2))
    return info


def prepare_demo_data(data_dir: str | Path = "data") -> list[dict[str, Any]]:
    """Fetch (once) and build both demo corpora under ``data_dir``; idempotent."""
    data_dir = Path(data_dir)
    infos = []
    raw = None
    for name in CORPORA:
        info_path = data_dir / name / "info.json"
        if info_path.exists() and "dev" in json.loads(info_path.read_text()):
            infos.append(json.loads(info_path.read_text()))
            continue
        raw = raw or fetch_sdist(data_dir / "_downloads")
        infos.append(build_corpus(name, raw, data_dir))
    return infos
