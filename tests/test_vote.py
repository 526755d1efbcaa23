from tasks.vote import majority_vote, vote_frame
import pandas as pd


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
    df = pd.DataFrame({
        "id": ["a", "b", "c"],
        "votes": [["x", "x", "y"], [None, None, None], ["x", "y", None]],
        "sample_status": [["ok"] * 3, ["failed", "invalid", "failed"], ["ok", "ok", "invalid"]],
    })
    out = vote_frame(df, 0.6)
    assert list(out["id"]) == ["a", "b", "c"]
    assert list(out["label"]) == ["x", None, None]
    assert out["abstain_reason"].tolist()[1:] == ["no valid votes", "tie between x and y"]
