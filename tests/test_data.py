import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.data.readers import DataError, iter_items, write_shards
from tasks.results.data import DataReport


def collect(path, **kw):
    rep = DataReport(path=str(path))
    rej: list = []
    frames = list(iter_items(path, "text", "id", kw.pop("chunk_rows", 2), report=rep, rejected=rej, **kw))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return df, rep, rej


ROWS = [
    {"id": "1", "text": "good"},
    {"id": "2", "text": ""},
    {"id": "3", "text": "good"},
    {"id": "1", "text": "again"},
    {"id": "4", "text": "  "},
    {"id": "5", "text": "fine"},
]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "datasets"])
def test_formats_and_bookkeeping(tmp_path, fmt):
    df = pd.DataFrame(ROWS)
    if fmt == "csv":
        p = tmp_path / "in.csv"
        df.to_csv(p, index=False)
    elif fmt == "jsonl":
        p = tmp_path / "in.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    elif fmt == "parquet":
        p = tmp_path / "in.parquet"
        df.to_parquet(p)
    else:
        import datasets

        p = tmp_path / "ds"
        datasets.Dataset.from_pandas(df).save_to_disk(str(p))
    out, rep, rej = collect(p)
    assert out["id"].tolist() == ["1", "3", "5"]
    assert rep.rows_read == 6 and rep.items == 3
    assert rep.empty_text == 2 and rep.duplicate_ids == 1 and rep.duplicate_texts == 1
    assert sorted(r["reason"] for r in rej) == ["duplicate id '1'", "empty text", "empty text"]
    assert [r["row"] for r in rej] == [2, 4, 5]


def test_missing_column_names_file_and_columns(tmp_path):
    p = tmp_path / "in.csv"
    pd.DataFrame({"id": [1], "body": ["x"]}).to_csv(p, index=False)
    with pytest.raises(DataError) as e:
        collect(p)
    assert "in.csv" in str(e.value) and "'text'" in str(e.value) and "body" in str(e.value)


def test_jsonl_bad_line_is_named(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": \n')
    with pytest.raises(DataError, match="line 2"):
        collect(p)
    p.write_text('{"id": 1, "text": "a"}\n{"id": 2}\n')
    with pytest.raises(DataError, match=r"line 2: missing field\(s\) \['text'\]"):
        collect(p)


@pytest.mark.parametrize(
    "name,blob",
    [
        ("in.csv", b"id,text\n1,caf\xe9 ok\n2,fine\n"),
        ("in.jsonl", b'{"id": "1", "text": "caf\xe9 ok"}\n{"id": "2", "text": "fine"}\n'),
    ],
)
def test_invalid_utf8_counted_and_kept(tmp_path, name, blob):
    p = tmp_path / name
    p.write_bytes(blob)
    out, rep, _ = collect(p)
    assert rep.invalid_utf8 == 1 and rep.items == 2
    assert out["text"][0] == "caf\ufffd ok"


def test_gold_label_outside_label_set_names_row(tmp_path):
    p = tmp_path / "gold.csv"
    pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"], "label": ["positive", "meh"]}).to_csv(p, index=False)
    with pytest.raises(DataError) as e:
        list(iter_items(p, "text", "id", 10, label_column="label", labels=["positive", "negative"]))
    assert "row 2" in str(e.value) and "'meh'" in str(e.value)


def test_limit_and_missing_file(tmp_path):
    p = tmp_path / "in.parquet"
    pd.DataFrame({"id": [str(i) for i in range(10)], "text": ["t"] * 10}).to_parquet(p)
    out, rep, _ = collect(p, limit=4)
    assert len(out) == 4 and rep.truncated_by_limit
    with pytest.raises(DataError, match="not found"):
        collect(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown file type"):
        (tmp_path / "x.xml").write_text("<a/>")
        collect(tmp_path / "x.xml")


def test_write_shards_rechunks_without_loss(tmp_path):
    frames = [
        pd.DataFrame({"id": [f"{j}-{i}" for i in range(n)], "text": ["t"] * n}) for j, n in enumerate([3, 7, 1, 4])
    ]
    paths = write_shards(iter(frames), tmp_path / "s", shard_rows=5)
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert sizes == [5, 5, 5]
    ids = sum((pq.read_table(p).column("id").to_pylist() for p in paths), [])
    assert len(set(ids)) == 15
