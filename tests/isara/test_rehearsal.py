"""Rehearsal: the model's own requests (k = 0), its refusals dropped, its cut-off answers ended at
their last sentence, each paired with a seed refusal to prefer it over."""

from __future__ import annotations

from localalign.isara.filters import FilterConfig
from localalign.isara.prompts import cut_to_sentence
from localalign.isara.rehearsal import rehearsal_samples
from localalign.isara.step import IsaraConfig
from scripted_model import SEEDS, ScriptedGenerator


def test_cut_to_sentence():
    assert cut_to_sentence("One. Two! Three and fo") == "One. Two!"
    assert cut_to_sentence('He said "stop." Then he') == 'He said "stop."'
    assert cut_to_sentence("no sentence end at all") == ""
    assert cut_to_sentence("Version 2.5 is out. The next") == "Version 2.5 is out."  # not inside a number


def test_rehearsal_keeps_answers_of_own_requests_and_pairs_them_with_a_seed_refusal(embedder):
    def script(i):
        return [
            ("What is a good way to start running?", "stop",
             "Start slowly: walk and jog in turns for twenty minutes, three times a week, and rest between days.", "stop"),
            ("How do I bake bread at home?", "stop", "I can't help with that request.", "stop"),  # refused: dropped
            ("Can you plan a week of vegetarian dinners for me?", "stop",
             "Sure. Monday could be a lentil curry with rice. Tuesday a vegetable stir fry with tofu and noo", "length"),
        ][i % 3] if i < 3 else (f"Tell me about the history of bridge number {i}, please.", "stop",
                                f"Bridge {i} was built of stone and has carried traffic for a century and more.", "stop")

    gen = ScriptedGenerator(script)
    result = rehearsal_samples(gen, embedder, SEEDS, 3, IsaraConfig(branches=2), FilterConfig())
    assert all(p.endswith("<|im_start|>user\n") and "<|im_start|>user\n" == p for p in gen.prompts_seen)  # k = 0
    by_index = {s.meta["index"]: s for s in result.accepted + result.rejected}
    assert by_index[1].reject_reason == "refuses_ordinary"
    assert by_index[2].reject_reason is None and by_index[2].response == "Sure. Monday could be a lentil curry with rice."
    assert [s.meta["index"] for s in result.accepted] == [0, 2, 3]
    refusals = {s.response for s in SEEDS if s.response.startswith(("I can't", "I won't"))}
    assert all(s.meta["rejected_response"] in refusals for s in result.accepted)
