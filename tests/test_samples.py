import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localalign.errors import UserError
from localalign.samples import Sample, read_samples, write_samples


def write_lines(path, lines, newline="\n", encoding="utf-8"):
    path.write_bytes(newline.join(lines).encode(encoding) + newline.encode(encoding))
    return path


def test_round_trip_keeps_every_field(tmp_path):
    samples = [
        Sample("p1", "r1"),
        Sample("p2", "r2", source="generated", round=3, system="be brief", scores={"novelty": 0.4},
               reject_reason="duplicate", meta={"examples": [1, 2]}),
    ]
    write_samples(tmp_path / "s.jsonl", samples)
    assert read_samples(tmp_path / "s.jsonl") == samples


def test_openai_messages_are_accepted(tmp_path):
    line = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}]}
    p = write_lines(tmp_path / "m.jsonl", [json.dumps(line)])
    (s,) = read_samples(p)
    assert (s.prompt, s.response, s.system) == ("q", "a", "sys")


def test_bom_crlf_and_blank_lines_are_tolerated(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "response": "b"}\r\n\r\n{"prompt": "c", "response": "d"}\r\n')
    assert [s.prompt for s in read_samples(p)] == ["a", "c"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "a", "response": "b"', ":2: invalid JSON"),
        ('["a", "b"]', ":2: expected a JSON object"),
        ('{"prompt": "a"}', ":2: missing key 'response'"),
        ('{"prompt": 3, "response": "b"}', ":2: 'prompt' must be a string"),
        ('{"prompt": "   ", "response": "b"}', ":2: 'prompt' is empty"),
        ('{"messages": [{"role": "user", "content": "q"}]}', ":2: expected one user then one assistant"),
        ('{"prompt": "a", "response": "b", "source": "web"}', ":2: 'source' must be one of"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, expected):
    p = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok", "response": "ok"}', line])
    with pytest.raises(UserError) as e:
        read_samples(p)
    assert str(p) + expected in str(e.value)
    assert "\n" not in str(e.value)


def test_non_utf8_empty_and_missing_files(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="latin1.jsonl:1: not valid UTF-8"):
        read_samples(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="no samples"):
        read_samples(empty)
    with pytest.raises(UserError, match="no such file"):
        read_samples(tmp_path / "missing.jsonl")


def test_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "s.jsonl"
    write_samples(p, [Sample("old", "old")])

    def exploding():
        yield Sample("new", "new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_samples(p, exploding())
    assert read_samples(p) == [Sample("old", "old")]
    assert [f.name for f in tmp_path.iterdir()] == ["s.jsonl"]  # no temp file left behind


text = st.text(min_size=1).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(text, text), min_size=1, max_size=5))
def test_any_text_round_trips(tmp_path_factory, pairs):
    p = tmp_path_factory.mktemp("h") / "s.jsonl"
    samples = [Sample(a, b) for a, b in pairs]
    write_samples(p, samples)
    assert read_samples(p) == samples
