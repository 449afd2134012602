"""Our held-out instruction-following prompts (seeds/instruction-following.heldout.jsonl), each
with machine-checked constraints: the share of prompts whose constraints are all met, and of
single constraints met.

The constraint checker:
Exact semantics are documented in seeds/README.md ("Constraint types"); the reference
implementation the seed data was validated with is `check_constraint` in
tests/test_seeds.py, and tests/evaluation/test_instruction_following.py checks that this one agrees with it
on every seed response and on generated replies. Kept byte-for-byte literal (no Unicode
normalization, Python's `str.split` for words) so the rules are easy to state and to audit.
"""

from __future__ import annotations

import json
import re

from localalign.errors import UserError
from localalign.evaluation.session import EvalSession, SuiteResult, first_n
from localalign.samples import iter_jsonl

# type -> {field: type}; a constraint object has exactly "type" and these fields.
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


def validate_constraint(c: object, where: str = "constraint") -> dict:
    """Return `c` if it is a well-formed constraint object; else a UserError naming `where`."""
    if not isinstance(c, dict):
        raise UserError(f"{where}: a constraint must be an object, got {c!r}")
    ctype = c.get("type")
    if ctype not in CONSTRAINT_FIELDS:
        raise UserError(f"{where}: unknown constraint type {ctype!r}; known: {', '.join(CONSTRAINT_FIELDS)}")
    fields = CONSTRAINT_FIELDS[ctype]
    if set(c) != {"type", *fields}:
        raise UserError(f"{where}: {ctype} takes fields {sorted(fields)}, got {sorted(set(c) - {'type'})}")
    for name, typ in fields.items():
        value = c[name]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise UserError(f"{where}: {ctype}.{name} must be {typ.__name__}, got {value!r}")
        if typ is int and value < 1:
            raise UserError(f"{where}: {ctype}.{name} must be >= 1, got {value}")
        if typ is str and not value:
            raise UserError(f"{where}: {ctype}.{name} must be non-empty")
    return c


def strip_json_fence(s: str) -> str:
    """`s` stripped, without a leading ``` or ```json fence line and its closing ```."""
    s = s.strip()
    if not s.startswith("```"):
        return s
    first_nl = s.find("\n")
    if first_nl == -1 or s[3:first_nl].strip().lower() not in ("", "json"):
        return s
    body = s[first_nl + 1 :]
    if body.rstrip().endswith("```"):
        body = body.rstrip()[:-3]
    return body.strip()


def count_words(reply: str) -> int:
    return len(reply.split())


def count_bullets(reply: str) -> int:
    return sum(1 for line in reply.splitlines() if line.lstrip().startswith(("- ", "* ")))


def count_paragraphs(reply: str) -> int:
    return sum(1 for block in _BLANK_LINE_RE.split(reply.strip()) if block.strip())


def is_json(reply: str) -> bool:
    try:
        json.loads(strip_json_fence(reply))
    except ValueError:  # json.JSONDecodeError is a ValueError
        return False
    return True


def check_constraint(reply: str, c: dict) -> bool:
    """Whether `reply` satisfies the (validated) constraint `c`."""
    t = c["type"]
    stripped = reply.strip()
    checks = {
        "max_words": lambda: count_words(reply) <= c["n"],
        "min_words": lambda: count_words(reply) >= c["n"],
        "bullet_count": lambda: count_bullets(reply) == c["n"],
        "lowercase": lambda: reply == reply.lower(),
        "uppercase": lambda: reply == reply.upper(),
        "json": lambda: is_json(reply),
        "ends_with": lambda: stripped.endswith(c["text"]),
        "starts_with": lambda: stripped.startswith(c["text"]),
        "contains": lambda: reply.lower().count(c["text"].lower()) >= c["n"],
        "no_commas": lambda: "," not in reply,
        "paragraphs": lambda: count_paragraphs(reply) == c["n"],
        "quoted": lambda: len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"',
        "title": lambda: any(m.group(1).strip() for m in _TITLE_RE.finditer(reply)),
    }
    if t not in checks:
        raise UserError(f"unknown constraint type {t!r}")
    return bool(checks[t]())


def score(session: EvalSession, limit: int | None) -> SuiteResult:
    path = session.seeds_dir / "instruction-following.heldout.jsonl"
    rows = []
    for lineno, row in iter_jsonl(path):
        cons = row.get("constraints")
        if not isinstance(row.get("prompt"), str) or not isinstance(cons, list) or not cons:
            raise UserError(f"{path}:{lineno}: expected 'prompt' and a non-empty 'constraints' list")
        rows.append((f"if:{lineno}", row["prompt"], [validate_constraint(c, f"{path}:{lineno}") for c in cons]))
    result = SuiteResult(
        "Our held-out instruction-following prompts with machine-checked constraints "
        "(seeds/README.md): prompts with every constraint met, and single constraints met.",
        n_available=len(rows),
    )
    rows = first_n(rows, limit)
    replies = session.replies([p for _, p, _ in rows], session.max_tokens)
    prompt_ok, constraint_ok = {}, {}
    for (item_id, prompt, cons), reply in zip(rows, replies):
        passed = [check_constraint(reply, c) for c in cons]
        prompt_ok[item_id] = all(passed)
        constraint_ok.update({f"{item_id}#{j}": ok for j, ok in enumerate(passed)})
        result.items.append({"id": item_id, "prompt": prompt, "reply": reply, "constraints": cons, "passed": passed})
    result.add_metric("prompt_pass_rate", prompt_ok)
    result.add_metric("constraint_pass_rate", constraint_ok)
    return result
