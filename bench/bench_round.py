"""Benchmark: one 256-sample alignment round on the default model, timed stage by stage.

    .venv/bin/python bench/bench_round.py [--samples 256] [--run-dir runs/round256] [--no-docs]

Runs `localalign align --domain safety --rounds 1 --samples N` with the defaults `make run` and
`align` use (nothing tuned for the benchmark), then reads the run's manifest: seconds per stage,
tokens read (prompts) and written (sampled) by generation, training tokens/s, and the held-out
scores of the round against the base. The issue's targets on 2 cores: the round in 15 minutes
(generation <= 6, training <= 7, export + evaluation <= 2) and at least 3x fewer prompt tokens
read per accepted sample than before (1023). Rewrites its section of docs/benchmarks.md.
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

from benchdoc import default_model, load_average, publish, result_cell  # noqa: E402


DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_round -->", "<!-- /bench_round -->"
BEFORE_READ_PER_ACCEPTED = 1023  # the 256-sample round before issue 16: 262k prompt tokens / 256
TARGETS_S = {"generate": 6 * 60, "train": 7 * 60, "export+eval": 2 * 60, "round": 15 * 60}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "round256"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    default_model()
    run_dir = Path(args.run_dir)
    if (run_dir / "manifest.json").exists():
        sys.exit(f"{run_dir} holds an earlier run: remove it or name another --run-dir (a resumed run times nothing)")
    load_before, started = load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = [sys.executable, "-m", "localalign", "align", "--domain", "safety", "--rounds", "1",
           "--samples", str(args.samples), "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    seconds = {name: stage["seconds"] for name, stage in stages.items()}
    gen = stages["round-1/generate"]
    per_stage = {
        "generate": seconds["round-1/generate"],
        "train": seconds["round-1/train"],
        "export+eval": seconds["round-1/export"] + seconds["round-1/eval"],
    }
    per_stage["round"] = sum(per_stage.values())
    read_per_accepted = gen["tokens_read"] / max(gen["accepted"], 1)
    base = json.loads((run_dir / "base" / "eval.json").read_text())
    round1 = json.loads((run_dir / "round-1" / "eval.json").read_text())
    lines = [
        f"## A {args.samples}-sample round (bench/bench_round.py)",
        "",
        f"`{' '.join(['localalign'] + cmd[3:])}` with the shipped defaults; started {started}, load average "
        f"before {load_before}, after {load_average()}; {os.cpu_count()} CPUs. Wall time of the whole command "
        f"(set-up stages included): {wall / 60:.1f} min.",
        "",
        "| stage | seconds | target | met |",
        "|---|---:|---:|---|",
        *[f"| {k} | {v:.0f} | {TARGETS_S[k]} | {'yes' if v <= TARGETS_S[k] else 'no'} |" for k, v in per_stage.items()],
        "",
        f"Generation: {gen['accepted']} accepted, {gen['rejected']} rejected "
        f"({', '.join(f'{r} {c}' for r, c in sorted(gen['reasons'].items(), key=lambda kv: -kv[1]))}); "
        f"{gen['tokens_read']} tokens read, {gen['tokens_written']} written; "
        f"**{read_per_accepted:.0f} prompt tokens read per accepted sample** (before: {BEFORE_READ_PER_ACCEPTED}, "
        f"{BEFORE_READ_PER_ACCEPTED / read_per_accepted:.1f}x fewer; target 3x).",
        f"Training: {stages['round-1/train'].get('steps')} steps, {stages['round-1/train'].get('tokens_per_s')} tokens/s.",
        "",
        "| model | harmful refusal | benign helpfulness |",
        "|---|---|---|",
        f"| base | {result_cell(base, 'safety', 'harmful_refusal_rate', True)} | {result_cell(base, 'safety', 'benign_helpfulness_rate', True)} |",
        f"| round 1 | {result_cell(round1, 'safety', 'harmful_refusal_rate', True)} | {result_cell(round1, 'safety', 'benign_helpfulness_rate', True)} |",
    ]
    publish(DOCS, lines, BEGIN, END, write=not args.no_docs)


if __name__ == "__main__":
    main()
