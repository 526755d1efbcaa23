"""Student training: the loss math, the vote rules, and a tiny real fine-tune on CPU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from distill.config import StudentConfig  # noqa: E402
from tasks.classify.inference import StudentPredictor  # noqa: E402
from tasks.classify.train import (  # noqa: E402
    TrainData,
    build_train_data,
    class_weights,
    distill_loss,
    soft_cross_entropy,  # noqa: E402
    split_train_val,
    target_log_prior,
    train_student,
)


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


def test_distill_loss_mixes_hard_and_soft_terms():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.1]])
    hard = torch.tensor([0, 1])
    soft = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    w = torch.ones(2)
    ce = torch.nn.functional.cross_entropy(logits, hard)
    assert distill_loss(logits, hard, soft, w, soft_weight=0.0, temperature=1.0).item() == pytest.approx(ce.item())
    soft_ce = soft_cross_entropy(logits, soft)
    assert distill_loss(logits, hard, soft, w, soft_weight=1.0, temperature=1.0).item() == pytest.approx(soft_ce.item())
    assert distill_loss(logits, hard, soft, w, soft_weight=0.25, temperature=1.0).item() == pytest.approx(
        0.75 * ce.item() + 0.25 * soft_ce.item()
    )
    # at temperature T both sides are softened and the term is scaled by T^2
    t = 3.0
    p = soft ** (1 / t)
    p = p / p.sum(-1, keepdim=True)
    expect = t * t * soft_cross_entropy(logits / t, p)
    assert distill_loss(logits, hard, soft, w, soft_weight=1.0, temperature=t).item() == pytest.approx(
        expect.item(), rel=1e-5
    )
    # one-hot soft targets at T=1 are the hard loss
    one_hot = torch.nn.functional.one_hot(hard, 2)
    assert distill_loss(logits, hard, one_hot, w, soft_weight=1.0, temperature=1.0).item() == pytest.approx(ce.item())


def test_logit_adjusted_loss_is_the_loss_on_shifted_logits_and_its_prior_is_the_mean_target():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.1]])
    hard = torch.tensor([0, 1])
    soft = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    w = torch.ones(2)
    prior = torch.log(torch.tensor([0.75, 0.25]))
    for sw in (0.0, 0.5, 1.0):
        plain = distill_loss(logits + prior, hard, soft, w, soft_weight=sw, temperature=2.0)
        assert distill_loss(
            logits, hard, soft, w, soft_weight=sw, temperature=2.0, log_prior=prior
        ).item() == pytest.approx(plain.item())
    # a skewed prior makes predicting the majority class cheaper in training, so its raw logit learns less
    majority_only = torch.tensor([[1.0, 1.0]])
    assert distill_loss(
        majority_only, torch.tensor([0]), soft[:1], w[:1], soft_weight=0.0, temperature=1.0, log_prior=prior
    ) < distill_loss(majority_only, torch.tensor([0]), soft[:1], w[:1], soft_weight=0.0, temperature=1.0)
    data = TrainData(["a", "b", "c"], [0, 0, 1], [1.0] * 3, [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], 0, 0)
    hard_prior = target_log_prior(data, [0, 1, 2], 0.0)
    assert np.exp(hard_prior) == pytest.approx([2 / 3, 1 / 3])
    soft_prior = target_log_prior(data, [0, 1, 2], 1.0)
    assert np.exp(soft_prior) == pytest.approx([1.7 / 3, 1.3 / 3])
    assert np.exp(target_log_prior(data, [2], 0.0))[0] == pytest.approx(1e-6, rel=1e-3)  # floor, not log 0


def test_class_weights_are_inverse_frequency():
    assert class_weights([0, 0, 0, 1], 2) == pytest.approx([4 / 6, 4 / 2])
    assert class_weights([0, 0], 3) == pytest.approx([1.0, 0.0, 0.0])


@pytest.mark.system
def test_training_uses_the_aggregations_distribution_as_soft_target(tmp_path):
    df = pd.DataFrame(
        {
            "text": ["a", "b"],
            "votes": [["pos", "pos", "neg"], ["neg", None, None]],
            "label": ["pos", "neg"],
            "confidence": [0.7, 0.3],
            "label_dist": [[0.7, 0.3], [0.1, 0.9]],
        }
    )
    p = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), p)
    d = build_train_data([str(p)], ["pos", "neg"], "weight", 0.6)
    assert d.soft == [pytest.approx([0.7, 0.3]), pytest.approx([0.1, 0.9])] and d.weights == pytest.approx([0.7, 0.3])


@pytest.mark.system
@pytest.mark.parametrize("balance", ["loss", "sampling", "logit_adjust"])
def test_skewed_teacher_labels_do_not_collapse_the_student_to_the_majority_class(tmp_path, balance):
    """75/25 teacher labels: the minority class must still be predicted (it is learnable here)."""
    pos = ["great fun", "loved it", "wonderful acting", "a joy", "brilliant film", "superb and moving"]
    neg = ["awful mess", "hated it", "terrible acting", "a bore", "dreadful film", "dull and pointless"]
    majority = [(f"{t} {i}", ["negative"], "negative", 1.0) for i in range(6) for t in neg]  # 36 items
    minority = [(f"{t} {i}", ["positive"], "positive", 1.0) for i in range(2) for t in pos]  # 12 items
    p = voted_file(tmp_path, majority + minority)
    cfg = StudentConfig(
        epochs=5,
        batch_size=8,
        learning_rate=3e-4,
        max_length=16,
        val_fraction=0.25,
        early_stopping_patience=20,
        class_balance=balance,
    )
    r = train_student(
        [p],
        labels=["positive", "negative"],
        out_dir=str(tmp_path / "out"),
        student=cfg,
        min_agreement=0.6,
        show_progress=False,
    )
    assert r.train_label_counts["negative"] > 2 * r.train_label_counts["positive"]
    assert r.class_balance == balance and r.val_macro_f1 > 0.5
    pred, _ = StudentPredictor(r.model_dir).predict(["superb and moving", "a joy", "loved it", "awful mess"])
    assert pred.count("positive") >= 2 and pred[-1] == "negative"


def test_vote_rules_for_training(tmp_path):
    p = voted_file(
        tmp_path,
        [
            ("a", ["pos", "pos", "neg"], "pos", 2 / 3),
            ("b", ["pos", "neg", None], None, 1 / 3),  # tie: abstained, never trained on
            ("c", ["neg", None, None], "neg", 1 / 3),  # low agreement
            ("d", ["neg", "neg", "neg"], "neg", 1.0),
        ],
    )
    f = build_train_data([p], ["pos", "neg"], "filter", 0.6)
    assert f.texts == ["a", "d"] and f.excluded_abstained == 1 and f.excluded_low_agreement == 1
    assert f.weights == [1.0, 1.0]
    w = build_train_data([p], ["pos", "neg"], "weight", 0.6)
    assert w.texts == ["a", "c", "d"] and w.weights == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert w.soft[0] == pytest.approx([2 / 3, 1 / 3]) and w.soft[1] == [0.0, 1.0]


def test_split_is_seeded_and_disjoint():
    a, b = split_train_val(100, 0.1, 3)
    assert len(b) == 10 and not set(a) & set(b) and (a, b) == split_train_val(100, 0.1, 3)


@pytest.mark.system
@pytest.mark.parametrize("soft", [False, True])
def test_tiny_training_runs_in_seconds_and_changes_predictions(tmp_path, soft):
    pos = ["great fun", "loved it", "wonderful acting", "a joy", "brilliant film", "superb and moving"]
    neg = ["awful mess", "hated it", "terrible acting", "a bore", "dreadful film", "dull and pointless"]
    rows = [(t, ["positive"] * 3, "positive", 1.0) for t in pos] + [(t, ["negative"] * 3, "negative", 1.0) for t in neg]
    p = voted_file(tmp_path, rows * 3)
    labels = ["positive", "negative"]
    cfg = StudentConfig(
        epochs=6,
        batch_size=8,
        learning_rate=3e-4,
        max_length=16,
        soft_label_weight=1.0 if soft else 0.0,
        distill_temperature=2.0 if soft else 1.0,
        val_fraction=0.2,
        early_stopping_patience=20,
    )
    probe = pos[:3] + neg[:3]
    r = train_student(
        [p], labels=labels, out_dir=str(tmp_path / "out"), student=cfg, min_agreement=0.6, show_progress=False
    )
    assert r.device == "cpu" and r.train_items + r.val_items == 36
    pred = StudentPredictor(r.model_dir)
    after, scores = pred.predict(probe)
    assert after == ["positive"] * 3 + ["negative"] * 3
    assert all(0.5 < s <= 1.0 for s in scores)
    # the untrained head (same base, fresh init) does not already know this
    from transformers import AutoModelForSequenceClassification

    from tasks.classify.train import resolve_student_path

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_student_path("auto"), num_labels=2)
    enc = pred.tok(probe, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = base(**enc).logits.argmax(-1).tolist()
    assert before != [0, 0, 0, 1, 1, 1]


@pytest.mark.system
def test_predictor_keeps_caller_order_and_int8_agrees(tmp_path):
    rows = [("good " * (i % 7 + 1), ["positive"] * 3, "positive", 1.0) for i in range(10)]
    rows += [("bad " * (i % 5 + 1), ["negative"] * 3, "negative", 1.0) for i in range(10)]
    p = voted_file(tmp_path, rows)
    # batches grouped by length (the CUDA default) train as well as random ones
    cfg = StudentConfig(
        epochs=5, batch_size=8, learning_rate=3e-4, max_length=16, early_stopping_patience=20, group_by_length=True
    )
    r = train_student(
        [p],
        labels=["positive", "negative"],
        out_dir=str(tmp_path / "o"),
        student=cfg,
        min_agreement=0.6,
        show_progress=False,
    )
    texts = [r_[0] for r_ in rows]
    fp32, _ = StudentPredictor(r.model_dir).predict(texts, batch_size=3)
    assert fp32 == [r_[2] for r_ in rows]  # sorted by length inside, returned in caller order
    int8, _ = StudentPredictor(r.model_dir, precision="int8").predict(texts, batch_size=3)
    assert sum(a == b for a, b in zip(fp32, int8)) >= 18


def test_several_gpus_train_under_accelerate_one_or_none_in_process(monkeypatch):
    from tasks.classify import train

    assert train.accelerate_command(0, "a.json", {}) is None and train.accelerate_command(1, "a.json", {}) is None
    cmd = train.accelerate_command(4, "a.json", {})
    assert cmd[1:] == [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "4",
        "-m",
        "tasks.classify.train",
        "a.json",
    ]
    assert train.accelerate_command(4, "a.json", {"LOCAL_RANK": "0"}) is None  # already a rank of a launch
    # what the device pick reports on a machine with 4 bf16 GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert train.pick_device() == {"device": "cuda", "bf16": True, "fp16": False, "use_cpu": False, "n_gpu": 4}
