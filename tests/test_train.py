"""Student training: the loss math, the vote rules, and a tiny real fine-tune on CPU."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from distill.config import StudentConfig  # noqa: E402
from tasks.inference import StudentPredictor  # noqa: E402
from tasks.train import build_train_data, soft_cross_entropy, split_train_val, train_student  # noqa: E402


def test_soft_ce_equals_hard_ce_for_one_hot_and_is_zero_for_certain_match():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    y = torch.tensor([0, 2])
    one_hot = torch.nn.functional.one_hot(y, 3)
    assert torch.allclose(soft_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, y))
    sure = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])
    assert soft_cross_entropy(sure, torch.tensor([[1, 0], [0, 1]])).item() == pytest.approx(0.0, abs=1e-6)


def test_weights_scale_each_example():
    logits = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
    t = torch.tensor([[1, 0], [1, 0]])
    per = -torch.log_softmax(logits, -1)[:, 0]
    w = torch.tensor([1.0, 0.0])
    assert soft_cross_entropy(logits, t, w).item() == pytest.approx(per[0].item())
    w = torch.tensor([1.0, 3.0])
    assert soft_cross_entropy(logits, t, w).item() == pytest.approx(((per[0] + 3 * per[1]) / 4).item())


def voted_file(tmp_path, rows):
    df = pd.DataFrame(rows, columns=["text", "votes", "label", "confidence"])
    p = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), p)
    return str(p)


def test_vote_rules_for_training(tmp_path):
    p = voted_file(tmp_path, [
        ("a", ["pos", "pos", "neg"], "pos", 2 / 3),
        ("b", ["pos", "neg", None], None, 1 / 3),  # tie: abstained, never trained on
        ("c", ["neg", None, None], "neg", 1 / 3),  # low agreement
        ("d", ["neg", "neg", "neg"], "neg", 1.0),
    ])
    f = build_train_data([p], ["pos", "neg"], "filter", 0.6)
    assert f.texts == ["a", "d"] and f.excluded_abstained == 1 and f.excluded_low_agreement == 1
    assert f.weights == [1.0, 1.0]
    w = build_train_data([p], ["pos", "neg"], "weight", 0.6)
    assert w.texts == ["a", "c", "d"] and w.weights == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert w.soft[0] == pytest.approx([2 / 3, 1 / 3]) and w.soft[1] == [0.0, 1.0]


def test_split_is_seeded_and_disjoint():
    a, b = split_train_val(100, 0.1, 3)
    assert len(b) == 10 and not set(a) & set(b) and (a, b) == split_train_val(100, 0.1, 3)


@pytest.mark.parametrize("soft", [False, True])
def test_tiny_training_runs_in_seconds_and_changes_predictions(tmp_path, soft):
    pos = ["great fun", "loved it", "wonderful acting", "a joy", "brilliant film", "superb and moving"]
    neg = ["awful mess", "hated it", "terrible acting", "a bore", "dreadful film", "dull and pointless"]
    rows = [(t, ["positive"] * 3, "positive", 1.0) for t in pos] + [(t, ["negative"] * 3, "negative", 1.0) for t in neg]
    p = voted_file(tmp_path, rows * 3)
    labels = ["positive", "negative"]
    cfg = StudentConfig(epochs=6, batch_size=8, learning_rate=3e-4, max_length=16, soft_labels=soft,
                        val_fraction=0.2, early_stopping_patience=20)
    probe = pos[:3] + neg[:3]
    r = train_student([p], labels, str(tmp_path / "out"), cfg, 0.6, show_progress=False)
    assert r["device"] == "cpu" and r["train_items"] + r["val_items"] == 36
    pred = StudentPredictor(r["model_dir"])
    after, scores = pred.predict(probe)
    assert after == ["positive"] * 3 + ["negative"] * 3
    assert all(0.5 < s <= 1.0 for s in scores)
    # the untrained head (same base, fresh init) does not already know this
    from transformers import AutoModelForSequenceClassification
    from tasks.train import resolve_student_path
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_student_path("auto"), num_labels=2)
    enc = pred.tok(probe, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = base(**enc).logits.argmax(-1).tolist()
    assert before != [0, 0, 0, 1, 1, 1]


def test_predictor_keeps_caller_order_and_int8_agrees(tmp_path):
    rows = [("good " * (i % 7 + 1), ["positive"] * 3, "positive", 1.0) for i in range(10)]
    rows += [("bad " * (i % 5 + 1), ["negative"] * 3, "negative", 1.0) for i in range(10)]
    p = voted_file(tmp_path, rows)
    cfg = StudentConfig(epochs=5, batch_size=8, learning_rate=3e-4, max_length=16, early_stopping_patience=20)
    r = train_student([p], ["positive", "negative"], str(tmp_path / "o"), cfg, 0.6, show_progress=False)
    texts = [r_[0] for r_ in rows]
    fp32, _ = StudentPredictor(r["model_dir"]).predict(texts, batch_size=3)
    assert fp32 == [r_[2] for r_ in rows]  # sorted by length inside, returned in caller order
    int8, _ = StudentPredictor(r["model_dir"], precision="int8").predict(texts, batch_size=3)
    assert sum(a == b for a, b in zip(fp32, int8)) >= 18
