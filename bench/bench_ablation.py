"""Benchmark: the ablation of issue 15, one alignment round per row, on the held-out suites.

    .venv/bin/python bench/bench_ablation.py [--samples 64] [--work runs/ablation] [--no-docs]

Rows (each one round of `align --domain safety` from the base model, the same seed):
- base, SFT on the seeds alone, ICL-kNN, URIAL-style fixed examples (the `--baselines` of one run);
- ISARA as before issue 15: the rule and novelty filters (the self-rating of then passed everything);
- + consistency: the seeds' vote on the response's kind;
- + best-of-n: two answers per request, the one nearest the seeds' responses kept;
- + rehearsal: the model's own ordinary requests and answers trained with every round;
- + preference: the rejected answers as DPO pairs (objective sft+pref);
- the shipped defaults (whatever `AlignConfig()` is when the script runs).
Every row reports harmful refusal and benign helpfulness (our held-out safety prompts),
over-refusal (HarmBench's 100 benign IFEval prompts) and truthfulness MC1, so a gain bought with
another metric shows. Runs resume: an interrupted ablation picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchdoc import default_model, load_average, publish, result_cell  # noqa: E402

from localalign.align import AlignRun, load_config  # noqa: E402
from localalign.errors import UserError  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_ablation -->", "<!-- /bench_ablation -->"
SUITES = ["safety", "over-refusal", "truthfulness"]
METRICS = [("safety", "harmful_refusal_rate"), ("safety", "benign_helpfulness_rate"),
           ("over-refusal", "over_refusal_rate"), ("truthfulness", "mc1")]
# Before issue 15 the self-rating passed every sample (all 10/10 at 135M, issue 15's reading of
# round 1); today's rating (P(yes) from one forward pass) at 0.5 passed none of the 89 candidates it rated.
# So "before" is the rule and novelty filters alone, which is what the rating then let through.
BEFORE = {"filters": {"consistency": False, "rate": False},
          "rehearsal": 0, "answers": 1, "objective": "sft"}
ROWS = [  # name, overrides on top of BEFORE (None: the shipped defaults)
    ("ISARA before issue 15 (rules and novelty; the self-rating then passed everything)", {}),
    ("+ consistency with the seeds", {"filters": {"consistency": True, "rate": False}}),
    ("+ best-of-2 answers", {"filters": {"consistency": True, "rate": False}, "answers": 2}),
    ("+ rehearsal", {"filters": {"consistency": True, "rate": False}, "answers": 2, "rehearsal": 32}),
    ("+ preference objective (DPO)", {"filters": {"consistency": True, "rate": False}, "answers": 2, "rehearsal": 32,
                                      "objective": "sft+pref"}),
    ("shipped defaults", None),
]


def overrides(row: dict | None, samples: int) -> dict:
    base = {"domain": "safety", "rounds": 1, "samples": samples, "eval_suites": SUITES}
    if row is None:
        return base
    merged = json.loads(json.dumps(BEFORE))
    for key, value in row.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return {**base, "filters": merged["filters"], "rehearsal": merged["rehearsal"],
            "isara": {"answers": merged["answers"]}, "train": {"objective": merged["objective"]}}


def run_row(work: Path, slug: str, values: dict, baselines: bool = False) -> Path:
    config = load_config(None, {**values, "baselines": baselines or None})
    AlignRun(config, work / slug, log=lambda m: print(m, file=sys.stderr, flush=True)).run()
    return work / slug


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--work", default=str(REPO / "runs" / "ablation"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    default_model()
    work, started, t0 = Path(args.work), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    table: list[tuple[str, dict, str]] = []
    for i, (name, row) in enumerate(ROWS):
        run = work / f"row-{i}"
        try:
            run_row(work, f"row-{i}", overrides(row, args.samples), baselines=(i == 0))
        except UserError as e:  # a row that fails (say, its export's parity check) is a result too
            failed = f"failed: {e}"
        else:
            failed = None
        if i == 0:  # the baselines are evaluated before the round: they stand even if it fails
            for label, sub in (("base", "base"), ("SFT on the seeds alone", "baselines/sft-seeds"),
                               ("ICL-kNN (retrieved seeds in context)", "baselines/icl-knn"),
                               ("URIAL-style (the same seeds in context)", "baselines/urial")):
                if (run / sub / "eval.json").exists():
                    table.append((label, json.loads((run / sub / "eval.json").read_text()), ""))
        if failed:
            table.append((name, {"suites": {}}, failed))
            continue
        manifest = json.loads((run / "manifest.json").read_text())["stages"]
        gen = manifest["round-1/generate"]
        note = f"{gen['accepted']} accepted, {gen['rejected']} rejected"
        table.append((name, json.loads((run / "round-1" / "eval.json").read_text()), note))
    lines = [
        "## Ablation (bench/bench_ablation.py)",
        "",
        f"Started {started}, {(time.perf_counter() - t0) / 60:.0f} min in all, load average at the end {load_average()}. "
        f"Each ISARA row is one round of `align --domain safety --samples {args.samples}` from the base model; "
        "95% Wilson intervals in brackets (safety: 24 harmful, 20 benign prompts; over-refusal: 100; MC1: 43).",
        "",
        "| model | harmful refusal | benign helpfulness | over-refusal (lower is better) | truthfulness MC1 | data |",
        "|---|---|---|---|---|---|",
        *[f"| {label} | " + " | ".join(result_cell(r, s, m) for s, m in METRICS) + f" | {note} |" for label, r, note in table],
    ]
    publish(DOCS, lines, BEGIN, END, write=not args.no_docs)


if __name__ == "__main__":
    main()
