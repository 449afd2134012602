"""Benchmark: offline evaluation of the default model on every suite, with wall times.

    .venv/bin/python bench/bench_eval.py [--limit N] [--suite NAME ...]

Runs `localalign.evaluate` on the default GGUF (greedy, batched generator), writes the
result JSON and a report under bench/out/eval/, and rewrites its own section of
docs/benchmarks.md (between `<!-- eval -->` and `<!-- /eval -->`) with the score table,
the wall time of each suite, the refusal detector's agreement with the hand labels, and
the load average before and after (the box may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localalign.eval_refusal import agreement  # noqa: E402
from localalign.eval_report import format_table, format_wall_times, write_report  # noqa: E402
from localalign.evaluate import SUITES, EvalConfig, evaluate, write_eval  # noqa: E402
from localalign.fsutil import atomic_write_text  # noqa: E402
from localalign.models import materialized  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
DOCS = REPO / "docs" / "benchmarks.md"
OUT = REPO / "bench" / "out" / "eval"
LABELS = REPO / "tests" / "data" / "refusal_labels.jsonl"
BEGIN, END = "<!-- eval -->", "<!-- /eval -->"
# The order the issue names them in; the cheap refusal suites first, IFEval (long replies) last.
ORDER = ("safety", "harmbench", "truthfulness", "instruction-following", "ifeval")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def update_section(text: str, body: str) -> str:
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="first N items of each suite (quick check; not for the docs)")
    parser.add_argument("--suite", action="append", choices=list(SUITES), help="default: all")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()

    files = materialized(DEFAULT_MODEL)
    if files.gguf is None:
        sys.exit(f"default model not materialized (run `make models`): {DEFAULT_MODEL}")
    suites = tuple(args.suite or ORDER)
    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    config = EvalConfig(model=files.gguf, suites=suites, limit=args.limit)
    result = evaluate(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    load_after = load_average()

    OUT.mkdir(parents=True, exist_ok=True)
    write_eval(result, OUT / "default.json")
    label = DEFAULT_MODEL  # the table marks a --limit run "(limited)"
    write_report({DEFAULT_MODEL: result}, OUT / "report")
    labels = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines()]
    agree = agreement(labels)

    body = "\n".join(
        [
            "## Offline evaluation (issue 6): default model",
            "",
            f"`{' '.join(['.venv/bin/python bench/bench_eval.py'] + (['--limit', str(args.limit)] if args.limit else []))}`,"
            f" {started}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"load average (1/5/15 min) before {load_before}, after {load_after}.",
            f"Model `{files.gguf.relative_to(REPO) if files.gguf.is_relative_to(REPO) else files.gguf}`; "
            f"greedy, batched generator ({config.parallel} sequences), replies up to {config.max_tokens} tokens "
            f"({config.refusal_max_tokens} for the refusal suites, whose detector reads only the opening).",
            "",
            format_table({label: result}),
            "",
            "Wall time per suite (tokens are the replies re-tokenized; model load "
            f"{result['load_s']:.1f} s, total {result['wall_s']:.0f} s):",
            "",
            format_wall_times({label: result}),
            "",
            f"Refusal detector vs {agree['n']} hand-labelled replies (tests/data/refusal_labels.jsonl): "
            f"agreement {agree['agreement']:.3f}, Cohen's kappa {agree['kappa']:.3f}, precision {agree['precision']:.3f}, "
            f"recall {agree['recall']:.3f} ({agree['fp']} false refusals, {agree['fn']} missed refusals).",
            "",
            "MC1 (truthfulness) = the true answer has the highest summed log-probability of 4 choices "
            "(chance 0.25); it measures the model's preference, not what it writes. "
            "Intervals: 95% Wilson; instruction-level ones treat a prompt's instructions as independent.",
        ]
    )
    if not args.no_docs:
        atomic_write_text(DOCS, update_section(DOCS.read_text(encoding="utf-8"), body))
    print(body)


if __name__ == "__main__":
    main()
