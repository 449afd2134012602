"""The constraint checker agrees with the reference in tests/test_seeds.py; requests state constraints it can read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localalign.errors import UserError
from localalign.judges.constraints import CONSTRAINT_FIELDS, check_constraint, constraints_in_prompt, validate_constraint
from test_seeds import CONSTRAINT_FIELDS as REFERENCE_FIELDS
from test_seeds import check_constraint as reference_check


def seed_pairs(seeds_dir):
    pairs = []
    for name in ("instruction-following.jsonl", "instruction-following.heldout.jsonl"):
        for line in (seeds_dir / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            pairs += [(row.get("response", ""), c) for c in row["constraints"]]
    return pairs


def test_same_constraint_types_as_reference():
    assert CONSTRAINT_FIELDS == REFERENCE_FIELDS


def test_every_seed_response_passes_its_constraints(seeds_dir):
    for line in (seeds_dir / "instruction-following.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for c in row["constraints"]:
            assert check_constraint(row["response"], validate_constraint(c)), (row["prompt"], c)


# Replies built from the characters the rules look at: words, bullets, blank lines,
# fences, quotes, commas, titles, case.
PIECES = ["word", "Word", "WORD", " ", "\n", "\n\n", "- ", "* ", ",", '"', "<<Title>>", "```json\n", "\n```",
          "{\"a\": 1}", "[1, 2]", "end.", "Start", "wave", "Waves", "\t", "  \n  \n"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=25).map("".join))
def test_agrees_with_reference_on_generated_replies(reply):
    constraints = [
        {"type": "max_words", "n": 5}, {"type": "min_words", "n": 3}, {"type": "bullet_count", "n": 2},
        {"type": "lowercase"}, {"type": "uppercase"}, {"type": "json"}, {"type": "ends_with", "text": "end."},
        {"type": "starts_with", "text": "Start"}, {"type": "contains", "text": "wave", "n": 2},
        {"type": "no_commas"}, {"type": "paragraphs", "n": 2}, {"type": "quoted"}, {"type": "title"},
    ]
    for c in constraints:
        assert check_constraint(reply, c) == reference_check(reply, c), (reply, c)


def test_agrees_with_reference_on_seed_texts(seeds_dir):
    pairs = seed_pairs(seeds_dir)
    texts = {r for r, _ in pairs if r} | {"", "   ", "```json\n{\"x\": 1}\n```", '"quoted"', "<<  >>"}
    for text in texts:
        for _, c in pairs:
            assert check_constraint(text, c) == reference_check(text, c), (text[:60], c)


def test_known_good_and_bad():
    assert check_constraint("- a\n- b\nnot a bullet", {"type": "bullet_count", "n": 2})
    assert not check_constraint("- a\n- b\n- c", {"type": "bullet_count", "n": 2})
    assert check_constraint("```json\n{\"a\": 1}\n```", {"type": "json"})
    assert not check_constraint("Here is JSON: {\"a\": 1}", {"type": "json"})
    assert check_constraint("one\n\n  \n\ntwo", {"type": "paragraphs", "n": 2})
    assert check_constraint("Waves and waves", {"type": "contains", "text": "wave", "n": 2})


@pytest.mark.parametrize(
    "bad",
    [{"type": "nope"}, {"type": "max_words"}, {"type": "max_words", "n": 0}, {"type": "max_words", "n": True},
     {"type": "contains", "text": "", "n": 1}, {"type": "lowercase", "n": 1}, "lowercase"],
)
def test_validate_rejects_bad_constraints(bad):
    with pytest.raises(UserError):
        validate_constraint(bad, "x.jsonl:1")


def _key(constraints: list[dict]) -> list[str]:
    return sorted(json.dumps(c, sort_keys=True) for c in constraints)


@pytest.mark.parametrize("name", ["instruction-following.jsonl", "instruction-following.heldout.jsonl"])
def test_constraints_in_prompt_read_what_every_shipped_prompt_states(seeds_dir, name):
    """Every shipped prompt states its constraints in words; the reader finds exactly those."""
    wrong = []
    for line in (seeds_dir / name).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if _key(constraints_in_prompt(row["prompt"])) != _key(row["constraints"]):
            wrong.append(row["prompt"])
    assert not wrong, wrong


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("Tell me about cats in no more than 30 words.", [{"type": "max_words", "n": 30}]),  # not min_words 31
        ("Write more than 40 words about dogs.", [{"type": "min_words", "n": 41}]),
        ("List 3 fruits as bullet points that start with \"- \".", [{"type": "bullet_count", "n": 3}]),
        ("Use the word \"tea\" twice in a short poem.", []),  # a phrasing the reader does not know: nothing, not a guess
        ("Use the word \"tea\" at least twice in a short poem.", [{"type": "contains", "text": "tea", "n": 2}]),
        ("What is the capital of France?", []),
    ],
)
def test_constraints_in_prompt_cases(prompt, expected):
    assert _key(constraints_in_prompt(prompt)) == _key(expected)
