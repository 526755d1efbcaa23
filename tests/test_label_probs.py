"""Label probabilities from an answer's log-probabilities: formats, shared prefixes, aliases."""

from __future__ import annotations

import math

import pytest

from tasks.teacher.label_probs import LabelMatcher, label_distribution, steps_from_logprobs
from tests.fake_openai import fake_logprobs

L = math.log


def completion(*steps: tuple[str, float, dict[str, float]]) -> dict:
    return {
        "tokens": [t for t, _, _ in steps],
        "token_logprobs": [lp for _, lp, _ in steps],
        "top_logprobs": [top for _, _, top in steps],
    }


def test_single_token_labels_in_both_formats():
    m = LabelMatcher(["positive", "negative"])
    for chat in (False, True):
        d = label_distribution(fake_logprobs(" positive", chat, 0.9), m)
        assert d is not None and d.probs == pytest.approx([0.9 / 0.98, 0.08 / 0.98])
        assert d.mass == pytest.approx(0.98) and not d.ambiguous


def test_labels_that_share_their_first_token_are_scored_on_their_continuations():
    # "very positive" and "very negative" share " very"; only the second token tells them apart
    m = LabelMatcher(["very positive", "very negative", "neutral"])
    lp = completion(
        (" very", L(0.7), {" very": L(0.7), " neutral": L(0.25), " ok": L(0.05)}),
        (" negative", L(0.6), {" negative": L(0.6), " positive": L(0.4)}),
    )
    d = label_distribution(lp, m)
    raw = [0.7 * 0.4, 0.7 * 0.6, 0.25]  # very positive, very negative, neutral
    assert d.probs == pytest.approx([x / sum(raw) for x in raw])
    assert d.mass == pytest.approx(sum(raw)) and not d.ambiguous
    # a first-token-only reading would give both "very ..." labels the same 0.7: wrong
    assert d.probs[0] != pytest.approx(d.probs[1])


def test_an_untaken_branch_that_starts_one_label_goes_to_it_several_labels_split_and_flagged():
    m = LabelMatcher(["positive", "negative", "neutral"])
    # tokens " pos"+"itive"; the untaken " neg" can only become "negative"; " ne" could be negative or neutral
    lp = completion((" pos", L(0.6), {" pos": L(0.6), " neg": L(0.3), " ne": L(0.1)}), ("itive", L(1.0), {}))
    d = label_distribution(lp, m)
    assert d.probs == pytest.approx([0.6, 0.3 + 0.05, 0.05]) and d.ambiguous


def test_aliases_count_for_their_label_and_case_and_quotes_do_not_matter():
    m = LabelMatcher(["positive", "negative"], {"pos": "positive", "neg": "negative"})
    lp = completion((' "Pos', L(0.5), {' "Pos': L(0.5), " positive": L(0.2), " NEG": L(0.3)}), ('"', L(1.0), {}))
    d = label_distribution(lp, m, "any_form")
    assert d.probs == pytest.approx([0.7, 0.3])


def test_answer_form_counts_only_spellings_that_begin_as_the_answer_did():
    """SmolLM2's case: 'positive' greedy, an off-format ' negative' (extra space) must not tip the label."""
    m = LabelMatcher(["positive", "negative"], {"pos": "positive", "neg": "negative"})
    lp = completion(
        (
            "positive",
            L(0.44),
            {"positive": L(0.44), "negative": L(0.41), " negative": L(0.10), " positive": L(0.02), "Neg": L(0.03)},
        )
    )
    any_form = label_distribution(lp, m, "any_form").probs
    assert any_form[0] < 0.5  # every spelling: the off-format mass flips the greedy answer
    d = label_distribution(lp, m)  # answer_form is the default
    assert d.probs == pytest.approx([0.44 / 0.88, 0.44 / 0.88]) and d.mass == pytest.approx(0.88)
    # an answer that began with a space and a quote counts only alternatives that begin so too
    lp = completion((' "', L(0.9), {' "': L(0.9), " negative": L(0.1)}), ("positive", L(0.8), {"negative": L(0.2)}))
    assert label_distribution(lp, m).probs == pytest.approx([0.72 / 0.9, 0.18 / 0.9])
    with pytest.raises(ValueError, match="forms"):
        label_distribution(lp, m, "every")


def test_an_answer_off_the_label_set_keeps_only_the_labels_mass_and_whitespace_is_left_out():
    m = LabelMatcher(["positive", "negative"])
    lp = completion((" banana", L(0.5), {" banana": L(0.5), " positive": L(0.3), " negative": L(0.1), " ": L(0.1)}))
    d = label_distribution(lp, m)
    assert d.probs == pytest.approx([0.75, 0.25]) and d.mass == pytest.approx(0.4)
    # "positively" is not the label "positive": only non-letters may follow a label
    lp = completion((" positively", L(0.9), {" positively": L(0.9), " negative": L(0.1)}))
    assert label_distribution(lp, m).probs == pytest.approx([0.0, 1.0])


def test_no_usable_logprobs_gives_none():
    m = LabelMatcher(["positive", "negative"])
    assert label_distribution(None, m) is None
    assert label_distribution({"tokens": []}, m) is None
    assert label_distribution(completion((" maybe", L(1.0), {" maybe": L(1.0)})), m) is None
    assert steps_from_logprobs({"content": [{"token": "x"}]}) is None  # no logprob: not a usable step
