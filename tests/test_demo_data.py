"""The bundled XSum split: every usable pair lands in exactly one split, references stay out of the pool."""

import json
from pathlib import Path

import pandas as pd

from tasks.data.demo import XSUM_SPLIT, build_xsum


def test_xsum_split_keeps_every_pair_once_and_names_what_it_left_out(tmp_path: Path) -> None:
    rows = [
        {"id": str(1000 + i), "document": f"Article number {i} says something.", "summary": f"Summary {i}."}
        for i in range(XSUM_SPLIT["gold"] + XSUM_SPLIT["dev"] + 25)
    ]
    rows.append({"id": "999", "document": "   ", "summary": "A summary of nothing."})
    src = tmp_path / "test.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    info = build_xsum(src, tmp_path)
    d = tmp_path / "xsum"
    pool, gold, dev = (pd.read_parquet(d / f"{s}.parquet") for s in ("pool", "gold", "dev"))
    assert (len(gold), len(dev), len(pool)) == (XSUM_SPLIT["gold"], XSUM_SPLIT["dev"], 25)
    ids = pd.concat([pool["id"], gold["id"], dev["id"]])
    assert ids.is_unique and len(ids) == len(rows) - 1
    assert info["left_out_empty"] == ["999"]
    assert "reference" not in pool.columns and gold["reference"].str.len().gt(0).all()
    refs = pd.read_parquet(d / "pool_references.parquet")
    assert refs["id"].tolist() == pool["id"].tolist()


def test_mojibake_is_repaired_per_sequence_and_correct_text_is_left_alone() -> None:
    from tasks.data.demo import repair_mojibake

    assert repair_mojibake("a Â£5m deal at the cafÃ©") == ("a £5m deal at the café", 2)
    assert repair_mojibake("Zürich, naïve, £5m") == ("Zürich, naïve, £5m", 0)


def test_data_fetch_reports_every_corpus_of_the_setup(capsys) -> None:
    """`distill data fetch` is the set-up's own step (make's data target): it must print the
    generation corpus too (it crashed on XSum's info, which has no label counts)."""
    from distill.cli import main as cli_main

    assert cli_main(["data", "fetch", "--data-dir", "data"]) == 0
    out = capsys.readouterr().out
    assert "movie: pool" in out and "gold labels" in out
    assert "xsum: pool 599, dev 100, gold 300, human references (88 repaired fields)" in out
