"""Benchmark: what the engine's own process costs, against the engine in this process (issue 27).

    .venv/bin/python bench/bench_engine_process.py [--jobs 8] [--branches 4] [--max-tokens 64,128] [--repeats 3] [--threads 2] [--no-docs]

The same generation both ways, alternating (in this process, in the engine process, in this
process, ...; `--repeats` times each), on the default model as shipped:

- in-process: `engine.llamacpp.BatchGenerator`, built directly (what the engine process hosts);
- engine process: `engine.select.open_generator`, which `align` uses (engine/process.py).

The work is the ISARA step's shape: `--jobs` few-shot prompts of 4 safety seeds, each read once
and continued by `--branches` samplers (a seed each) that write a user turn, then the assistant
turn after it, through `run_jobs` with a lazy job iterator that renders and tokenizes each
prompt when the engine asks for it (a round trip to the engine process per job, and one per
decode for the callbacks and should_stop). Both ways must write the same texts (same seeds).

Tokens/s = generated tokens / wall time of run_jobs; opening (spawning the process and loading
the model) is timed apart, as align opens a generator once per stage. Rewrites its section of
docs/benchmarks.md (`<!-- bench_engine_process -->` markers) with the numbers and the load
average before and after: the box may be shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localalign.engine.base import GenerationConfig, Job, derive_seed  # noqa: E402
from localalign.engine.llamacpp import BatchGenerator  # noqa: E402
from localalign.engine.select import open_generator  # noqa: E402
from localalign.isara.prompts import build_isara_prompt, chat_markers  # noqa: E402
from localalign.paths import SEEDS_DIR  # noqa: E402
from localalign.samples import read_samples  # noqa: E402
from benchdoc import default_model, load_average, publish  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_engine_process -->", "<!-- /bench_engine_process -->"
TARGET = 0.02  # the bound on what the process boundary may cost
# A `make run` round on this machine (docs/benchmarks.md, make_run): generate 145 s, train 243 s,
# export 11 s, eval 85 s; the engine decodes in two of its stages (generate, eval), opened once each.
ROUND_S, ENGINE_S, OPENS_PER_ROUND = 484.0, 145.0 + 85.0, 2
MODES = {"in-process": BatchGenerator, "engine process": open_generator}
TOKENIZE_CALLS = 2000


def isara_jobs(gen, seeds, n_jobs: int, branches: int) -> Iterator[Job]:
    """Few-shot prompts of 4 seeds each, rendered and tokenized as the engine asks for them."""
    for j in range(n_jobs):
        examples = [seeds[(4 * j + i) % len(seeds)] for i in range(4)]
        yield Job(gen.tokenize(build_isara_prompt(gen.chat_prompt, examples)),
                  tuple(derive_seed(0, j * branches + b) for b in range(branches)))


def timed(mode: str, gguf: Path, cfg: GenerationConfig, seeds, args) -> dict:
    cpu0 = os.times()
    t0 = time.perf_counter()
    with MODES[mode](gguf, cfg) as gen:
        opened = time.perf_counter() - t0
        then = gen.tokenize_continuation(chat_markers(gen.chat_prompt).then)
        texts, steps = {}, [0]

        def done(leaf, completion):
            texts[leaf] = (completion.texts, completion.n_generated)

        def step(n):
            steps[0] += 1

        t0 = time.perf_counter()
        gen.run_jobs(isara_jobs(gen, seeds, args.jobs, args.branches), max_tokens=args.budgets, then=then,
                     on_done=done, on_step=step, should_stop=lambda: False)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(TOKENIZE_CALLS):  # the price of one call, without the noise of decoding
            gen.tokenize("How do smoke detectors work?")
        call_us = 1e6 * (time.perf_counter() - t0) / TOKENIZE_CALLS
    cpu1 = os.times()  # the engine process has ended: its time is among this one's children's
    cpu = sum(getattr(cpu1, k) - getattr(cpu0, k) for k in ("user", "system", "children_user", "children_system"))
    tokens = sum(n for _, n in texts.values())
    print(f"{mode}: opened in {opened:.2f} s; {tokens} tok / {seconds:.1f} s = {tokens / seconds:.1f} tok/s, "
          f"{steps[0]} decodes; {cpu:.1f} CPU s in all")
    return {"open_s": opened, "seconds": seconds, "tokens": tokens, "rate": tokens / seconds, "decodes": steps[0],
            "call_us": call_us, "cpu_s": cpu,
            "texts": {leaf: t for leaf, (t, _) in texts.items()}}


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.mean(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def section(args, runs: dict[str, list[dict]], started: str, loads: tuple[str, str]) -> list[str]:
    ratios = [p["rate"] / i["rate"] for i, p in zip(runs["in-process"], runs["engine process"])]
    cost = [p["seconds"] / i["seconds"] - 1 for i, p in zip(runs["in-process"], runs["engine process"])]
    cpu_cost = [p["cpu_s"] / i["cpu_s"] - 1 for i, p in zip(runs["in-process"], runs["engine process"])]
    open_extra = statistics.mean(r["open_s"] for r in runs["engine process"]) - \
        statistics.mean(r["open_s"] for r in runs["in-process"])
    decodes = runs["engine process"][0]["decodes"]
    trip_us = [p["call_us"] - i["call_us"] for i, p in zip(runs["in-process"], runs["engine process"])]
    trips_s = statistics.mean(trip_us) * 1e-6 * (decodes + args.jobs)
    decoding_s = statistics.mean(r["seconds"] for r in runs["in-process"])
    share = (trips_s / decoding_s * ENGINE_S + OPENS_PER_ROUND * open_extra) / ROUND_S
    same = all(r["texts"] == runs["in-process"][0]["texts"] for rs in runs.values() for r in rs)
    rows = [f"| {mode} | {len(rs)} | {spread([r['rate'] for r in rs], '{:.1f}')} | "
            f"{spread([r['seconds'] for r in rs], '{:.1f}')} s | {spread([r['open_s'] for r in rs], '{:.2f}')} s | "
            f"{spread([r['cpu_s'] for r in rs], '{:.1f}')} s |"
            for mode, rs in runs.items()]
    return [
        "## The engine in its own process (issue 27): what the boundary costs",
        "",
        f"`.venv/bin/python bench/bench_engine_process.py --jobs {args.jobs} --branches {args.branches} "
        f"--max-tokens {args.max_tokens} --repeats {args.repeats} --threads {args.threads}`",
        f"started {started}; {platform.machine()}, {os.cpu_count()} cores; load average (1/5/15 min) before {loads[0]}, "
        f"after {loads[1]}. Default model as shipped (Q4_1), {args.threads} threads, {args.jobs} ISARA-shaped jobs of "
        f"{args.branches} branches (4 safety seeds in context, a user turn of up to {args.budgets[0]} tokens, then an "
        f"answer of up to {args.budgets[1]}), a lazy job iterator that tokenizes, callbacks and should_stop as in the "
        "ISARA step; the two ways alternate (in-process first, then the engine process first, ...).",
        "",
        "| engine | runs | tokens/s: mean (min, max) | run_jobs wall time | open (spawn + load) | CPU time, both processes |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Engine process / in-process tokens/s, pair by pair: {', '.join(f'{r:.3f}' for r in ratios)}; the boundary adds "
        f"**{100 * statistics.mean(cost):+.1f}%** to decoding time (median pair {100 * statistics.median(cost):+.1f}%, min "
        f"{100 * min(cost):+.1f}%, max {100 * max(cost):+.1f}%; target under {100 * TARGET:.0f}%). The spread is the shared "
        "machine's: the same work's CPU time moves with what else runs on it (caches, memory bandwidth), and a pair "
        "whose CPU time differs by as much as its wall time differs says nothing of the pipe. CPU time of the whole "
        "measurement (open, run, the calls below), both processes: "
        f"{100 * statistics.mean(cpu_cost):+.1f}% (min {100 * min(cpu_cost):+.1f}%, max {100 * max(cpu_cost):+.1f}%). "
        "Measured without decoding, a call "
        f"costs {spread(trip_us, '{:.0f}')} µs more through the pipe ({TOKENIZE_CALLS} tokenize calls); at one round trip "
        f"per decode and per job ({decodes} + {args.jobs} here) that is {trips_s * 1e3:.0f} ms of "
        f"{decoding_s:.0f} s, **{100 * trips_s / decoding_s:.2f}%**. Opening costs {open_extra:+.2f} s more "
        f"(a fresh interpreter). On a `make run` round ({ROUND_S:.0f} s, {ENGINE_S:.0f} s of it decoding, "
        f"{OPENS_PER_ROUND} opens) the calls and the opens are {100 * share:.2f}% of the round. Same texts both ways, every run: {'yes' if same else '**no**'}.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--max-tokens", default="64,128", help="user turn, answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    args.budgets = [int(x) for x in args.max_tokens.split(",")]

    gguf = default_model().gguf
    seeds = read_samples(SEEDS_DIR / "safety.jsonl")
    cfg = GenerationConfig(threads=args.threads, seed=0)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    before = load_average()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):  # ABBA: the order's drift cancels
            runs[mode].append(timed(mode, gguf, cfg, seeds, args))
    lines = section(args, runs, started, (before, load_average()))
    publish(DOCS, lines, BEGIN, END, write=not args.no_docs)


if __name__ == "__main__":
    main()
