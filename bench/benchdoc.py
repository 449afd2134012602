"""What every benchmark script shares: the load average, and its section of docs/benchmarks.md."""

from __future__ import annotations

import os
import sys

from localalign.models import DEFAULT_MODEL, materialized


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def update_section(text: str, body: str, begin: str, end: str) -> str:
    """`text` with the block between the markers `begin`/`end` replaced by `body` (appended if absent)."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def default_model():
    """The default model's files (GGUF and HF copy); exit with one line if `make models` has not run."""
    files = materialized(DEFAULT_MODEL)
    if files.gguf is None or files.hf_dir is None:
        sys.exit(f"{DEFAULT_MODEL} is not materialized: run `make models` first")
    return files
