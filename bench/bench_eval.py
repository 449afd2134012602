"""Benchmark: offline evaluation of the default model on every suite, with wall times.

    .venv/bin/python bench/bench_eval.py [--limit N] [--suite-limit SUITE=N ...] [--suite NAME ...]
    .venv/bin/python bench/bench_eval.py --powered [--limit N]

`--powered` times the powered safety evaluation that every round can afford (POWERED: the
contrast pairs, HarmBench with its over-refusal half, the 300-prompt Do-Not-Answer sample) with
the evaluation's decoding settings against the previous ones (BASELINE_SETTINGS: a KV buffer per
sequence, plain attention kernels, 80-token replies), one model load each, in one run, and checks by a paired test
that the two settings give the same verdicts; its own section of docs/benchmarks.md.

Runs `localalign.evaluation.run.evaluate` on the default GGUF (greedy, batched generator), writes the
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

from localalign.engine.base import CPU_PARALLEL  # noqa: E402
from localalign.judges.refusal import agreement  # noqa: E402
from localalign.evaluation.report import compare, format_comparison, format_table, format_wall_times, write_report  # noqa: E402
from localalign.evaluation.run import SUITES, EvalConfig, evaluate, read_eval, write_eval  # noqa: E402
from localalign.fsutil import atomic_write_text  # noqa: E402
from benchdoc import DEFAULT_MODEL, default_model, load_average, update_section

DOCS = REPO / "docs" / "benchmarks.md"
OUT = REPO / "bench" / "out" / "eval"
LABELS = REPO / "tests" / "data" / "refusal_labels.jsonl"
BEGIN, END = "<!-- eval -->", "<!-- /eval -->"
POWERED_BEGIN, POWERED_END = "<!-- eval-powered -->", "<!-- /eval-powered -->"
POWERED = ("contrast", "harmbench", "donotanswer-300")
# the evaluation's settings before 2026-12-07: a KV buffer per sequence, plain attention, 80-token refusal replies
BASELINE_SETTINGS = {"kv_unified": False, "flash_attn": False, "refusal_max_tokens": 80}
POWERED_TARGET_S = 180.0  # issue 26: one model's powered safety evaluation in at most 3 minutes
# The order the issue names them in; the cheap refusal suites first, IFEval (long replies) last.
ORDER = ("safety", "harmbench", "truthfulness", "instruction-following", "ifeval")


def merge(parts: list[dict]) -> dict:
    """One result from per-suite runs of the same model (each run loads the model afresh)."""
    merged = dict(parts[0], suites={}, load_s=sum(p["load_s"] for p in parts), wall_s=sum(p["wall_s"] for p in parts))
    found = {name: data for part in parts for name, data in part["suites"].items()}
    merged["suites"] = {name: found[name] for name in sorted(found, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))}
    merged["limit"] = {name: part["limit"] for part in parts for name in part["suites"] if part["limit"]} or None
    merged["limited"] = any(p["limited"] for p in parts)
    return merged


def parse_limits(specs: list[str]) -> dict[str, int]:
    limits = {}
    for spec in specs:
        name, _, n = spec.partition("=")
        if name not in SUITES or not n.isdigit() or int(n) < 1:
            sys.exit(f"--suite-limit wants SUITE=N with a known suite, got {spec!r}")
        limits[name] = int(n)
    return limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="first N items of every suite (quick check)")
    parser.add_argument("--suite-limit", action="append", default=[], metavar="SUITE=N",
                        help="first N items of one suite, e.g. ifeval=100 on a busy box")
    parser.add_argument("--suite", action="append", choices=list(SUITES), help="default: all")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--keep-others", action="store_true",
                        help="report the suites not run now from their last bench/out/eval/SUITE.json")
    parser.add_argument("--powered", action="store_true",
                        help="time the powered safety evaluation, these settings against the previous ones")
    args = parser.parse_args()
    if args.powered:
        return powered(args)

    files = default_model()
    suites = tuple(args.suite or ORDER)
    limits = parse_limits(args.suite_limit)
    load_before = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    kept = [s for s in ORDER if s not in suites and (OUT / f"{s}.json").is_file()] if args.keep_others else []
    parts = [read_eval(OUT / f"{s}.json") for s in kept]
    # One evaluate() per suite, each written as it finishes: an interrupted run keeps what it
    # measured, and the docs section shows every finished suite.
    for name in suites:
        config = EvalConfig(model=files.gguf, suites=(name,), limit=limits.get(name, args.limit))
        parts.append(evaluate(config, log=lambda m: print(m, file=sys.stderr, flush=True)))
        write_eval(parts[-1], OUT / f"{name}.json")
        result = merge(parts)
        write_eval(result, OUT / "default.json")
        write_report({DEFAULT_MODEL: result}, OUT / "report")
        body = describe(result, config, files.gguf, started, load_before, load_average(), suites, kept)
        if not args.no_docs:
            atomic_write_text(DOCS, update_section(DOCS.read_text(encoding="utf-8"), body, BEGIN, END))
    print(body)


def describe(result: dict, config: EvalConfig, gguf: Path, started: str, load_before: str, load_now: str,
             suites: tuple[str, ...], kept: list[str]) -> str:
    labels = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines()]
    agree = agreement(labels)
    done = list(result["suites"])
    pending = [s for s in suites if s not in done]
    limited = [
        f"{name}: first {s['n_items']} of {s['n_available']} items"
        for name, s in result["suites"].items() if s["n_items"] < s["n_available"]
    ]
    return "\n".join(
        [
            "## Offline evaluation (issue 6): default model",
            "",
            f"`.venv/bin/python bench/bench_eval.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
            f"started {started}; {platform.machine()}, {os.cpu_count()} cores; "
            f"load average (1/5/15 min) at the start {load_before}, at the last suite's end {load_now}.",
            f"Model `{gguf.relative_to(REPO) if gguf.is_relative_to(REPO) else gguf}`; greedy, batched generator "
            f"({config.parallel} sequences), replies up to {config.max_tokens} tokens ({config.refusal_max_tokens} "
            "for the refusal suites, whose detector reads only the opening). One model load per suite.",
            *([f"**Limited** (first N items): {'; '.join(limited)}."] if limited else []),
            *([f"**Not finished yet**: {', '.join(pending)}."] if pending else []),
            *([f"Kept from an earlier run of this script: {', '.join(kept)} (measured under its own load, "
               "not the load average above)."] if kept else []),
            "",
            format_table({DEFAULT_MODEL: result}),
            "",
            f"Wall time per suite (tokens: the replies re-tokenized; model loads {result['load_s']:.1f} s in all, "
            f"total {result['wall_s']:.0f} s):",
            "",
            format_wall_times({DEFAULT_MODEL: result}),
            "",
            f"Refusal detector vs {agree['n']} hand-labelled replies (tests/data/refusal_labels.jsonl): "
            f"agreement {agree['agreement']:.3f}, Cohen's kappa {agree['kappa']:.3f}, precision {agree['precision']:.3f}, "
            f"recall {agree['recall']:.3f} ({agree['fp']} false refusals, {agree['fn']} missed refusals).",
            "",
            "MC1 (truthfulness) = the true answer has the highest log-likelihood per byte of 4 choices "
            "(chance 0.25); it measures the model's preference, not what it writes. The plain sum "
            "(TruthfulQA's MC1) favours short answers, and our true answers are the longer ones "
            "(localalign/evaluation/suites/truthfulness.py has the numbers). "
            "Intervals: 95% Wilson; instruction-level ones treat a prompt's instructions as independent.",
        ]
    )


def powered(args) -> None:
    """The powered safety evaluation of the default model as `align` evaluates it (its HF copy
    exported at AlignConfig.quant, as the base and every round are), the baseline settings first,
    then the evaluation's own; wall times, their ratio, and the paired comparison of the verdicts."""
    from localalign.align import AlignConfig
    from localalign.export.pipeline import export_model

    files = default_model()
    quant = AlignConfig.quant
    gguf = OUT / f"base-{quant}.gguf"
    if not gguf.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        export_model(files.hf_dir, gguf, quant=quant)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    load_before, started = load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, settings in (("baseline", BASELINE_SETTINGS), ("now", {})):
        config = EvalConfig(model=gguf, suites=POWERED, limit=args.limit, **settings)
        runs[label] = evaluate(config, log=log)
        write_eval(runs[label], OUT / f"powered-{label}.json")
    base, now = runs["baseline"], runs["now"]
    replies = sum(len(s["items"]) for s in now["suites"].values())
    defaults = EvalConfig(model=gguf, suites=POWERED)
    lines = [
        "## The powered safety evaluation in 3 minutes (issue 26, item 5)",
        "",
        f"`.venv/bin/python bench/bench_eval.py {' '.join(sys.argv[1:])}`",
        f"started {started}; {platform.machine()}, {os.cpu_count()} cores; load average (1/5/15 min) at the start "
        f"{load_before}, at the end {load_average()}. Model: {DEFAULT_MODEL}'s HF copy exported at {quant}, "
        "as `align` evaluates the base and every round; greedy, "
        f"{defaults.parallel} sequences at a time ({CPU_PARALLEL} on a CPU), refusal replies up to {defaults.refusal_max_tokens} tokens, "
        f"stopped at their first blank line. Suites: {', '.join(POWERED)} ({replies} replies).",
        "",
        "| settings | load | " + " | ".join(POWERED) + " | total (load included) |",
        "|---|---|" + "---|" * len(POWERED) + "---|",
    ]
    for label, result in ((f"separate KV buffers, plain attention, {base['decoding']['refusal_max_tokens']}-token "
                           "replies (baseline)", base),
                          (f"one KV buffer, flash attention, {now['decoding']['refusal_max_tokens']}-token replies (now)", now)):
        cells = [f"{result['suites'][s]['wall_s']:.1f} s, {result['suites'][s]['reply_tokens']} tokens" for s in POWERED]
        lines.append(f"| {label} | {result['load_s']:.1f} s | " + " | ".join(cells) + f" | {result['wall_s']:.1f} s |")
    ratio = now["wall_s"] / base["wall_s"]
    verdict = "met" if now["wall_s"] <= POWERED_TARGET_S else "not met"
    lines += [
        "",
        f"Now / baseline: **{ratio:.2f}x** the time ({base['wall_s']:.0f} s -> {now['wall_s']:.0f} s); "
        f"the 3-minute target is **{verdict}**. Same prompts, paired: the verdicts under the two settings "
        "(the replies differ where float order changes a greedy token):",
        "",
        format_comparison(compare(base, now)),
    ]
    body = "\n".join(lines)
    if not args.no_docs:
        atomic_write_text(DOCS, update_section(DOCS.read_text(encoding="utf-8"), body, POWERED_BEGIN, POWERED_END))
    print(body)


if __name__ == "__main__":
    main()
