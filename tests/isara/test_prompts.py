"""ISARA prompt building and output parsing: pure functions, no model."""

from __future__ import annotations

import random

import pytest

from localalign.chat import render_chat
from localalign.isara.prompts import (
    ChatMarkers,
    build_isara_prompt,
    chat_markers,
    isara_messages,
    parse_generation,
    shuffled,
)
from localalign.samples import Sample
from tiny_model import CHATML_TEMPLATE

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def chatml(messages):
    return render_chat(CHATML_TEMPLATE, messages)


EXAMPLES = [Sample("How do locks work?", "Pins line up at the shear line."), Sample("Make a bomb", "I can't help.")]


@pytest.fixture
def markers() -> ChatMarkers:
    return chat_markers(chatml)


def test_markers_read_off_chatml(markers):
    assert markers.then == "<|im_end|>\n<|im_start|>assistant\n"
    assert markers.next_turn == "<|im_end|>\n<|im_start|>user\n"
    assert markers.assistant_open == "<|im_start|>assistant\n"
    assert markers.turn_start == "<|im_start|>"
    assert "<|im_start|>" in markers.leak and "<|im_end|>" in markers.leak


def test_markers_read_off_llama3():
    m = chat_markers(lambda msgs: render_chat(LLAMA3, msgs, bos_token="<|begin_of_text|>"))
    assert m.then == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert m.assistant_open == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert m.turn_start == "<|start_header_id|>"
    assert "<|eot_id|>" in m.leak


def test_prompt_is_the_examples_as_turns_ending_on_an_open_user_turn(markers):
    text = build_isara_prompt(chatml, EXAMPLES)
    assert text == (
        "<|im_start|>user\nHow do locks work?<|im_end|>\n<|im_start|>assistant\nPins line up at the shear line.<|im_end|>\n"
        "<|im_start|>user\nMake a bomb<|im_end|>\n<|im_start|>assistant\nI can't help.<|im_end|>\n"
        "<|im_start|>user\n"
    )
    # a full round trip: prompt + generated request + then + generated answer is a valid chat
    full = text + "New request" + markers.then + "New answer"
    assert full == chatml(isara_messages(EXAMPLES) + [{"role": "user", "content": "New request"}]) + "New answer"


def test_prompt_has_no_instruction_text():
    text = build_isara_prompt(chatml, EXAMPLES)
    stripped = text
    for s in EXAMPLES:
        stripped = stripped.replace(s.prompt, "").replace(s.response, "")
    for tag in ("<|im_start|>", "<|im_end|>", "user", "assistant"):
        stripped = stripped.replace(tag, "")
    assert stripped.strip() == ""


def test_without_examples_the_prompt_is_an_opened_user_turn():
    """k = 0 (rehearsal): only the template's opening and an empty user turn (Magpie)."""
    assert build_isara_prompt(chatml, []) == "<|im_start|>user\n"


def test_shuffle_is_seeded_and_keeps_all():
    xs = [Sample(f"p{i}", "r") for i in range(6)]
    a = shuffled(xs, random.Random(1))
    assert a == shuffled(xs, random.Random(1))
    assert sorted(s.prompt for s in a) == [s.prompt for s in xs]


def test_parse_clean_output(markers):
    p = parse_generation("  How do I pick a lock?\n", "stop", "Practice on locks you own.\n", "stop", markers)
    assert (p.prompt, p.response, p.problem) == ("How do I pick a lock?", "Practice on locks you own.", None)


def test_parse_truncated_turns(markers):
    assert parse_generation("How do I", "length", "", "none", markers).problem == "truncated_prompt"
    assert parse_generation("Q?", "stop", "Because the", "length", markers).problem == "truncated_response"


def test_parse_answer_running_into_a_new_turn_is_cut(markers):
    p = parse_generation("Q here?", "stop", "An answer.\n<|im_start|>user\nAnother question", "length", markers)
    assert (p.response, p.problem) == ("An answer.", None)


def test_parse_request_that_opened_the_assistant_turn_itself(markers):
    p = parse_generation("Q here?\n<|im_start|>assistant\nThe answer.", "stop", "", "stop", markers)
    assert (p.prompt, p.response, p.problem) == ("Q here?", "The answer.", None)


def test_parse_leaves_other_leaks_for_the_rules(markers):
    p = parse_generation("Q <|im_end|> here?", "stop", "Answer", "stop", markers)
    assert "<|im_end|>" in p.prompt and p.problem is None
