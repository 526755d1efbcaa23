import json

import numpy as np
import pandas as pd
import pytest
from rouge_score.rouge_scorer import RougeScorer

from tasks.generate.medoid import (
    INVALID_EMPTY,
    INVALID_MISSING,
    INVALID_TOO_LONG,
    INVALID_TRUNCATED,
    medoid_frame,
    medoid_stats,
    pairwise_similarity,
    sample_invalid_reason,
    select_medoid,
)


def _rl(a: str, b: str) -> float:
    """ROUGE-L F computed independently of the module under test."""
    return RougeScorer(["rougeL"], use_stemmer=True).score(a, b)["rougeL"].fmeasure


@pytest.fixture(scope="module")
def minilm():
    from tasks.generate.medoid import get_embedder

    return get_embedder()


def test_invalid_reasons():
    assert sample_invalid_reason(None, "stop", 10) == INVALID_MISSING
    assert sample_invalid_reason(float("nan"), None, None) == INVALID_MISSING  # pandas round trip of None
    assert sample_invalid_reason("", "stop", 10) == INVALID_EMPTY
    assert sample_invalid_reason(" \n\t", None, None) == INVALID_EMPTY
    assert sample_invalid_reason("an answer cut off", "length", None) == INVALID_TRUNCATED
    assert sample_invalid_reason("one two three four", "stop", 3) == INVALID_TOO_LONG
    assert sample_invalid_reason("one two three", "stop", 3) is None  # exactly max_words is fine
    assert sample_invalid_reason("one two three four", None, None) is None


def test_pairwise_rougeL_is_symmetric_with_unit_diagonal():
    texts = ["the cat sat on the mat", "a cat sat on a mat", "stock prices fell"]
    sim = pairwise_similarity(texts)
    assert sim.shape == (3, 3)
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0)
    assert sim[0, 1] == pytest.approx(_rl(texts[0], texts[1])) and sim[0, 1] > 0.5
    assert sim[0, 2] == 0.0
    with pytest.raises(ValueError, match="unknown similarity method"):
        pairwise_similarity(texts, method="bleu")


def test_clear_winner_is_a_paraphrase_and_agreement_is_its_mean_similarity():
    s = [
        "The cat sat on the mat all afternoon.",
        "A cat was sitting on the mat all afternoon.",
        "Quarterly revenue rose all year.",
    ]
    r = select_medoid(s)
    assert r.index in (0, 1) and r.text == s[r.index]
    other = 1 - r.index
    assert r.agreement == pytest.approx((_rl(s[r.index], s[other]) + _rl(s[r.index], s[2])) / 2)
    outlier_mean = (_rl(s[2], s[0]) + _rl(s[2], s[1])) / 2
    assert r.agreement > outlier_mean
    assert (r.n_valid, r.n_invalid, r.invalid_reasons, r.abstain_reason) == (3, 0, {}, None)


def test_ties_go_to_the_lowest_index_and_duplicates_agree_fully():
    r = select_medoid(["same answer"] * 3)
    assert r.index == 0 and r.agreement == pytest.approx(1.0)
    r = select_medoid(["the sky is blue", "grass is green"])  # k=2: both have the same mean
    assert r.index == 0 and r.agreement == pytest.approx(_rl("the sky is blue", "grass is green"))
    r = select_medoid(["something else entirely", "the answer is four", "the answer is four"])
    assert r.index == 1 and r.agreement == pytest.approx(0.5)  # (1.0 with its duplicate + 0.0) / 2
    r = select_medoid([None, "the answer is four", "the answer is four"])
    assert r.index == 1 and r.agreement == pytest.approx(1.0)  # the original sample index, not the valid position


def test_invalid_samples_are_excluded_and_counted():
    s = [
        None,
        "",
        "   \n",
        "good answer one two",  # truncated: would be the medoid if it counted
        "good answer one two three",  # 5 words > max_words=4: would also win
        "good answer one",
        "good answer two",
        "an unrelated reply",
    ]
    fr = [None, "stop", "stop", "length", "stop", "stop", "stop", "stop"]
    assert select_medoid(s).index in (3, 4)  # without the rules the invalid ones win
    r = select_medoid(s, fr, max_words=4)
    assert r.index == 5 and r.text == "good answer one"
    assert r.agreement == pytest.approx((_rl(s[5], s[6]) + _rl(s[5], s[7])) / 2)
    assert r.invalid_reasons == {INVALID_MISSING: 1, INVALID_EMPTY: 2, INVALID_TRUNCATED: 1, INVALID_TOO_LONG: 1}
    assert (r.n_valid, r.n_invalid, r.abstain_reason) == (3, 5, None)
    with pytest.raises(ValueError, match="2 samples but 1 finish reasons"):
        select_medoid(["a", "b"], ["stop"])


def test_all_invalid_abstains_naming_the_counts():
    r = select_medoid([None, "", " ", "cut off"], [None, None, None, "length"])
    assert r.text is None and r.index is None and r.agreement is None
    assert r.abstain_reason == "no valid sample (1 missing, 2 empty, 1 truncated)"
    assert (r.n_valid, r.n_invalid) == (0, 4)


def test_single_valid_sample_has_no_agreement():
    r = select_medoid([None, "the only answer", ""])
    assert r.text == "the only answer" and r.index == 1
    assert r.agreement is None and r.abstain_reason is None
    assert (r.n_valid, r.n_invalid) == (1, 2)


def _long(rows):
    return pd.DataFrame(rows, columns=["item_id", "sample", "text", "finish_reason"])


def test_medoid_frame_keeps_every_item_and_counts_absent_samples():
    df = _long(
        [
            ("a", 2, "Quarterly revenue rose all year.", "stop"),
            ("b", 0, None, None),
            ("a", 0, "The cat sat on the mat all afternoon.", "stop"),
            ("b", 1, "", "stop"),
            ("c", 1, "only this one", "stop"),
            ("b", 2, "cut", "length"),
            ("a", 1, "A cat was sitting on the mat all afternoon.", "stop"),
            ("c", 0, "truncated", "length"),  # c has no sample 2: a request that left no row
        ]
    )
    out = medoid_frame(df, k=3)
    assert list(out["item_id"]) == ["a", "b", "c"]
    assert list(out.columns) == [
        "item_id",
        "text",
        "medoid_sample",
        "agreement",
        "n_valid",
        "n_invalid",
        "invalid_reasons",
        "abstain_reason",
    ]
    a, b, c = (out.iloc[i] for i in range(3))
    ref = select_medoid(
        [
            "The cat sat on the mat all afternoon.",
            "A cat was sitting on the mat all afternoon.",
            "Quarterly revenue rose all year.",
        ]
    )
    assert a["medoid_sample"] == ref.index and a["text"] == ref.text and a["agreement"] == pytest.approx(ref.agreement)
    assert b["text"] is None and b["medoid_sample"] is None and b["agreement"] is None
    assert b["abstain_reason"] == "no valid sample (1 missing, 1 empty, 1 truncated)"
    assert c["text"] == "only this one" and c["medoid_sample"] == 1 and c["agreement"] is None
    assert json.loads(c["invalid_reasons"]) == {"missing": 1, "truncated": 1}
    assert list(out["n_valid"] + out["n_invalid"]) == [3, 3, 3]

    st = medoid_stats(out)
    assert st["items"] == 3 and st["items_abstained"] == 1
    assert st["samples_invalid"] == 5
    assert (
        st["samples_invalid_missing"],
        st["samples_invalid_empty"],
        st["samples_invalid_truncated"],
        st["samples_invalid_too_long"],
    ) == (2, 1, 2, 0)
    assert st["items_with_agreement"] == 1 and st["mean_agreement"] == pytest.approx(ref.agreement)


def test_medoid_frame_rejects_duplicated_or_excess_samples_naming_the_item():
    dup = _long([("ok", 0, "x", "stop"), ("bad-7", 0, "x", "stop"), ("bad-7", 0, "y", "stop")])
    with pytest.raises(ValueError, match="'bad-7'.*sample index 0 more than once"):
        medoid_frame(dup, k=3)
    many = _long([("i9", s, "x", "stop") for s in range(3)])
    with pytest.raises(ValueError, match="'i9' has 3 samples, more than k=2"):
        medoid_frame(many, k=2)
    out_of_range = _long([("i3", 5, "x", "stop")])
    with pytest.raises(ValueError, match="'i3'.*outside 0..1"):
        medoid_frame(out_of_range, k=2)


RESTAURANT = [
    "The food was cold and the service was slow.",  # shares most words with 1, means the opposite
    "The food was delicious and the service was quick.",
    "Tasty meal, friendly and fast staff.",
    "We enjoyed a great dinner with prompt waiters.",
]


def test_embedding_picks_the_semantically_central_sample(minilm):
    r = select_medoid(RESTAURANT, method="embedding", embedder=minilm)
    # the three positive reviews agree in meaning; the negative one only in words
    assert r.index == 1
    emb = np.asarray(minilm.encode(RESTAURANT, normalize_embeddings=True), dtype=np.float64)
    assert r.agreement == pytest.approx(float((emb[[0, 2, 3]] @ emb[1]).mean()), abs=1e-6)
    sim = pairwise_similarity(RESTAURANT, method="embedding", embedder=minilm)
    means = (sim.sum(axis=1) - 1.0) / 3
    assert means[1] - means[0] > 0.05  # a margin, not float noise


def test_medoid_frame_embedding_encodes_once(minilm):
    calls = []

    class Counting:
        def encode(self, texts, normalize_embeddings=False):
            calls.append(list(texts))
            return minilm.encode(texts, normalize_embeddings=normalize_embeddings)

    rows = [("r", i, t, "stop") for i, t in enumerate(RESTAURANT)]
    rows += [
        ("s", 0, "The meeting moved to Friday.", "stop"),
        ("s", 1, "We meet on Friday now.", "stop"),
        ("s", 2, "The food was cold and the service was slow.", "stop"),  # same text as in item r
        ("t", 0, "alone", "stop"),
    ]  # one valid sample: nothing to encode
    out = medoid_frame(_long(rows), k=4, method="embedding", embedder=Counting())
    assert len(calls) == 1
    assert sorted(calls[0]) == sorted(set(RESTAURANT) | {"The meeting moved to Friday.", "We meet on Friday now."})
    assert list(out["medoid_sample"]) == [
        1,
        select_medoid([r[2] for r in rows[4:7]], method="embedding", embedder=minilm).index,
        0,
    ]
    # the same value as item by item, up to float32 noise from batching other texts alongside
    assert out.iloc[0]["agreement"] == pytest.approx(
        select_medoid(RESTAURANT, method="embedding", embedder=minilm).agreement, abs=1e-5
    )


def test_shards_keep_a_sentence_cut_after_and_score_invalid_singles_as_empty(tmp_path) -> None:
    """The medoid and the single-sample figure apply the same validity rules to the same samples."""
    import pandas as pd

    from tasks.generate.aggregate import medoid_shards
    from tasks.generate.evaluate import teacher_gold_scores

    ref = "The council approved a new bridge over the river."
    ann = pd.DataFrame(
        {
            "id": ["a"],
            "text": ["doc"],
            "label_gold": [ref],
            "answers": [
                [
                    " The council approved a new bridge. It will open in the spring and the",
                    " The council approved a new bridge over the river",
                    " The council approved a bridge.",
                ]
            ],
            "votes": [
                [
                    "The council approved a new bridge.",
                    "The council approved a new bridge over the river",
                    "The council approved a bridge.",
                ]
            ],
            "finish_reasons": [["length", "length", "stop"]],
        }
    )
    src = tmp_path / "ann.parquet"
    ann.to_parquet(src)
    [out] = medoid_shards([str(src)], str(tmp_path / "votes"), k=3, similarity="rougeL", max_words=40)
    voted = pd.read_parquet(out)
    assert list(voted["sample_valid"].iloc[0]) == [True, False, True]  # sample 1 was cut inside its sentence
    assert voted["n_valid_votes"].iloc[0] == 2
    scores = teacher_gold_scores([out], max_words=40)
    assert scores is not None
    by_sample = scores.teacher_bertscore_f1_single_by_sample
    assert by_sample[1] == 0.0 and by_sample[0] > 0.5 and by_sample[2] > 0.5
