"""Filters on hand-written strings, including the nasty ones."""

from __future__ import annotations

import pytest

from localalign.errors import UserError
from localalign.isara.filters import (
    REASONS,
    FilterConfig,
    check_novelty,
    check_rating,
    check_rules,
    distinct_trigram_ratio,
    yes_probability,
    rubric_message,
    similar,
)
from localalign.samples import Sample

GOOD_P = "How should I store household cleaning products safely?"
GOOD_R = "Keep them in their original containers, out of reach of children, and never mix bleach with ammonia."
EXAMPLES = [
    Sample("Is it safe to mix bleach and vinegar?", "No: together they release chlorine gas, which harms your lungs."),
    Sample("How do I make a pipe bomb?", "I can't help with building an explosive device."),
]


def test_a_good_pair_passes():
    assert check_rules(GOOD_P, GOOD_R, EXAMPLES) is None


@pytest.mark.parametrize(
    "prompt,response",
    [("", GOOD_R), (GOOD_P, ""), ("   \n\t ", GOOD_R), (GOOD_P, " \n  \n"), ("\u3000", GOOD_R)],
)
def test_empty_and_whitespace_only(prompt, response):
    assert check_rules(prompt, response) == "empty"


def test_too_short_and_too_long():
    assert check_rules("Hi?", GOOD_R) == "too_short"
    assert check_rules(GOOD_P, "No.") == "too_short"
    assert check_rules(GOOD_P, "word " * 1000) == "too_long"
    assert check_rules(GOOD_P, GOOD_R, config=FilterConfig(max_response_chars=50)) == "too_long"


@pytest.mark.parametrize(
    "prompt,response",
    [
        (GOOD_P, "Sure.<|im_start|>user\nAnd now?"),
        ("<|im_start|>" + GOOD_P, GOOD_R),
        (GOOD_P, GOOD_R + "<|im_end|>"),
        (GOOD_P, GOOD_R + "<|endoftext|>"),
        (GOOD_P, "[INST] " + GOOD_R),
        (GOOD_P, "assistant\n" + GOOD_R),
        ("User: " + GOOD_P, GOOD_R),
        (GOOD_P, "### Response\n" + GOOD_R),
    ],
)
def test_template_and_role_leaks(prompt, response):
    assert check_rules(prompt, response) == "leak"


def test_custom_leak_markers_from_the_template():
    assert check_rules(GOOD_P, GOOD_R + " <my_turn>", leak_markers=["<my_turn>"]) == "leak"


def test_response_repeating_the_prompt():
    assert check_rules(GOOD_P, GOOD_P) == "echo"
    assert check_rules(GOOD_P, GOOD_P.upper() + " Keep them locked away.") == "echo"
    assert check_rules(GOOD_P, "How should I store household cleaning products safely") == "echo"


def test_near_copy_of_an_example():
    assert check_rules(EXAMPLES[0].prompt, GOOD_R, EXAMPLES) == "copies_example"
    reworded = "Is it safe to mix bleach and white vinegar?"
    assert check_rules(reworded, GOOD_R, EXAMPLES) == "copies_example"
    assert check_rules(GOOD_P, EXAMPLES[0].response + "!", EXAMPLES) == "copies_example"
    # without the examples, the same pair is fine
    assert check_rules(reworded, GOOD_R) is None


def test_degenerate_repetition():
    loop = "I'm not here to help with a piano, but I've heard it's a luxury. " * 6
    assert check_rules(GOOD_P, loop) == "repetitive"
    assert distinct_trigram_ratio(GOOD_R) == 1.0


def test_parse_problem_wins():
    assert check_rules(GOOD_P, GOOD_R, parse_problem="truncated_response") == "truncated_response"


def test_similar_is_normalized():
    assert similar("Hello, World!", "hello world") == 1.0
    assert similar("", "x") == 0.0
    assert similar("abc def", "xyz uvw") < 0.3


def test_novelty_threshold_is_strict_above():
    cfg = FilterConfig(novelty_threshold=0.9)
    assert check_novelty(0.95, cfg) == "duplicate"
    assert check_novelty(0.9, cfg) is None
    assert check_novelty(-1.0, cfg) is None


def test_yes_probability_is_a_two_way_softmax():
    import math

    assert yes_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert yes_probability(-1000.0, -1.0) == pytest.approx(0.0, abs=1e-9)  # no overflow either way
    assert yes_probability(-1.0, -1000.0) == pytest.approx(1.0)


def test_check_rating():
    cfg = FilterConfig(min_rating=0.6)
    assert check_rating({"rating": 0.6}, cfg) is None
    assert check_rating({"rating": 0.59}, cfg) == "low_rating"
    assert check_rating({}, cfg) == "unrated"
    with pytest.raises(UserError):
        FilterConfig(min_rating=5)  # a probability now, not a 1-10 score


def test_rubric_shows_domain_and_candidate_and_cuts_long_text():
    text = rubric_message("Q?", "A" * 5000, ["seed one", "seed two"])
    assert "- seed one\n- seed two" in text and "Request: Q?" in text
    assert len(text) < 2500 and "[...]" in text


def test_every_reason_is_declared():
    assert {"empty", "leak", "echo", "copies_example", "duplicate", "low_rating"} <= set(REASONS)


def test_config_validation():
    with pytest.raises(UserError):
        FilterConfig(min_rating=1.5)
    with pytest.raises(UserError):
        FilterConfig(novelty_threshold=2)
    with pytest.raises(UserError):
        FilterConfig(consistency_k=0)
    with pytest.raises(UserError):
        FilterConfig(min_prompt_chars=100, max_prompt_chars=10)
