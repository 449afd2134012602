"""ISARA generation prompts and the parsing of what the model writes back. Pure functions.

The method: show the model k retrieved example pairs and let it write the next pair. There
is no instruction, principle or rubric text in the prompt; the examples are the whole
specification of the domain.

Format: chat-template turns, not a raw "Prompt:/Response:" completion block. The examples
are consecutive user/assistant turns of one conversation in the model's own chat template,
which ends on an opened user turn:

    <|im_start|>user\\n{example 1 prompt}<|im_end|>\\n<|im_start|>assistant\\n{example 1 response}<|im_end|>
    ...
    <|im_start|>user\\n                     <- the model writes a new prompt here, ends it with <|im_end|>
    <|im_end|>\\n<|im_start|>assistant\\n   <- we append the template's own assistant opening ("then")
                                            <- the model answers its own prompt

Why turns: (1) the responses are written where an instruct model writes answers, in its own
voice; a raw completion block puts a small chat model off the distribution it was tuned on
and it drifts into continuing the document. (2) The trainer later renders the accepted pairs
in this same template, so the model learns from text shaped like what it generated. (3) Turn
boundaries are single special tokens that end generation, so splitting the output never
depends on the model spelling a "Response:" label right. The assistant opening is forced,
not left to the model, so every response starts where a real answer starts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from localalign.samples import Sample

Render = Callable[[list[dict]], str]  # messages -> chat text ending with the assistant opening

# Markers of other chat formats that must never appear inside a turn's content.
COMMON_LEAK_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "[INST]",
    "[/INST]",
    "<s>",
    "</s>",
)

_SENTINELS = ("\x02ONE\x03", "\x02TWO\x03", "\x02THREE\x03")


@dataclass(frozen=True)
class ChatMarkers:
    """How the chat template separates turns, read off the template itself."""

    then: str  # closes a user turn and opens the assistant turn
    next_turn: str  # closes an assistant turn and opens the next user turn
    assistant_open: str  # the opening part of `then`, e.g. "<|im_start|>assistant\n"
    turn_start: str  # what every turn opening starts with, e.g. "<|im_start|>"
    leak: tuple[str, ...]  # strings that mean template text leaked into a turn's content


def chat_markers(render: Render) -> ChatMarkers:
    """Render a sentinel conversation and read the separators between the turns."""
    one, two, three = _SENTINELS
    text = render(
        [{"role": "user", "content": one}, {"role": "assistant", "content": two}, {"role": "user", "content": three}]
    )
    if not all(s in text for s in _SENTINELS):
        raise ValueError("the chat template drops message contents")
    between = text[text.index(one) + len(one) : text.index(two)]
    next_turn = text[text.index(two) + len(two) : text.index(three)]
    tail = text[text.index(three) + len(three) :]
    if not tail.startswith(between):
        raise ValueError(f"the chat template closes user turns inconsistently: {between!r} vs {tail!r}")
    # What opens the reply to the last request may carry more than an earlier turn's opening:
    # Qwen3 without thinking writes an empty think block there. The model answers after it,
    # as it was trained (train/data.py renders the last turn the same way).
    then = tail
    found = list(_TEMPLATE_TOKEN.finditer(between))
    # `between` is close + open ("<|im_end|>\n" + "<|im_start|>assistant\n"): the opening starts
    # at the second template token; a template without such tokens gets the whole separator.
    start = found[1].start() if len(found) > 1 else 0
    assistant_open = between[start:]
    opener_tokens = _TEMPLATE_TOKEN.findall(assistant_open)
    turn_start = opener_tokens[0] if opener_tokens else assistant_open.strip()
    template_tokens = set(_TEMPLATE_TOKEN.findall(between + next_turn))
    leak = tuple(dict.fromkeys([*sorted(template_tokens), *COMMON_LEAK_MARKERS]))
    return ChatMarkers(then, next_turn, assistant_open, turn_start, leak)


_TEMPLATE_TOKEN = re.compile(r"<\|?[A-Za-z_/][\w/]*\|?>|\[/?INST\]")


def isara_messages(examples: Sequence[Sample]) -> list[dict]:
    """The examples as alternating user/assistant turns."""
    messages: list[dict] = []
    for s in examples:
        messages.append({"role": "user", "content": s.prompt})
        messages.append({"role": "assistant", "content": s.response})
    return messages


def build_isara_prompt(render: Render, examples: Sequence[Sample]) -> str:
    """The few-shot conversation, ending on an opened user turn for the model to write.

    Without examples it is the template's opening alone (its default system prompt, if it has
    one) and an opened user turn: an instruction-tuned model then writes a typical request of
    its own (Magpie, Xu et al. 2024), which is how the rehearsal data is made."""
    open_turn = _SENTINELS[0]
    text = render(isara_messages(examples) + [{"role": "user", "content": open_turn}])
    return text[: text.index(open_turn)]


def shuffled(examples: Sequence[Sample], rng: random.Random) -> list[Sample]:
    """Retrieved neighbours in random order: nearest-first would make the model copy the last one."""
    out = list(examples)
    rng.shuffle(out)
    return out


@dataclass(frozen=True)
class Parsed:
    prompt: str
    response: str
    problem: str | None = None  # why the output is unusable, None if it parsed


def parse_generation(
    user_text: str,
    user_finish: str,
    assistant_text: str,
    assistant_finish: str,
    markers: ChatMarkers,
) -> Parsed:
    """Turn the two generated turns back into a prompt/response pair.

    Repairs what is structurally obvious: an assistant turn that runs on into the next user
    turn is cut there (the answer ended), a user turn that opened the assistant turn itself
    is split there. Truncated turns are unusable: a cut-off answer teaches stopping mid-sentence.
    Leftover template markers are left in place for the rule filter to reject.
    """
    prompt, response = user_text, assistant_text
    if user_finish == "length":
        return Parsed(prompt.strip(), response.strip(), "truncated_prompt")
    if user_finish != "stop":
        return Parsed(prompt.strip(), response.strip(), "unparseable")
    # the model wrote the turn change itself instead of ending the user turn
    inline = _find_first(prompt, [markers.assistant_open, markers.assistant_open.strip()])
    if inline is not None:
        at, marker = inline
        if not response.strip():
            prompt, response = prompt[:at], prompt[at + len(marker) :]
            assistant_finish = "stop"
        else:
            prompt = prompt[:at]
    # the answer ran on into a new turn: it ended where the new turn began
    run_on = _find_first(response, [markers.turn_start])
    if run_on is not None:
        response = response[: run_on[0]]
        assistant_finish = "stop"
    if assistant_finish == "length":
        return Parsed(prompt.strip(), response.strip(), "truncated_response")
    if assistant_finish != "stop":
        return Parsed(prompt.strip(), response.strip(), "unparseable")
    return Parsed(prompt.strip(), response.strip(), None)


def _find_first(text: str, needles: Sequence[str]) -> tuple[int, str] | None:
    hits = [(text.find(n), n) for n in needles if n and text.find(n) >= 0]
    return min(hits) if hits else None


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def cut_to_sentence(text: str) -> str:
    """`text` up to the end of its last complete sentence ("" if it has none): an answer cut
    off by the length limit, ended where its last sentence ended."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else ""
