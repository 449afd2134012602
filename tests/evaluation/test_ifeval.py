"""IFEval offline: the 541 prompts, the upstream checks on known-good and known-bad replies,
repeatable scores, no network and no `datasets`."""

from __future__ import annotations

import random
import socket
import sys

import pytest

from localalign.evaluation.suites.ifeval import IFEVAL_SIZE, IFEvalItem, ensure_punkt_tab, load_ifeval, score_ifeval


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("IFEval scoring tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def item(instruction: str, kwargs: dict | None = None, prompt: str = "Write something.") -> IFEvalItem:
    return IFEvalItem(key=1, prompt=prompt, instruction_ids=(instruction,), kwargs=(kwargs or {},))


def test_all_prompts_load_without_datasets():
    items = load_ifeval()
    assert len(items) == IFEVAL_SIZE == 541
    assert len({it.key for it in items}) == 541
    assert "datasets" not in sys.modules  # if_verifiable's hub loader was never imported


CASES = [
    # (instruction, kwargs, known-good reply, known-bad reply)
    ("punctuation:no_comma", {}, "No commas appear in this reply at all.", "Well, this one has a comma."),
    ("change_case:english_lowercase", {}, "this reply is written entirely in lowercase english words.", "This Reply Has Capitals."),
    ("change_case:english_capital", {}, "THIS REPLY IS WRITTEN ENTIRELY IN CAPITAL LETTERS AND IN ENGLISH.", "This is not in capitals."),
    # Punkt knows "Dr." and "Mr." are abbreviations: 2 sentences, where a naive split on ". " finds 4.
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith went to Washington. He met Mr. Jones there.", "One. Two. Three. Four."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 10},
     "one two three four five six seven eight nine ten eleven", "too short"),
    ("detectable_format:json_format", {}, '{"animal": "cow", "sound": "moo"}', "cow: moo"),
    ("startend:quotation", {}, '"Everything is quoted."', "Nothing is quoted."),
    ("detectable_format:title", {}, "<<A Poem>>\nRoses are red.", "A Poem\nRoses are red."),
    ("keywords:existence", {"keywords": ["banana", "river"]}, "A banana floated down the river.", "An apple floated away."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", "* only one"),
    ("language:response_language", {"language": "de"},
     "Das Wetter ist heute sehr schön und wir gehen in den Park spazieren.",
     "The weather is very nice today and we are going for a walk in the park."),
]


@pytest.mark.parametrize("instruction,kwargs,good,bad", CASES, ids=[c[0] for c in CASES])
def test_known_good_and_bad_replies(instruction, kwargs, good, bad):
    it = item(instruction, kwargs)
    assert score_ifeval(it, good).strict == [True]
    assert score_ifeval(it, bad).strict == [False]
    assert score_ifeval(it, bad).loose == [False]


def test_loose_forgives_a_chatty_first_line():
    it = item("change_case:english_lowercase")
    score = score_ifeval(it, "Sure, here it is:\nthis text is all lowercase and in english.")
    assert score.strict == [False] and score.loose == [True]


def test_empty_reply_fails_every_instruction():
    it = IFEvalItem(7, "p", ("punctuation:no_comma", "startend:quotation"), ({}, {}))
    score = score_ifeval(it, "   ")
    assert score.strict == [False, False] and score.loose == [False, False]
    assert not score.prompt_strict


def test_a_real_prompt_with_a_known_good_reply():
    first = load_ifeval()[0]  # 300+ words, no commas, at least 3 *highlighted* sections
    assert first.instruction_ids == ("punctuation:no_comma", "detectable_format:number_highlighted_sections", "length_constraints:number_words")
    body = " ".join(["Raymond was a count who ruled Tripoli"] * 45)
    good = f"*Early life* {body}\n*Regency* {body}\n*Hattin* {body}"
    assert score_ifeval(first, good).prompt_strict
    assert not score_ifeval(first, good.replace("Tripoli", "Tripoli,")).prompt_strict


def test_random_arguments_are_seeded_per_sample():
    # Key 1122 asks for the letter "#", which the check rejects and replaces by a random letter.
    it = next(i for i in load_ifeval() if i.key == 1122)
    # Passes if the drawn letter is one of a..m (each appears 4 times), fails for n..z: an
    # unseeded check would give both answers over ten draws with probability 0.998.
    letter_counts = " ".join(c * 4 for c in "abcdefghijklm") + " ####"
    scores = set()
    for n in range(10):
        random.seed(n)  # whatever state the caller left
        scores.add(tuple(score_ifeval(it, letter_counts).strict))
    assert len(scores) == 1
    # and the caller's random state is left as it was
    random.seed(123)
    expected = random.random()
    random.seed(123)
    score_ifeval(it, letter_counts)
    assert random.random() == expected


def test_language_detection_is_repeatable():
    from langdetect import DetectorFactory, detect

    ambiguous = "hello hello"  # unseeded, langdetect calls this fi, cy, it or nl at random (fi ~37%)
    DetectorFactory.seed = None
    assert len({detect(ambiguous) for _ in range(40)}) > 1
    it = item("language:response_language", {"language": "fi"})
    assert len({tuple(score_ifeval(it, ambiguous).strict) for _ in range(20)}) == 1


def test_punkt_tab_written_from_the_package(tmp_path):
    import nltk
    import punkt
    from nltk.tokenize import PunktTokenizer

    root = ensure_punkt_tab(tmp_path)
    assert (root / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file()
    text = "Dr. Smith paid $5.50 at 3 p.m. on Jan. 5. Then he left! Did Mr. J. R. Bach follow? Yes."
    old = list(nltk.data.path)
    try:
        nltk.data.path[:] = [str(root)]
        ours = PunktTokenizer("english").tokenize(text)
    finally:
        nltk.data.path[:] = old
    assert ours == punkt.sent_tokenize(text)
    assert len(ours) >= 3
