"""Human review without a server: the versioned label files, the rules that make one label per item, the
selection strategies, the Label Studio / Argilla formats and what the student trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from distill.config import ReviewConfig
from tasks.classify.train import build_train_data
from tasks.data.human_labels import (
    HumanLabelsError,
    gold_with_reviews,
    load_reviewed,
    resolve,
    to_gold,
    versions,
    write_version,
)
from tasks.review.formats import argilla_records, chosen_label, label_config, labelstudio_tasks
from tasks.review.loop import ReviewError, annotation_rows
from tasks.review.select import ReviewItem, pick

LABELS = ["negative", "positive"]


def ann(
    item_id: str, label: str, annotation_id: int, reviewer: str = "1", updated_at: str = "2026-12-06T01:00"
) -> dict:
    return {
        "id": item_id,
        "text": f"text of {item_id}",
        "label": label,
        "reviewer": reviewer,
        "updated_at": updated_at,
        "annotation_id": annotation_id,
        "task_id": annotation_id,
        "project_id": 1,
    }


def test_importing_the_same_annotations_twice_writes_one_version(tmp_path):
    df = pd.DataFrame([ann("a", "positive", 1), ann("b", "negative", 2)])
    w1 = write_version(tmp_path, df)
    w2 = write_version(tmp_path, df.iloc[::-1])  # the same annotations in another order
    assert (w1.version, w1.new) == (1, True) and (w2.version, w2.new) == (1, False) and w1.digest == w2.digest
    w3 = write_version(tmp_path, pd.DataFrame([ann("a", "negative", 1), ann("b", "negative", 2)]))  # one edited
    assert (w3.version, w3.new) == (2, True) and list(versions(tmp_path)) == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_reviewers_who_disagree_are_both_kept_and_the_rule_decides(tmp_path):
    df = pd.DataFrame(
        [
            ann("a", "positive", 1, "alice", "2026-12-06T01:00"),
            ann("a", "negative", 2, "bob", "2026-12-06T02:00"),  # the later one
            ann("b", "positive", 3),
        ]
    )
    by_rule = {
        rule: resolve(df, ReviewConfig(on_disagreement=rule), LABELS, source="f") for rule in ("teacher", "latest")
    }
    by_rule["exclude"] = resolve(df, ReviewConfig(on_disagreement="exclude"), LABELS, source="f")
    assert all(r.annotations == 3 and r.items == 2 and r.disagreements == 1 for r in by_rule.values())
    assert by_rule["teacher"].train == {"b": "positive"} and by_rule["teacher"].kept_teacher == {"a"}
    assert by_rule["latest"].train == {"a": "negative", "b": "positive"}
    assert by_rule["exclude"].train == {"b": "positive"} and by_rule["exclude"].not_for_training == {"a"}


def test_a_label_outside_the_set_names_the_item(tmp_path):
    df = pd.DataFrame([ann("a", "positive", 1), ann("zz", "neutral", 7)])
    with pytest.raises(HumanLabelsError, match=r"item 'zz' \(annotation 7\) has label 'neutral'"):
        resolve(df, ReviewConfig(), LABELS, source="f")


def test_gold_share_is_a_stable_draw_and_never_trains(tmp_path):
    ids = [f"p{i}" for i in range(400)]
    share = sum(to_gold(i, 0.25) for i in ids) / len(ids)
    assert 0.18 < share < 0.32 and [to_gold(i, 0.25) for i in ids] == [to_gold(i, 0.25) for i in ids]
    df = pd.DataFrame([ann(i, "positive", n) for n, i in enumerate(ids)])
    r = resolve(df, ReviewConfig(gold_share=0.25), LABELS, source="f")
    gold = set(r.gold["id"])
    assert gold and gold.isdisjoint(r.train) and len(gold) + len(r.train) == 400
    assert gold == {i for i in ids if to_gold(i, 0.25)}


def test_the_run_reads_the_newest_version_or_the_pinned_one(tmp_path):
    write_version(tmp_path, pd.DataFrame([ann("a", "positive", 1)]))
    write_version(tmp_path, pd.DataFrame([ann("a", "negative", 1)]))
    newest = load_reviewed(ReviewConfig(labels_dir=str(tmp_path)), LABELS)
    pinned = load_reviewed(ReviewConfig(labels_dir=str(tmp_path), labels_version=1), LABELS)
    assert newest is not None and pinned is not None
    assert (newest.version, newest.train) == (2, {"a": "negative"}) and (pinned.version, pinned.train) == (
        1,
        {"a": "positive"},
    )
    with pytest.raises(HumanLabelsError, match="labels_version 9"):
        load_reviewed(ReviewConfig(labels_dir=str(tmp_path), labels_version=9), LABELS)
    assert load_reviewed(ReviewConfig(labels_dir=str(tmp_path / "none")), LABELS) is None


def voted(tmp_path: Path, rows: list[tuple[str, str, str | None, float]]) -> str:
    """A voted pool shard: (id, text, teacher label, confidence)."""
    p = tmp_path / "part-00000.parquet"
    pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "text": [r[1] for r in rows],
            "votes": [[r[2]] for r in rows],
            "label": [r[2] for r in rows],
            "confidence": [r[3] for r in rows],
            "label_dist": [[0.2, 0.8] if r[2] == "positive" else [0.8, 0.2] for r in rows],
        }
    ).to_parquet(p)
    return str(p)


def test_reviewed_items_train_with_the_human_label_and_gold_ones_not_at_all(tmp_path):
    shard = voted(tmp_path, [(f"p{i}", f"t{i}", "positive", 0.6) for i in range(40)] + [("p40", "t40", None, 0.0)])
    ids = [f"p{i}" for i in range(0, 41, 2)]  # p40: the teacher abstained, a reviewer did not
    labels_dir = tmp_path / "reviews"
    write_version(labels_dir, pd.DataFrame([ann(i, "negative", n) for n, i in enumerate(ids)]))
    review = ReviewConfig(labels_dir=str(labels_dir), gold_share=0.3, weight=2.0)
    r = load_reviewed(review, LABELS)
    assert r is not None and len(r.gold) and r.train
    data = build_train_data([shard], LABELS, "weight", 0.6, reviewed=r, human_weight=2.0)
    rows = dict(zip(data.ids, zip(data.labels, data.sources, data.weights, data.soft)))
    assert {i for i, v in rows.items() if v[1] == "human"} == set(r.train)
    assert all(rows[i] == (0, "human", 2.0, [1.0, 0.0]) for i in r.train)  # the reviewer's label, one-hot
    assert set(r.gold["id"]).isdisjoint(rows) and data.excluded_reviewed == len(r.gold)
    assert all(rows[f"p{i}"][:3] == (1, "teacher", 0.6) for i in range(1, 40, 2))  # unreviewed: the teacher's


def test_gold_grows_by_the_reviewed_gold_items_only(tmp_path):
    from distill.config import DataConfig

    pd.DataFrame({"id": ["g1", "g2"], "text": ["x", "y"], "label": ["positive", "negative"]}).to_parquet(
        tmp_path / "gold.parquet"
    )
    labels_dir = tmp_path / "reviews"
    ids = [f"p{i}" for i in range(30)]
    write_version(labels_dir, pd.DataFrame([ann(i, "negative", n) for n, i in enumerate(ids)]))
    review = ReviewConfig(labels_dir=str(labels_dir), gold_share=0.3)
    data = DataConfig(pool_path="pool.parquet", gold_path=str(tmp_path / "gold.parquet"))
    grown = gold_with_reviews(data, review, labels=LABELS, out_dir=tmp_path / "input")
    g = pd.read_parquet(grown.gold_path)
    r = load_reviewed(review, LABELS)
    assert r is not None
    assert set(g["id"]) == {"g1", "g2"} | set(r.gold["id"]) and set(g["id"]).isdisjoint(r.train)
    assert gold_with_reviews(data, ReviewConfig(labels_dir=str(labels_dir)), labels=LABELS, out_dir=tmp_path) is data


def items() -> list[ReviewItem]:
    return [
        ReviewItem("a", "ta", "positive", 0.95, False, student_label="positive"),
        ReviewItem("b", "tb", "positive", 0.55, False, student_label="negative"),
        ReviewItem("c", "tc", None, 0.0, False, student_label="negative"),
        ReviewItem("d", "td", "negative", 0.70, True, student_label="negative"),
        ReviewItem("e", "te", "negative", 0.60, False, student_label="negative"),
    ]


def test_selection_strategies():
    assert [i.id for i in pick(items(), "low_confidence", 3)] == ["c", "b", "e"]
    assert [i.id for i in pick(items(), "low_confidence", 3, exclude=frozenset({"c"}))] == ["b", "e", "d"]
    # disagreement: teacher vs student (b, c: the teacher abstained) or split samples (d); not padded to 5
    got = pick(items(), "disagreement", 5)
    assert [i.id for i in got] == ["c", "b", "d"] and {i.selected_by for i in got} == {"disagreement"}
    r1, r2 = pick(items(), "random", 3, seed=1), pick(items(), "random", 3, seed=1)
    assert [i.id for i in r1] == [i.id for i in r2] and len({i.id for i in r1}) == 3
    no_student = [ReviewItem(i.id, i.text, i.teacher_label, i.teacher_confidence, False) for i in items()]
    with pytest.raises(ValueError, match="no student"):
        pick(no_student, "disagreement", 2)


def test_label_studio_tasks_carry_the_teacher_label_as_a_scored_prediction():
    got = labelstudio_tasks(pick(items(), "low_confidence", 2), run_id="r1", prompt_version="h1", model_version="m")
    abstained, b = got
    assert "predictions" not in abstained and abstained["data"]["distill_id"] == "c"
    pred = b["predictions"][0]
    assert pred["score"] == 0.55 and pred["result"][0]["value"] == {"choices": ["positive"]}
    assert b["data"]["run_id"] == "r1" and b["data"]["prompt_version"] == "h1"
    assert '<Choice value="negative"/>' in label_config(LABELS) and 'toName="text"' in label_config(LABELS)
    rec = argilla_records(pick(items(), "low_confidence", 2), run_id="r1", prompt_version="h1", agent="m")[1]
    assert rec["suggestions"][0] == {"question_name": "label", "value": "positive", "score": 0.55, "agent": "m"}
    json.dumps(got)  # plain JSON


def task(tid: int, item_id: str, *anns: dict) -> dict:
    return {"id": tid, "data": {"distill_id": item_id, "text": f"t {item_id}"}, "annotations": list(anns)}


def a(aid: int, label: str | None, who: int = 1, cancelled: bool = False) -> dict:
    result = [] if label is None else [{"from_name": "label", "type": "choices", "value": {"choices": [label]}}]
    return {"id": aid, "completed_by": who, "result": result, "was_cancelled": cancelled, "updated_at": f"t{aid}"}


def test_annotations_are_all_checked_before_any_is_kept():
    rows, skipped = annotation_rows(
        [
            task(1, "x", a(1, "positive"), a(2, "negative", who=2)),
            task(2, "y", a(3, None)),
            task(3, "z", a(4, "positive", cancelled=True)),
        ],
        labels=LABELS,
        project_id=5,
    )
    assert list(rows["id"]) == ["x", "x"] and list(rows["reviewer"]) == ["1", "2"] and skipped == 2
    with pytest.raises(ReviewError, match=r"nothing was written: task 9 \(item 'w'\): label 'neutral'"):
        annotation_rows([task(1, "x", a(1, "positive")), task(9, "w", a(5, "neutral"))], labels=LABELS, project_id=5)
    assert chosen_label([{"from_name": "label", "type": "choices", "value": {"choices": ["positive"]}}]) == "positive"
