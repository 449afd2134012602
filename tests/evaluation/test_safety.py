"""The safety suite: refusal rate on the harmful held-out prompts, and helpfulness on the benign
ones by the judge's verdict, so that an empty or looping reply to a benign request is not help."""

from __future__ import annotations

from localalign.evaluation.run import SUITES
from localalign.evaluation.session import EvalSession
from localalign.paths import SEEDS_DIR
from localalign.samples import iter_jsonl
from scripted_model import ANSWER, REFUSAL, ScriptedReplies

HARMFUL = {row["prompt"] for _, row in iter_jsonl(SEEDS_DIR / "safety.heldout.jsonl") if row["kind"] == "harmful"}
LOOP = "It's a plague of the dead, a plague of the dead. " * 10


def score(reply):
    return SUITES["safety"](EvalSession(ScriptedReplies(reply), SEEDS_DIR, max_tokens=512, refusal_max_tokens=80), None)


def test_a_model_that_refuses_the_harmful_and_answers_the_benign_scores_1_and_1():
    result = score(lambda prompt: REFUSAL if prompt in HARMFUL else ANSWER)
    assert result.metrics["harmful_refusal_rate"]["value"] == 1.0
    assert result.metrics["benign_helpfulness_rate"]["value"] == 1.0
    assert {it["verdict"] for it in result.items} == {"refuses", "complies"}


def test_a_loop_or_an_empty_reply_to_a_benign_request_is_not_help():
    for benign_reply, kind in ((LOOP, "degenerate"), ("", "degenerate")):
        result = score(lambda prompt: REFUSAL if prompt in HARMFUL else benign_reply)
        record = result.metrics["benign_helpfulness_rate"]
        assert (record["k"], record["n"]) == (0, 20)
        assert {it["verdict"] for it in result.items if it["prompt"] not in HARMFUL} == {kind}
        assert result.metrics["harmful_refusal_rate"]["value"] == 1.0
    # the refusal detector alone would have called the loop helpful: it does not refuse
    assert not any(it["refused"] for it in score(lambda prompt: LOOP).items)


def test_a_loop_to_a_harmful_request_is_not_a_refusal_but_an_empty_reply_is():
    loops = score(lambda prompt: LOOP if prompt in HARMFUL else ANSWER).metrics["harmful_refusal_rate"]
    empty = score(lambda prompt: "" if prompt in HARMFUL else ANSWER).metrics["harmful_refusal_rate"]
    assert loops["k"] == 0 and empty["value"] == 1.0  # an empty reply gives nothing, as is_refusal has always counted it



def test_the_safety_suite_reads_the_whole_budget_for_its_helpfulness_score():
    # Not stopped at a blank line: a loop after the first paragraph is not help.
    gen = ScriptedReplies(lambda prompt: REFUSAL if prompt in HARMFUL else ANSWER + "\n\n" + LOOP)
    result = SUITES["safety"](EvalSession(gen, SEEDS_DIR, max_tokens=512, refusal_max_tokens=80), None)
    assert gen.stops == [()] and gen.max_tokens == [80]
    assert result.metrics["benign_helpfulness_rate"]["k"] == 0
