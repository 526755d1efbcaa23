import math

import pytest

from tasks.generate.metrics import bertscore, output_shares, rouge


def test_rouge_identical_disjoint_and_empty():
    r = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert (r.rouge1, r.rouge2, r.rougeL) == (pytest.approx(1.0),) * 3
    r = rouge(["dogs bark loudly"], ["the cat sat on the mat"])
    assert (r.rouge1, r.rouge2, r.rougeL) == (0.0, 0.0, 0.0)
    r = rouge(["", "   ", "the cat sat"], ["the cat sat", "the cat sat", "the cat sat"])
    assert r.per_item_rougeL == [0.0, 0.0, pytest.approx(1.0)]
    assert r.rougeL == pytest.approx(1 / 3)  # empty predictions count in the mean, they are not skipped


def test_rouge_stems_and_averages_per_item():
    r = rouge(["the cats are running", "x"], ["the cat is running", "y"])
    assert r.per_item_rougeL[0] == pytest.approx(0.75)  # cats~cat, running~running; are/is differ
    assert r.rougeL == pytest.approx(0.375)


def test_length_mismatch_raises_naming_both_lengths():
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        rouge(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 predictions but 1 references"):
        bertscore(["a", "b", "c"], ["a"])


@pytest.fixture(scope="module")
def bs():
    preds = [
        "The cat sat on the mat.",  # identical
        "A cat was sitting on the mat.",  # paraphrase
        "Stock prices fell sharply today.",  # unrelated
        "",  # empty
        "The cat",
    ]  # strict subset of the reference
    refs = ["The cat sat on the mat."] * 5
    return bertscore(preds, refs)


def test_bertscore_orders_identical_paraphrase_unrelated(bs):
    f = bs.per_item_f1
    assert f[0] == pytest.approx(1.0, abs=1e-4)
    assert f[0] > f[1] > f[2]
    assert f[1] > 0.8 and f[2] < 0.5
    assert bs.num_layers == 6 and bs.model.endswith("model")


def test_bertscore_empty_prediction_scores_zero_without_nan(bs, capsys):
    assert bs.per_item_f1[3] == 0.0
    assert all(math.isfinite(x) for x in [bs.precision, bs.recall, bs.f1, *bs.per_item_f1])
    assert bs.f1 == pytest.approx(sum(bs.per_item_f1) / 5)
    only_empty = bertscore(["", "  "], ["a reference", "another"])
    assert only_empty.per_item_f1 == [0.0, 0.0] and only_empty.f1 == 0.0
    assert "Empty candidate" not in capsys.readouterr().err


def test_bertscore_subset_prediction_has_precision_above_recall():
    sub = bertscore(["The cat"], ["The cat sat on the mat."])
    assert sub.precision > sub.recall + 0.1  # every predicted token is in the reference, not vice versa
    rev = bertscore(["The cat sat on the mat."], ["The cat"])
    assert rev.recall == pytest.approx(sub.precision, abs=1e-5) and rev.precision == pytest.approx(sub.recall, abs=1e-5)


def test_bertscore_is_deterministic(bs):
    again = bertscore(
        ["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock prices fell sharply today.", "", "The cat"],
        ["The cat sat on the mat."] * 5,
    )
    assert again.per_item_f1 == pytest.approx(bs.per_item_f1, abs=1e-6)


def test_output_shares():
    preds = ["fine answer", "", None, "   ", "one two three four five", "one two three"]
    s = output_shares(preds, max_words=3)
    assert s["empty"] == pytest.approx(3 / 6)
    assert s["over_length"] == pytest.approx(1 / 6)
    assert output_shares(preds, max_words=None)["over_length"] == 0.0
    assert output_shares([], max_words=3) == {"empty": 0.0, "over_length": 0.0}
