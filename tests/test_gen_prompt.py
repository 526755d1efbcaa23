"""Generation templates: k distinct teacher prompts, a zero-shot student input, cut documents, strict fields."""

from pathlib import Path

import pytest

from tasks.templates.base import PromptError
from tasks.templates.generation import (
    cut_words,
    effective_finish_reason,
    first_sentences,
    generation_template_from,
    load_generation_prompt,
)


def test_the_xsum_template_gives_k_distinct_prompts_and_a_zero_shot_student_input() -> None:
    t = load_generation_prompt("prompts/summary_xsum.yaml")
    doc = "word " * 500
    prompts = {t.render_completion(doc, i, vary=True) for i in range(3)}
    assert len(prompts) == 3
    student = t.student_instruction(doc)
    assert "Summary:" not in student and all(ex.text[:40] not in student for ex in t.examples)
    assert len(student.split()) <= t.max_input_words + len(t.student_instruction_text.split())
    assert t.parse("  The bridge opens.\nMore text") == "The bridge opens."
    assert t.parse("   \n ") is None and t.parse(None) is None


def test_cut_words_counts_what_it_cut() -> None:
    assert cut_words("a b\nc", 5) == ("a b c", False)
    assert cut_words("a b c d", 2) == ("a b", True)


@pytest.mark.parametrize(
    "raw, named",
    [
        ({"name": "x", "instruction": "y"}, "'max_words' is required"),
        ({"name": "x", "instruction": "y", "max_words": 3, "examples": [{"text": "t", "label": "l"}]}, "examples[0]"),
        (
            {
                "name": "x",
                "instruction": "y",
                "max_words": 3,
                "examples": [{"text": "t", "output": "one two three four"}],
            },
            "examples[0].output",
        ),
        ({"name": "x", "instruction": "y", "max_words": 3, "labels": ["a", "b"]}, "unknown field(s) ['labels']"),
        (
            {"name": "x", "instruction": "y", "max_words": 3, "max_sentences": 0},
            "'max_sentences' must be a positive integer",
        ),
        ({"name": "x", "instruction": "y", "max_words": "3"}, "'max_words' must be a positive integer"),
    ],
)
def test_a_bad_generation_template_is_an_error_naming_the_field(raw, named) -> None:
    with pytest.raises(PromptError, match=pytest.importorskip("re").escape(named)):
        generation_template_from({"task": "generate", **raw}, Path("p.yaml"))


def test_first_sentences_ends_at_a_sentence_end_not_at_every_full_stop() -> None:
    assert first_sentences("A new 1.5m bridge opens. The council said so.", 1) == "A new 1.5m bridge opens."
    assert first_sentences('He said "It is over." Then he left. Later.', 1) == 'He said "It is over."'
    assert first_sentences("One. Two. Three.", 2) == "One. Two."
    assert first_sentences("No end in sight", 1) == "No end in sight"
    assert first_sentences("One. Two.", None) == "One. Two."


def test_a_cut_after_the_kept_sentence_is_not_a_truncated_sample() -> None:
    """SmolLM2 wrote the one sentence asked for and went on until max_tokens: 87 of 360 demo samples."""
    t = generation_template_from(
        {"task": "generate", "name": "x", "instruction": "y", "max_words": 40, "max_sentences": 1}, Path("p.yaml")
    )
    answer = " A woman has died on a cruise ship. She was 24 years old and the ship's captain said he"
    kept = t.parse(answer)
    assert kept == "A woman has died on a cruise ship."
    assert effective_finish_reason(answer, kept, "length") == "stop"
    cut_inside = " A woman has died on a cruise ship in the"
    assert effective_finish_reason(cut_inside, t.parse(cut_inside), "length") == "length"
    assert effective_finish_reason(answer, kept, "stop") == "stop"
    assert effective_finish_reason(None, None, "length") == "length"
