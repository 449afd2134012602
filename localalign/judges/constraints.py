"""The constraint checker, and the constraints a request states in plain words. Pure functions.

`check_constraint`: exact semantics are documented in localalign/data/seeds/README.md ("Constraint types");
the reference implementation the seed data was validated with is `check_constraint` in
tests/test_seeds.py, and tests/judges/test_constraints.py checks that this one agrees with it
on every seed response and on generated replies. Kept byte-for-byte literal (no Unicode
normalization, Python's `str.split` for words) so the rules are easy to state and to audit.

`constraints_in_prompt`: reads "in under 20 words", "as 3 '- ' bullets", "end with the
phrase ..." as constraint objects. Used on generated instruction-following pairs: a pair whose
response breaks a constraint its own prompt states teaches the wrong lesson. Only phrasings
that say one thing are read; a prompt whose constraints are not recognised gets an empty
list (nothing to check), never a guess. The rules were written against
localalign/data/seeds/instruction-following.jsonl and are tested on it and on the held-out file.
"""

from __future__ import annotations

import json
import re

from localalign.errors import UserError

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


# ---------------------------------------------------------------------------- constraints a request states

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "twice": 2, "thrice": 3, "once": 1,
}
_N = r"(\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)"
_QUOTED = r"[\"“]([^\"”]+)[\"”]"


def _number(text: str) -> int:
    return int(text) if text.isdigit() else _NUMBER_WORDS[text.lower()]


# (pattern, constraint builder); patterns run on the prompt as written, case-insensitive.
_WORD_LIMITS = (
    (rf"\b(?:at most|no more than|not more than|no longer than|maximum of|up to) {_N} words\b",
     lambda m: {"type": "max_words", "n": _number(m.group(1))}),
    (rf"\b(?:under|fewer than|less than|below) {_N} words\b",
     lambda m: {"type": "max_words", "n": _number(m.group(1)) - 1}),
    (rf"\b(?:at least|no fewer than|no less than|a minimum of|(?<!no )(?<!not )more than) {_N} words\b",
     lambda m: {"type": "min_words", "n": _number(m.group(1)) + (1 if m.group(0).lower().startswith("more") else 0)}),
)
_BULLETS = re.compile(
    rf"\b(?:exactly )?{_N} (?:[a-z]+ )?(?:bullet points?|bullets?|items as [\"“][-*] [\"”] bullets)\b"
    rf"|\b{_N} [a-z ,]{{0,60}}?\bas (?:[\"“][-*] [\"”] )?bullet",
    re.I,
)
_BULLET_MARKERS = ("- ", "* ")
_PARAGRAPHS = re.compile(rf"\b(?:exactly )?{_N} paragraphs\b", re.I)
_CONTAINS = re.compile(rf"\b(?:the word|the term) {_QUOTED} (?:at least )?{_N}(?: times)?\b|"
                       rf"\b(?:the word|the term) {_QUOTED} at least (twice|thrice|once)\b", re.I)
_STARTS = re.compile(rf"\b(?:start|begin)(?:s|ning)?\b[^\"“]{{0,40}}?\bwith (?:the (?:word|phrase|words) )?{_QUOTED}", re.I)
_ENDS = re.compile(rf"\bend(?:s|ing)?\b[^\"“]{{0,40}}?\bwith (?:the )?(?:exact )?(?:word|phrase|words)? ?{_QUOTED}", re.I)
_LOWER = re.compile(r"\b(?:all |only |entirely )?(?:in )?lower ?case\b", re.I)
_UPPER = re.compile(r"\b(?:all (?:capital letters|caps|uppercase|upper case)|in (?:all )?uppercase|in capital letters|all in uppercase)\b", re.I)
_JSON = re.compile(r"\bjson\b", re.I)
_NO_COMMAS = re.compile(r"\b(?:without (?:using )?(?:any )?commas|no commas|don't use any commas|do not use any commas|contains? no commas)\b", re.I)
_QUOTED_REPLY = re.compile(r"\b(?:wrap(?:ped)?|enclose[d]?)\b[^.]{0,40}\b(?:in )?double (?:quotation marks|quotes)\b", re.I)
_TITLE = re.compile(r"\btitle\b[^.]{0,40}\bdouble (?:angle|angular) brackets\b|<<[^<>]+>>", re.I)


def constraints_in_prompt(prompt: str) -> list[dict]:
    """The constraints `prompt` states, in the order of the checker's types; [] if none is recognised."""
    found: list[dict] = []
    for pattern, build in _WORD_LIMITS:
        m = re.search(pattern, prompt, re.I)
        if m:
            found.append(build(m))
    if m := _BULLETS.search(prompt):
        found.append({"type": "bullet_count", "n": _number(m.group(1) or m.group(2))})
    if m := _PARAGRAPHS.search(prompt):
        found.append({"type": "paragraphs", "n": _number(m.group(1))})
    if m := _CONTAINS.search(prompt):
        word, times = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        found.append({"type": "contains", "text": word, "n": _number(times)})
    if (m := _STARTS.search(prompt)) and m.group(1) not in _BULLET_MARKERS:  # "bullets that start with "- ""
        found.append({"type": "starts_with", "text": m.group(1)})
    if m := _ENDS.search(prompt):
        found.append({"type": "ends_with", "text": m.group(1)})
    if _LOWER.search(prompt):
        found.append({"type": "lowercase"})
    if _UPPER.search(prompt):
        found.append({"type": "uppercase"})
    if _JSON.search(prompt):
        found.append({"type": "json"})
    if _NO_COMMAS.search(prompt):
        found.append({"type": "no_commas"})
    if _QUOTED_REPLY.search(prompt):
        found.append({"type": "quoted"})
    if _TITLE.search(prompt):
        found.append({"type": "title"})
    return found
