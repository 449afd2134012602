"""Benchmark: one 256-sample alignment round on the default model, timed stage by stage.

    .venv/bin/python bench/bench_round.py [--samples 256] [--run-dir runs/round256] [--seed 0] [--repeats K] [--no-docs]

Runs `localalign align --domain safety --rounds 1 --samples N` with the defaults `make run` and
`align` use (nothing tuned for the benchmark), then reads the run's manifest: seconds per stage,
tokens read (prompts) and written (sampled) by generation, training tokens/s, and the held-out
scores of the round against the base. The issue's targets on 2 cores: the round in 15 minutes
(generation <= 6, training <= 7, export + evaluation <= 2) and at least 3x fewer prompt tokens
read per accepted sample than before (1023). With `--repeats K`, K runs with seeds seed,
seed+1, ... (RUN for seed 0, RUN-seed-S for the others): each stage's mean and range, each
score's mean, sd and range, and round 1 of every seed paired item by item with the base.
Rewrites its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchdoc import (default_model, load_average, parse_repeated, publish, range_text, result_cell,  # noqa: E402
                      spread, spread_cell)

from localalign.evaluation.report import PAIRED_NOTE, format_paired_table, paired_rows  # noqa: E402


DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_round -->", "<!-- /bench_round -->"
BEFORE_READ_PER_ACCEPTED = 1023  # the 256-sample round before issue 16: 262k prompt tokens / 256
TARGETS_S = {"generate": 6 * 60, "train": 7 * 60, "export+eval": 2 * 60, "round": 15 * 60}


METRICS = [("safety", "harmful_refusal_rate"), ("safety", "benign_helpfulness_rate")]


def run_dir_for(run_dir: Path, seed: int) -> Path:
    """The run directory of one seed: --run-dir itself for seed 0 (as before repeats), RUN-seed-S else."""
    return run_dir if seed == 0 else run_dir.with_name(f"{run_dir.name}-seed-{seed}")


def measure(run_dir: Path) -> dict:
    """What one finished run left: seconds per stage, generation's counts, training's rate, the evaluations."""
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    seconds = {name: stage["seconds"] for name, stage in stages.items()}
    per_stage = {
        "generate": seconds["round-1/generate"],
        "train": seconds["round-1/train"],
        "export+eval": seconds["round-1/export"] + seconds["round-1/eval"],
    }
    per_stage["round"] = sum(per_stage.values())
    gen = stages["round-1/generate"]
    return {"stages": per_stage, "gen": gen, "train": stages["round-1/train"],
            "read_per_accepted": gen["tokens_read"] / max(gen["accepted"], 1),
            "base": json.loads((run_dir / "base" / "eval.json").read_text()),
            "round1": json.loads((run_dir / "round-1" / "eval.json").read_text())}


def stage_lines(runs: list[dict]) -> list[str]:
    """Seconds per stage against the targets: the run's own for one seed, mean and range for several."""
    if len(runs) == 1:
        return ["| stage | seconds | target | met |", "|---|---:|---:|---|",
                *[f"| {k} | {v:.0f} | {TARGETS_S[k]} | {'yes' if v <= TARGETS_S[k] else 'no'} |"
                  for k, v in runs[0]["stages"].items()]]
    lines = ["| stage | seconds, mean | min-max | target | met |", "|---|---:|---:|---:|---|"]
    for k in runs[0]["stages"]:
        values = [r["stages"][k] for r in runs]
        met = sum(v <= TARGETS_S[k] for v in values)
        lines.append(f"| {k} | {spread(values).mean:.0f} | {range_text(values)} | {TARGETS_S[k]} | {met} of {len(runs)} runs |")
    return lines


def generation_lines(runs: list[dict]) -> list[str]:
    if len(runs) == 1:
        gen, read = runs[0]["gen"], runs[0]["read_per_accepted"]
        return [
            f"Generation: {gen['accepted']} accepted, {gen['rejected']} rejected "
            f"({', '.join(f'{r} {c}' for r, c in sorted(gen['reasons'].items(), key=lambda kv: -kv[1]))}); "
            f"{gen['tokens_read']} tokens read, {gen['tokens_written']} written; "
            f"**{read:.0f} prompt tokens read per accepted sample** (before: {BEFORE_READ_PER_ACCEPTED}, "
            f"{BEFORE_READ_PER_ACCEPTED / read:.1f}x fewer; target 3x).",
            f"Training: {runs[0]['train'].get('steps')} steps, {runs[0]['train'].get('tokens_per_s')} tokens/s.",
        ]
    read = spread([r["read_per_accepted"] for r in runs])
    return [
        f"Generation: {range_text([r['gen']['accepted'] for r in runs])} accepted, "
        f"{range_text([r['gen']['rejected'] for r in runs])} rejected; **{read.mean:.0f} prompt tokens read per "
        f"accepted sample** ({read.low:.0f}-{read.high:.0f}; before: {BEFORE_READ_PER_ACCEPTED}, "
        f"{BEFORE_READ_PER_ACCEPTED / read.mean:.1f}x fewer; target 3x).",
        f"Training: {range_text([r['train'].get('steps', 0) for r in runs])} steps, "
        f"{range_text([r['train'].get('tokens_per_s', 0) for r in runs])} tokens/s.",
    ]


def score_lines(runs: list[dict], seeds: list[int]) -> list[str]:
    """The held-out scores of the base and of round 1 (mean and spread over seeds), then round 1
    of each seed paired item by item with the base."""
    base, rounds = runs[0]["base"], [r["round1"] for r in runs]
    label = "round 1" if len(runs) == 1 else f"round 1, {len(runs)} seeds"
    results = {"base": base, **{f"round 1 (seed {s})": r for s, r in zip(seeds, rounds)}}
    paired = paired_rows(results, [(k, "base") for k in list(results)[1:]], METRICS)
    return [
        "| model | harmful refusal | benign helpfulness |",
        "|---|---|---|",
        "| base | " + " | ".join(result_cell(base, s, m, True) for s, m in METRICS) + " |",
        f"| {label} | " + " | ".join(spread_cell(rounds, s, m, True) for s, m in METRICS) + " |",
        *(["", PAIRED_NOTE, "", format_paired_table(paired)] if paired else []),
    ]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int]]:
    def own(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--samples", type=int, default=256)
        ap.add_argument("--run-dir", default=str(REPO / "runs" / "round256"))

    args, seeds, ap = parse_repeated(__doc__, argv, own)
    taken = [d for d in (run_dir_for(Path(args.run_dir), s) for s in seeds) if (d / "manifest.json").exists()]
    if taken:
        ap.error(f"{taken[0]} holds an earlier run: remove it or name another --run-dir (a resumed run times nothing)")
    return args, seeds


def main(argv: list[str] | None = None) -> None:
    args, seeds = parse_args(argv)
    default_model()
    load_before, started = load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs, walls = [], []
    for seed in seeds:
        run_dir = run_dir_for(Path(args.run_dir), seed)
        cmd = [sys.executable, "-m", "localalign", "align", "--domain", "safety", "--rounds", "1",
               "--samples", str(args.samples), "--seed", str(seed), "--run-dir", str(run_dir)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        walls.append(time.perf_counter() - t0)
        runs.append(measure(run_dir))
    command = " ".join(["localalign"] + cmd[3:cmd.index("--seed")] + ["--run-dir", str(Path(args.run_dir))])
    repeats = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}, one run each"
    lines = [
        f"## A {args.samples}-sample round (bench/bench_round.py)",
        "",
        f"`{command}` with the shipped defaults, {repeats}; started {started}, load average "
        f"before {load_before}, after {load_average()}; {os.cpu_count()} CPUs. Wall time of the whole command "
        f"(set-up stages included): {range_text([w / 60 for w in walls], 1)} min.",
        "",
        *stage_lines(runs),
        "",
        *generation_lines(runs),
        "",
        *score_lines(runs, seeds),
    ]
    publish(DOCS, lines, BEGIN, END, write=not args.no_docs)


if __name__ == "__main__":
    main()
