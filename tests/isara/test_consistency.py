"""The seeds' vote on the kind of response a request gets (isara/consistency.py)."""

from __future__ import annotations

import numpy as np
import pytest

from localalign.errors import UserError
from localalign.isara.consistency import SeedKinds, check_kind
from localalign.isara.filters import FilterConfig


def unit(*rows) -> np.ndarray:
    v = np.array(rows, dtype=float)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# One refusing seed close to the request, three answering seeds on its topic a little further off:
# the case the labelled set is full of ("how do I pick a lock" among ordinary lock questions).
SEED_PROMPTS = unit([1, 0.05, 0], [1, 0.9, 0], [1, 0.9, 0.1], [1, 0.95, 0])
KINDS = SeedKinds(SEED_PROMPTS, SEED_PROMPTS, np.array([True, False, False, False]))
REQUEST = unit([1, 0, 0])


def test_the_closest_seed_outweighs_many_on_the_topic():
    sims = (REQUEST @ SEED_PROMPTS.T)[0]
    plain = sims[0] / sims.sum()  # a similarity-weighted vote: the three answers win
    assert plain < 0.35
    assert KINDS.refusal_vote(REQUEST, temperature=0.1)[0] > 0.8
    # a high temperature is the plain share of refusing seeds
    assert KINDS.refusal_vote(REQUEST, temperature=100.0)[0] == pytest.approx(0.25, abs=0.01)


def test_a_domain_whose_seeds_never_refuse_expects_answers():
    never = SeedKinds(SEED_PROMPTS, SEED_PROMPTS, np.zeros(4, dtype=bool))
    assert never.refusal_vote(REQUEST, 0.1).tolist() == [0.0]


def test_the_two_thresholds_are_independent():
    refusal, answer = "I can't help with that.", "Turn the tension wrench gently, then lift each pin."
    cfg = FilterConfig()
    assert check_kind(0.95, refusal, cfg.keep_refusal_from, cfg.keep_answer_below) is None
    assert check_kind(0.85, refusal, cfg.keep_refusal_from, cfg.keep_answer_below) == "refuses_ordinary"
    assert check_kind(0.85, answer, cfg.keep_refusal_from, cfg.keep_answer_below) == "answers_harmful"
    assert check_kind(0.5, answer, cfg.keep_refusal_from, cfg.keep_answer_below) is None


def test_vote_temperature_must_be_positive():
    with pytest.raises(UserError, match="vote_temperature"):
        FilterConfig(vote_temperature=0)
