"""The `Sample` type and its JSONL form.

A sample is one prompt/response pair. Seeds, generated candidates, accepted and rejected
samples are all `Sample`s, written one JSON object per line. Reading also accepts the
OpenAI chat format (`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`),
the format most people already have their examples in.

Reading is strict: the first malformed line stops it with `file:line: what is wrong`,
because a silently skipped seed changes what the model learns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from localalign.errors import UserError
from localalign.fsutil import atomic_write

SOURCES = ("seed", "generated")


@dataclass
class Sample:
    prompt: str
    response: str
    source: str = "seed"  # "seed" (written by a person) or "generated" (by the model)
    round: int | None = None  # alignment round that generated it; None for seeds
    system: str | None = None  # an optional system message, kept when the input had one
    scores: dict[str, float] = field(default_factory=dict)  # e.g. novelty, self-rating
    reject_reason: str | None = None  # set on rejected samples only
    meta: dict[str, Any] = field(default_factory=dict)  # provenance, e.g. in-context example ids

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # Keep lines short and stable: omit empty optional fields.
        for key in ("round", "system", "reject_reason"):
            if d[key] is None:
                del d[key]
        for key in ("scores", "meta"):
            if not d[key]:
                del d[key]
        return d


# A sample is a chat turn pair: even a 32k-token context is ~128 KB of text. A longer line is
# not a sample (a binary file, a whole document on one line), and is refused before it is
# read whole: a file with no newline at all would otherwise be read into memory entirely.
MAX_LINE_BYTES = 1 << 20


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a JSONL file")
    if not path.is_file():  # a FIFO would block, /dev/zero never end
        raise UserError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB; is this a JSONL file?")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as Windows editors write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def sample_from_json(obj: dict[str, Any], where: str) -> Sample:
    """Build a Sample from one JSONL object; `where` ("file:line") prefixes any error."""
    if "messages" in obj:
        return _sample_from_messages(obj["messages"], where)
    for key in ("prompt", "response"):
        if key not in obj:
            raise UserError(f"{where}: missing key {key!r} (expected prompt/response or messages)")
        if not isinstance(obj[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj[key].strip():
            raise UserError(f"{where}: {key!r} is empty")
        _check_text(obj[key], key, where)
    source = obj.get("source", "seed")
    if source not in SOURCES:
        raise UserError(f"{where}: 'source' must be one of {', '.join(SOURCES)}, got {source!r}")
    rnd = obj.get("round")
    if rnd is not None and (not isinstance(rnd, int) or isinstance(rnd, bool)):
        raise UserError(f"{where}: 'round' must be an integer")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: 'system' must be a string")
    if system is not None:
        _check_text(system, "system", where)
    scores = obj.get("scores", {})
    if not isinstance(scores, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
    ):
        raise UserError(f"{where}: 'scores' must map names to numbers")
    reason = obj.get("reject_reason")
    if reason is not None and not isinstance(reason, str):
        raise UserError(f"{where}: 'reject_reason' must be a string")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise UserError(f"{where}: 'meta' must be an object")
    return Sample(obj["prompt"], obj["response"], source, rnd, system, dict(scores), reason, dict(meta))


def _sample_from_messages(messages: Any, where: str) -> Sample:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"{where}: 'messages' must be a list of objects")
    system = None
    if messages and messages[0].get("role") == "system":
        system = messages[0].get("content")
        messages = messages[1:]
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"]:
        raise UserError(
            f"{where}: expected one user then one assistant message (an optional system first), got roles {roles}"
        )
    contents = [m.get("content") for m in messages]
    for role, content in zip(roles, contents):
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: the {role} message needs non-empty string 'content'")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: the system message needs string 'content'")
    for role, content in zip(["user", "assistant", "system"], [*contents, system or ""]):
        _check_text(content, f"{role} content", where)
    return Sample(contents[0], contents[1], system=system)


def _check_text(text: str, what: str, where: str) -> None:
    """JSON can spell text that is not Unicode: a lone surrogate ("\\ud800") parses, but no
    tokenizer or UTF-8 file can take it, so it would fail far from the seed that caused it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: {what} is not valid Unicode (an unpaired surrogate at character {e.start})") from None


def read_samples(path: str | Path) -> list[Sample]:
    """Read every sample of a JSONL file; an empty file is an error (nothing to learn from)."""
    samples = [sample_from_json(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]
    if not samples:
        raise UserError(f"{path}: no samples (the file is empty)")
    return samples


def write_samples(path: str | Path, samples: Iterable[Sample]) -> None:
    """Write samples as JSONL, atomically: the file is complete or untouched."""
    with atomic_write(path) as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")


def read_rejected(path: str | Path) -> list[Sample]:
    """rejected.jsonl back as Samples. Not `read_samples`: a rejected sample may be empty."""
    out = []
    for lineno, obj in iter_jsonl(path):
        try:
            out.append(
                Sample(
                    str(obj["prompt"]),
                    str(obj["response"]),
                    obj.get("source", "generated"),
                    obj.get("round"),
                    obj.get("system"),
                    dict(obj.get("scores", {})),
                    obj.get("reject_reason"),
                    dict(obj.get("meta", {})),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{lineno}: not a rejected sample ({e})") from None
    return out
