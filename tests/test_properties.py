"""Property-based tests (hypothesis) of the two parsers that read text from outside:
the JSONL sample reader (files from anywhere) and `parse_generation` (whatever a model wrote).

Both must either return something well-formed or raise a one-line UserError, for any input.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localalign.chat import render_chat
from localalign.errors import UserError
from localalign.isara.prompts import chat_markers, parse_generation
from localalign.samples import Sample, iter_jsonl, read_samples, sample_from_json, write_samples
from tiny_model import CHATML_TEMPLATE

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def scratch_file(data: bytes) -> Path:
    f = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


def one_line(e: UserError) -> bool:
    return "\n" not in str(e) and str(e).strip() != ""


# ---------------------------------------------------------------------------- the JSONL reader

# Text with the characters that break naive readers: newlines, CR, BOMs, quotes, non-ASCII.
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40) | st.sampled_from(
    ["\n", "\r\n", "\ufeff", '"', "\\", "\u2028", "é", "😀", "\x00", "  "]
)
nonblank = texts.filter(lambda s: s.strip() != "")
numbers = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6)
samples = st.builds(
    Sample,
    prompt=nonblank,
    response=nonblank,
    source=st.sampled_from(["seed", "generated"]),
    round=st.none() | st.integers(0, 100),
    system=st.none() | texts,
    scores=st.dictionaries(texts, numbers, max_size=3),
    reject_reason=st.none() | texts,
    meta=st.dictionaries(texts, st.none() | texts | numbers | st.lists(texts, max_size=3), max_size=3),
)


@SETTINGS
@given(st.lists(samples, min_size=1, max_size=8), st.booleans(), st.booleans())
def test_samples_survive_a_round_trip_with_any_line_ends_and_a_bom(batch, crlf, bom):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.jsonl"
        write_samples(path, batch)
        data = path.read_bytes()
        if crlf:
            data = data.replace(b"\n", b"\r\n")
        if bom:
            data = b"\xef\xbb\xbf" + data
        path.write_bytes(data)
        assert read_samples(path) == batch


@SETTINGS
@given(st.binary(max_size=400))
def test_any_bytes_give_objects_or_one_user_error(data):
    path = scratch_file(data)
    try:
        rows = list(iter_jsonl(path))
    except UserError as e:
        assert one_line(e) and str(path) in str(e)
        return
    finally:
        path.unlink()
    assert all(isinstance(obj, dict) and isinstance(n, int) and n >= 1 for n, obj in rows)


json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(["prompt", "response", "messages", "source", "round", "system", "scores", "reject_reason",
                        "meta", "role", "content", "other"])
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", 3]), "content": json_values}),
    max_size=4,
)
objects = st.dictionaries(keys, json_values | messages | nonblank, max_size=6)


@SETTINGS
@given(objects)
def test_any_json_object_gives_a_sample_or_one_user_error(obj):
    try:
        s = sample_from_json(obj, "f.jsonl:1")
    except UserError as e:
        assert one_line(e) and str(e).startswith("f.jsonl:1: ")
        return
    assert isinstance(s.prompt, str) and s.prompt.strip() and isinstance(s.response, str) and s.response.strip()
    # what was accepted can be written and read back unchanged
    path = scratch_file(b"")
    try:
        write_samples(path, [s])
        assert read_samples(path) == [s]
    finally:
        path.unlink()


@SETTINGS
@given(st.lists(objects, max_size=5))
def test_a_file_of_any_json_objects_reads_or_fails_naming_its_line(rows):
    path = scratch_file("".join(json.dumps(r) + "\n" for r in rows).encode())
    try:
        out = read_samples(path)
    except UserError as e:
        assert one_line(e) and str(e).startswith(str(path))
        return
    finally:
        path.unlink()
    assert len(out) == len(rows)


# ---------------------------------------------------------------------------- parse_generation

MARKERS = chat_markers(lambda msgs: render_chat(CHATML_TEMPLATE, msgs))
# Model output made of the pieces that matter: the template's own markers, whitespace, words.
pieces = st.sampled_from(
    [MARKERS.assistant_open, MARKERS.assistant_open.strip(), MARKERS.turn_start, MARKERS.next_turn, MARKERS.then,
     "<|im_end|>", "assistant", "user", "\n", " ", "Hello.", "Sure: ", "é"]
) | texts
model_text = st.lists(pieces, max_size=8).map("".join)
finishes = st.sampled_from(["stop", "length", "error", ""])


@SETTINGS
@given(model_text, finishes, model_text, finishes)
def test_parse_generation_never_fails_and_keeps_only_what_the_model_wrote(user, user_finish, assistant, assistant_finish):
    parsed = parse_generation(user, user_finish, assistant, assistant_finish, MARKERS)
    assert parsed.problem in (None, "truncated_prompt", "truncated_response", "unparseable")
    assert parsed.prompt == parsed.prompt.strip() and parsed.response == parsed.response.strip()
    assert parsed.prompt in user
    assert parsed.response in assistant or parsed.response in user
    if user_finish == "length":
        assert parsed.problem == "truncated_prompt"
    if parsed.problem is None:
        assert user_finish == "stop"
        # the turn boundaries were cut at, not kept inside the pair
        assert MARKERS.assistant_open.strip() not in parsed.prompt
        assert MARKERS.turn_start not in parsed.response
