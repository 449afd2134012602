"""Checks for the hand-written seed sets and held-out evaluation sets under localalign/data/seeds/.

Standard library + pytest (and localalign.paths, for where the package data is); runs in well under a second.

The constraint checker below (`check_constraint`) implements the exact
semantics documented in localalign/data/seeds/README.md. It lives here, rather than in the
package, so that the seed data can be validated before the real evaluation
module exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from localalign.paths import SEEDS_DIR  # package data

DOMAINS = ("safety", "truthfulness", "instruction-following")

MIN_SEEDS, MAX_SEEDS = 40, 100
MIN_HELDOUT = 30


# ---------------------------------------------------------------- helpers


def load_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    rows = []
    lines = text.split("\n")
    # A single trailing newline is allowed; anything else empty is a blank line.
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        assert line.strip(), f"{path.name}:{lineno}: blank line"
        obj = json.loads(line)
        assert isinstance(obj, dict), f"{path.name}:{lineno}: not a JSON object"
        rows.append(obj)
    return rows


def norm(text: str) -> str:
    return " ".join(text.lower().split())


# ------------------------------------------------------ constraint checker

# type -> {field: python type}
CONSTRAINT_FIELDS: dict[str, dict[str, type]] = {
    "max_words": {"n": int},
    "min_words": {"n": int},
    "bullet_count": {"n": int},
    "lowercase": {},
    "uppercase": {},
    "json": {},
    "ends_with": {"text": str},
    "starts_with": {"text": str},
    "contains": {"text": str, "n": int},
    "no_commas": {},
    "paragraphs": {"n": int},
    "quoted": {},
    "title": {},
}

_TITLE_RE = re.compile(r"<<([^<>\n]+)>>")
_BLANK_LINE_RE = re.compile(r"\n[ \t\r\f\v]*\n")


def validate_constraint(c: object) -> None:
    """Raise AssertionError unless `c` is a well-formed constraint object."""
    assert isinstance(c, dict), f"constraint is not an object: {c!r}"
    ctype = c.get("type")
    assert ctype in CONSTRAINT_FIELDS, f"unknown constraint type: {ctype!r}"
    fields = CONSTRAINT_FIELDS[ctype]
    assert set(c) == {"type", *fields}, f"wrong fields for {ctype}: {sorted(c)}"
    for name, typ in fields.items():
        value = c[name]
        assert isinstance(value, typ) and not isinstance(value, bool), (
            f"{ctype}.{name} must be {typ.__name__}: {value!r}"
        )
        if typ is int:
            assert value >= 1, f"{ctype}.{name} must be >= 1"
        if typ is str:
            assert value, f"{ctype}.{name} must be non-empty"


def _strip_json_fence(s: str) -> str:
    s = s.strip()
    if s.startswith("```"):
        first_nl = s.find("\n")
        if first_nl == -1:
            return s
        opener = s[3:first_nl].strip().lower()
        if opener not in ("", "json"):
            return s
        body = s[first_nl + 1 :]
        if body.rstrip().endswith("```"):
            body = body.rstrip()[:-3]
        s = body.strip()
    return s


def count_words(reply: str) -> int:
    return len(reply.split())


def count_bullets(reply: str) -> int:
    return sum(
        1 for line in reply.splitlines() if line.lstrip().startswith(("- ", "* "))
    )


def count_paragraphs(reply: str) -> int:
    blocks = _BLANK_LINE_RE.split(reply.strip())
    return sum(1 for b in blocks if b.strip())


def check_constraint(reply: str, c: dict) -> bool:
    t = c["type"]
    stripped = reply.strip()
    if t == "max_words":
        return count_words(reply) <= c["n"]
    if t == "min_words":
        return count_words(reply) >= c["n"]
    if t == "bullet_count":
        return count_bullets(reply) == c["n"]
    if t == "lowercase":
        return reply == reply.lower()
    if t == "uppercase":
        return reply == reply.upper()
    if t == "json":
        try:
            json.loads(_strip_json_fence(reply))
        except ValueError:
            return False
        return True
    if t == "ends_with":
        return stripped.endswith(c["text"])
    if t == "starts_with":
        return stripped.startswith(c["text"])
    if t == "contains":
        return reply.lower().count(c["text"].lower()) >= c["n"]
    if t == "no_commas":
        return "," not in reply
    if t == "paragraphs":
        return count_paragraphs(reply) == c["n"]
    if t == "quoted":
        return len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"'
    if t == "title":
        return any(m.group(1).strip() for m in _TITLE_RE.finditer(reply))
    raise ValueError(f"unknown constraint type {t!r}")


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("domain", DOMAINS)
def test_seed_file(domain):
    rows = load_jsonl(SEEDS_DIR / f"{domain}.jsonl")
    assert MIN_SEEDS <= len(rows) <= MAX_SEEDS, len(rows)
    seen = set()
    for i, row in enumerate(rows, 1):
        for key in ("prompt", "response"):
            assert isinstance(row.get(key), str) and row[key].strip(), (
                f"line {i}: {key} missing or empty"
            )
        key = norm(row["prompt"])
        assert key not in seen, f"line {i}: duplicate prompt"
        seen.add(key)


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_basic(domain):
    seeds = {norm(r["prompt"]) for r in load_jsonl(SEEDS_DIR / f"{domain}.jsonl")}
    rows = load_jsonl(SEEDS_DIR / f"{domain}.heldout.jsonl")
    assert len(rows) >= MIN_HELDOUT, len(rows)
    seen = set()
    for i, row in enumerate(rows, 1):
        assert isinstance(row.get("prompt"), str) and row["prompt"].strip(), i
        key = norm(row["prompt"])
        assert key not in seeds, f"held-out line {i} appears in the seed file"
        assert key not in seen, f"held-out line {i}: duplicate prompt"
        seen.add(key)


def test_safety_heldout_kinds():
    rows = load_jsonl(SEEDS_DIR / "safety.heldout.jsonl")
    kinds = [r.get("kind") for r in rows]
    assert set(kinds) == {"harmful", "benign"}, set(kinds)
    for r in rows:
        assert set(r) == {"prompt", "kind"}, sorted(r)


def test_truthfulness_heldout_choices():
    rows = load_jsonl(SEEDS_DIR / "truthfulness.heldout.jsonl")
    answers = set()
    for i, r in enumerate(rows, 1):
        choices = r.get("choices")
        assert isinstance(choices, list) and len(choices) == 4, i
        assert all(isinstance(c, str) and c.strip() for c in choices), i
        assert len({norm(c) for c in choices}) == 4, f"line {i}: duplicate choices"
        ans = r.get("answer")
        assert isinstance(ans, int) and not isinstance(ans, bool), i
        assert 0 <= ans < 4, i
        answers.add(ans)
        assert isinstance(r.get("reference"), str) and r["reference"].strip(), i
    assert len(answers) > 1, "the true answer is always at the same index"


def test_instruction_following_heldout_constraints():
    rows = load_jsonl(SEEDS_DIR / "instruction-following.heldout.jsonl")
    for i, r in enumerate(rows, 1):
        cons = r.get("constraints")
        assert isinstance(cons, list) and 1 <= len(cons) <= 2, f"line {i}"
        for c in cons:
            validate_constraint(c)


def test_instruction_following_seeds_satisfy_their_constraints():
    rows = load_jsonl(SEEDS_DIR / "instruction-following.jsonl")
    with_constraints = [r for r in rows if "constraints" in r]
    assert len(with_constraints) >= MIN_SEEDS
    failures = []
    for i, r in enumerate(rows, 1):
        if "constraints" not in r:
            continue
        cons = r["constraints"]
        assert isinstance(cons, list) and cons, f"line {i}"
        for c in cons:
            validate_constraint(c)
            if not check_constraint(r["response"], c):
                failures.append((i, c))
    assert not failures, failures


# Sanity checks of the checker itself, so a bug there can't hide bad seeds.
@pytest.mark.parametrize(
    "reply, constraint, expected",
    [
        ("one two three", {"type": "max_words", "n": 3}, True),
        ("one two three four", {"type": "max_words", "n": 3}, False),
        ("one two", {"type": "min_words", "n": 3}, False),
        ("- a\n  * b\n-c\n", {"type": "bullet_count", "n": 2}, True),
        ("all lower, 123.", {"type": "lowercase"}, True),
        ("Not lower", {"type": "lowercase"}, False),
        ("ALL UPPER 123!", {"type": "uppercase"}, True),
        ('```json\n{"a": 1}\n```', {"type": "json"}, True),
        ('  [1, 2]  ', {"type": "json"}, True),
        ("here: {}", {"type": "json"}, False),
        ("Bye now. Good luck!\n", {"type": "ends_with", "text": "Good luck!"}, True),
        ("  Yes, sure", {"type": "starts_with", "text": "Yes"}, True),
        ("Cat cat CATS", {"type": "contains", "text": "cat", "n": 3}, True),
        ("cat", {"type": "contains", "text": "cat", "n": 2}, False),
        ("a, b", {"type": "no_commas"}, False),
        ("p1\n\n \np2\n\np3", {"type": "paragraphs", "n": 3}, True),
        ("p1\np1b\n\np2", {"type": "paragraphs", "n": 3}, False),
        (' "quoted" ', {"type": "quoted"}, True),
        ('"', {"type": "quoted"}, False),
        ("<<My Title>>\n\nbody", {"type": "title"}, True),
        ("<<>> body", {"type": "title"}, False),
    ],
)
def test_checker_semantics(reply, constraint, expected):
    validate_constraint(constraint)
    assert check_constraint(reply, constraint) is expected
