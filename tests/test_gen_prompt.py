"""Generation templates: k distinct teacher prompts, a zero-shot student input, cut documents, strict fields."""

from pathlib import Path

import pytest

from tasks.gen_prompt import cut_words, generation_template_from, load_generation_prompt
from tasks.prompting import PromptError


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


@pytest.mark.parametrize("raw, named", [
    ({"name": "x", "instruction": "y"}, "'max_words' is required"),
    ({"name": "x", "instruction": "y", "max_words": 3, "examples": [{"text": "t", "label": "l"}]}, "examples[0]"),
    ({"name": "x", "instruction": "y", "max_words": 3, "examples": [{"text": "t", "output": "one two three four"}]},
     "examples[0].output"),
    ({"name": "x", "instruction": "y", "max_words": 3, "labels": ["a", "b"]}, "unknown field(s) ['labels']"),
])
def test_a_bad_generation_template_is_an_error_naming_the_field(raw, named) -> None:
    with pytest.raises(PromptError, match=pytest.importorskip("re").escape(named)):
        generation_template_from({"task": "generate", **raw}, Path("p.yaml"))
