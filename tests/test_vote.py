import pandas as pd
import pytest

from tasks.classify.aggregate import majority_vote, vote_frame


def test_clear_majority_share_is_over_all_k():
    r = majority_vote(["positive", "positive", "negative"], min_agreement=0.6)
    assert r.label == "positive"
    assert abs(r.confidence - 2 / 3) < 1e-9
    assert r.n_valid_votes == 3 and r.n_votes == 3
    assert r.abstain_reason is None and r.low_agreement is False


def test_invalid_votes_count_against_confidence():
    r = majority_vote(["positive", None, None], min_agreement=0.6)
    assert r.label == "positive"
    assert abs(r.confidence - 1 / 3) < 1e-9  # not 100%: two samples gave nothing usable
    assert r.n_valid_votes == 1
    assert r.low_agreement is True


def test_tie_abstains_with_reason_never_random():
    for _ in range(20):
        r = majority_vote(["negative", "positive", None, None])
        assert r.label is None
        assert r.abstain_reason == "tie between negative and positive"


def test_no_valid_votes_and_all_failed_are_distinguished():
    assert majority_vote([None, None]).abstain_reason == "no valid votes"
    r = majority_vote([None, None], failed=[True, True])
    assert r.label is None and r.abstain_reason == "all requests failed"
    assert majority_vote([None, None], failed=[True, False]).abstain_reason == "no valid votes"


def test_single_sample():
    r = majority_vote(["neutral"], min_agreement=0.6)
    assert r.label == "neutral" and r.confidence == 1.0


def test_vote_frame_keeps_every_row():
    df = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "votes": [["x", "x", "y"], [None, None, None], ["x", "y", None]],
            "sample_status": [["ok"] * 3, ["failed", "invalid", "failed"], ["ok", "ok", "invalid"]],
        }
    )
    out = vote_frame(df, 0.6)
    assert list(out["id"]) == ["a", "b", "c"]
    assert list(out["label"]) == ["x", None, None]
    assert out["abstain_reason"].tolist()[1:] == ["no valid votes", "tie between x and y"]


def test_mean_probability_averages_distributions_and_counts_failures_against_confidence():
    from tasks.classify.aggregate import mean_probability

    labels = ["positive", "negative"]
    r = mean_probability(["positive", "negative", "positive"], [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], labels)
    assert r.label == "positive" and r.confidence == pytest.approx(2.0 / 3) and r.prob_source == "logprobs"
    assert r.label_dist == pytest.approx([2.0 / 3, 1.0 / 3]) and r.entropy > 0
    # an invalid and a failed sample contribute nothing: confidence is over all k
    r = mean_probability(["negative", None, None], [[0.2, 0.8], [0.9, 0.1], None], labels, 0.6, [False, False, True])
    assert r.label == "negative" and r.confidence == pytest.approx(0.8 / 3) and r.low_agreement
    assert r.label_dist == pytest.approx([0.2, 0.8])
    # without log-probabilities a sample is a one-hot vote: the result is the vote share
    r = mean_probability(["negative", "negative", "positive"], [None, None, None], labels)
    assert r.confidence == pytest.approx(2 / 3) and r.prob_source == "votes"
    r = mean_probability(["negative", "positive"], [[0.1, 0.9], None], labels)
    assert r.prob_source == "mixed" and r.label == "positive" and r.confidence == pytest.approx(1.1 / 2)


def test_mean_probability_ties_and_empty_items_abstain_with_reasons():
    from tasks.classify.aggregate import mean_probability

    labels = ["positive", "negative"]
    r = mean_probability(["positive", "negative"], [[0.5, 0.5], [0.5, 0.5]], labels)
    assert r.label is None and r.abstain_reason == "tie between negative and positive"
    assert (
        mean_probability([None, None], [None, None], labels, failed=[True, True]).abstain_reason
        == "all requests failed"
    )
    assert mean_probability([None, None], [[0.9, 0.1], None], labels).abstain_reason == "no valid votes"


def test_vote_frame_writes_the_distribution_for_either_aggregation():
    df = pd.DataFrame(
        {
            "votes": [["x", "x", "y"]],
            "sample_status": [["ok"] * 3],
            "sample_probs": [[[0.6, 0.4], [0.55, 0.45], [0.1, 0.9]]],
        }
    )
    maj = vote_frame(df, 0.6, ["x", "y"], "majority").iloc[0]
    # majority keeps the most votes as the label and the teacher's probabilities as the distribution
    assert maj["label"] == "x" and maj["confidence"] == pytest.approx(2 / 3)
    assert list(maj["label_dist"]) == pytest.approx([1.25 / 3, 1.75 / 3]) and maj["prob_source"] == "logprobs"
    no_lp = vote_frame(df.drop(columns=["sample_probs"]), 0.6, ["x", "y"], "majority").iloc[0]
    assert list(no_lp["label_dist"]) == pytest.approx([2 / 3, 1 / 3]) and no_lp["prob_source"] == "votes"
    mp = vote_frame(df, 0.6, ["x", "y"], "mean_probability").iloc[0]
    assert mp["label"] == "y" and mp["confidence"] == pytest.approx(1.75 / 3)  # the probabilities overrule the count
