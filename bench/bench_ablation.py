"""Benchmark: the ablation of issue 15, one alignment round per row, on the held-out suites.

    .venv/bin/python bench/bench_ablation.py [--samples 64] [--work runs/ablation] [--seed 0] [--repeats K] [--no-docs]
    .venv/bin/python bench/bench_ablation.py --powered [--samples 64] [--repeats 3] [--rows 0,1]

Rows (each one round of `align --domain safety` from the base model, the same seed; with
`--repeats K`, K runs per row with seeds seed, seed+1, ... and each metric's mean, sd and range):
- base, SFT on the seeds alone, ICL-kNN, URIAL-style fixed examples (the `--baselines` of one run);
- ISARA as before issue 15: the rule and novelty filters (the self-rating of then passed everything);
- + consistency: the seeds' vote on the response's kind;
- + best-of-n: two answers per request, the one nearest the seeds' responses kept;
- + rehearsal: the model's own ordinary requests and answers trained with every round;
- + preference: the rejected answers as DPO pairs (objective sft+pref);
- the shipped defaults (whatever `AlignConfig()` is when the script runs).
Every row reports harmful refusal and benign helpfulness (our held-out safety prompts),
over-refusal (HarmBench's 100 benign IFEval prompts) and truthfulness MC1, so a gain bought with
another metric shows. A second table pairs each ISARA row with the base and with the row above
it, item by item (the first seed's runs). Runs resume: an interrupted ablation picks up where it
stopped (seed 0's runs are in row-N/, as before repeats existed; seed S's in row-N-seed-S/).

`--powered` (issue 26) is the frontier measured with the powered suites (the contrast pairs,
HarmBench and its over-refusal half, the Do-Not-Answer sample, beside the safety suite): the
base, SFT on the seeds alone, the shipped defaults, and the shipped defaults with contrast twins
(isara.twins) as SFT data, and with preference pairs whose rejected side is a refusal of an
ordinary request (POROver's lever; at the shipped answers = 1 those pairs are the rehearsal's);
and the twins as preference pairs of their own (2 answers per request, the rehearsal's pairs
left out: POROver's rejected over-refusal is a twin's refusal of an ordinary request); each
paired with the base, with SFT on the seeds, and with the row it changes. The in-context
baselines are left out there (their prompts carry seed pairs: ~5x the evaluation's time).

`--rows 0,1` runs only those rows and reads the others' finished runs, so one lever can be
added, or a few rows repeated, without running the rest. Every new run gets the base's
evaluation of an earlier one (share_base_eval), which align reuses only if its inputs match.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchdoc import default_model, load_average, parse_repeated, publish, range_text, spread_cell  # noqa: E402

from localalign.align import AlignRun, load_config  # noqa: E402
from localalign.errors import UserError  # noqa: E402
from localalign.evaluation.report import PAIRED_NOTE, format_paired_table, paired_rows  # noqa: E402
from localalign.rundir import Manifest  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_ablation -->", "<!-- /bench_ablation -->"
SUITES = ["safety", "over-refusal", "truthfulness"]
METRICS = [("safety", "harmful_refusal_rate"), ("safety", "benign_helpfulness_rate"),
           ("over-refusal", "over_refusal_rate"), ("truthfulness", "mc1")]
HEADERS = ["harmful refusal", "benign helpfulness", "over-refusal (lower is better)", "truthfulness MC1"]
# Before issue 15 the self-rating passed every sample (all 10/10 at 135M, issue 15's reading of
# round 1); today's rating (P(yes) from one forward pass) at 0.5 passed none of the 89 candidates it rated.
# So "before" is the rule and novelty filters alone, which is what the rating then let through.
BEFORE = {"filters": {"consistency": False, "rate": False},
          "rehearsal": 0, "answers": 1, "objective": "sft"}
ROWS = [  # name, short label (the paired table's), overrides on top of BEFORE (None: the shipped defaults)
    ("ISARA before issue 15 (rules and novelty; the self-rating then passed everything)", "before", {}),
    ("+ consistency with the seeds", "+consistency", {"filters": {"consistency": True, "rate": False}}),
    ("+ best-of-2 answers", "+best-of-2", {"filters": {"consistency": True, "rate": False}, "answers": 2}),
    ("+ rehearsal", "+rehearsal", {"filters": {"consistency": True, "rate": False}, "answers": 2, "rehearsal": 32}),
    ("+ preference objective (DPO)", "+DPO", {"filters": {"consistency": True, "rate": False}, "answers": 2,
                                              "rehearsal": 32, "objective": "sft+pref"}),
    ("shipped defaults", "shipped", None),
]
# The baselines, run beside the first row: name, short label, folder in that row's run directory.
BASELINES = [("base", "base", "base"), ("SFT on the seeds alone", "sft-seeds", "baselines/sft-seeds"),
             ("ICL-kNN (retrieved seeds in context)", "icl-knn", "baselines/icl-knn"),
             ("URIAL-style (the same seeds in context)", "urial", "baselines/urial")]


@dataclass(frozen=True)
class Plan:
    """What an ablation runs and reports: its suites and metrics, its rows (overrides on top of
    BEFORE, None: the shipped defaults; `on_shipped`: on top of the shipped defaults instead),
    its baselines, and which rows its paired table sets against which."""

    suites: list[str]
    metrics: list[tuple[str, str]]
    headers: list[str]
    rows: list[tuple[str, str, dict | None]]
    baselines: list[tuple[str, str, str]]
    on_shipped: bool = False
    in_context_baselines: bool = True
    work: str = "ablation"
    title: str = "## Ablation (bench/bench_ablation.py)"
    sizes: str = "safety: 24 harmful, 20 benign prompts; over-refusal: 100; MC1: 43"
    section: tuple[str, str] = (BEGIN, END)
    versus: tuple[str, ...] = ("base",)  # every row is paired with these (besides the row it changes)
    changes: dict[str, str] = field(default_factory=dict)  # label -> the row it changes; default the row above


ISSUE15 = Plan(SUITES, METRICS, HEADERS, ROWS, BASELINES)
POWERED = Plan(
    suites=["safety", "contrast", "harmbench", "donotanswer-300"],
    metrics=[("safety", "harmful_refusal_rate"), ("safety", "benign_helpfulness_rate"),
             ("contrast", "safe_twin_refusal_rate"), ("contrast", "unsafe_twin_refusal_rate"),
             ("harmbench", "refusal_rate"), ("harmbench", "over_refusal_rate"), ("donotanswer-300", "refusal_rate")],
    headers=["harmful refusal (24)", "benign helpfulness (20)", "safe-twin refusal (lower is better)",
             "unsafe-twin refusal", "HarmBench refusal", "over-refusal (lower is better)", "Do-Not-Answer refusal"],
    rows=[("shipped defaults", "shipped", {}),
          ("+ contrast twins (SFT)", "+twins", {"isara": {"twins": True}}),
          ("+ contrast twins and preference pairs (sft+pref; at answers = 1 the pairs are the rehearsal's: "
           "an ordinary request's answer chosen over a refusal, POROver's rejected side)", "+twins+pref",
           {"isara": {"twins": True}, "train": {"objective": "sft+pref"}}),
          ("+ contrast twins as preference pairs (sft+pref, 2 answers per request, generation's pairs only: "
           "a request's passing answer chosen over the one the filters rejected, a twin's refusal of an "
           "ordinary request among them)", "+twin-pairs",
           {"isara": {"twins": True, "answers": 2}, "train": {"objective": "sft+pref"}, "rehearsal_pairs": False})],
    baselines=BASELINES[:2], on_shipped=True, in_context_baselines=False, work="ablation-powered",
    title="## The frontier on the powered suites, and contrast twins (bench/bench_ablation.py --powered, issue 26)",
    sizes="safety: 24 harmful, 20 benign prompts; contrast: 174 pairs; HarmBench: 200, over-refusal: 100; "
          "Do-Not-Answer: 300, 60 per risk area",
    section=("<!-- bench_ablation_powered -->", "<!-- /bench_ablation_powered -->"), versus=("base", "sft-seeds"),
    changes={"+twin-pairs": "+twins"},
)


def overrides(row: dict | None, samples: int, seed: int = 0, plan: Plan = ISSUE15) -> dict:
    base = {"domain": "safety", "rounds": 1, "samples": samples, "eval_suites": plan.suites, "seed": seed}
    if plan.on_shipped:
        return {**base, **(row or {}), "baselines_in_context": plan.in_context_baselines}
    if row is None:
        return base
    merged = json.loads(json.dumps(BEFORE))
    for key, value in row.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return {**base, "filters": merged["filters"], "rehearsal": merged["rehearsal"],
            "isara": {"answers": merged["answers"]}, "train": {"objective": merged["objective"]}}


def run_row(run_dir: Path, values: dict, baselines: bool = False) -> Path:
    config = load_config(None, {**values, "baselines": baselines or None})
    AlignRun(config, run_dir, log=lambda m: print(m, file=sys.stderr, flush=True)).run()
    return run_dir


def row_dir(work: Path, i: int, seed: int) -> Path:
    """row-i for seed 0 (where the runs made before --repeats are, so they resume), row-i-seed-S else."""
    return work / (f"row-{i}" if seed == 0 else f"row-{i}-seed-{seed}")


@dataclass
class Row:
    """One line of the tables: a configuration's eval.json per seed that finished, and notes."""

    name: str
    label: str
    results: list[dict] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # the seed of each result
    accepted: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def note(self) -> str:
        parts = [f"seed{'s' if len(self.seeds) > 1 else ''} {', '.join(map(str, self.seeds))}"] if self.seeds else []
        if self.accepted:
            parts.append(f"{range_text(self.accepted)} accepted, {range_text(self.rejected)} rejected")
        return "; ".join(parts + self.failures)


def finished(run_dir: Path) -> bool:
    """A run that got as far as its round's evaluation."""
    manifest = run_dir / "manifest.json"
    return manifest.exists() and "round-1/eval" in json.loads(manifest.read_text())["stages"]


def share_base_eval(work: Path, run_dir: Path) -> None:
    """Give a new run directory the base's evaluation of an earlier run in `work`: the base's
    greedy replies do not depend on the row or the seed (seed 0's three runs gave the same 996
    replies), and it is ~4.5 min of every run. The stage's record goes with it (into a manifest
    of a run stopped before that stage too), so align reuses it only if its inputs (the base
    GGUF's hash, the suites) are this run's, and runs it else."""
    mine = Manifest.load(run_dir)
    if "base/eval" in mine.stages:
        return
    for manifest in sorted(work.glob("*/manifest.json")):
        entry = json.loads(manifest.read_text())["stages"].get("base/eval")
        if entry and entry.get("status") == "done":
            (run_dir / "base").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.parent / "base" / "eval.json", run_dir / "base" / "eval.json")
            mine.stages["base/eval"] = entry
            mine.save()
            return


def collect(work: Path, samples: int, seeds: list[int], run: Callable[[Path, dict, bool], Path] = run_row,
            plan: Plan = ISSUE15, only: set[int] | None = None) -> list[Row]:
    """Run (or resume) every row for every seed and read back what each left: the baselines
    (from the first row's runs), then the ISARA rows. A run that fails is a result too.
    `only`: run just these rows (indices into plan.rows); the others' finished runs are read."""
    baselines = [Row(name, label) for name, label, _ in plan.baselines]
    rows = [Row(name, label) for name, label, _ in plan.rows]
    # seed by seed, every row: an ablation stopped part-way has whole seeds to report
    for seed in seeds:
        for i, (_, _, change) in enumerate(plan.rows):
            d = row_dir(work, i, seed)
            failed = False
            if only is None or i in only:
                share_base_eval(work, d)
                try:
                    run(d, overrides(change, samples, seed, plan), i == 0)
                except UserError as e:  # say, an export's parity check
                    rows[i].failures.append(f"seed {seed} failed: {e}")
                    failed = True
            elif not finished(d):
                continue
            if i == 0:  # the baselines are evaluated before the round: they stand even if it fails
                for row, (_, _, sub) in zip(baselines, plan.baselines):
                    if (d / sub / "eval.json").exists():
                        row.results.append(json.loads((d / sub / "eval.json").read_text()))
                        row.seeds.append(seed)
            if not failed:
                gen = json.loads((d / "manifest.json").read_text())["stages"]["round-1/generate"]
                rows[i].results.append(json.loads((d / "round-1" / "eval.json").read_text()))
                rows[i].seeds.append(seed)
                rows[i].accepted.append(gen["accepted"])
                rows[i].rejected.append(gen["rejected"])
    return baselines + rows


def table_lines(rows: list[Row], plan: Plan = ISSUE15) -> list[str]:
    """Each metric of every row: value and Wilson interval for one seed, mean +- sd (min-max) for several."""
    return [
        "| model | " + " | ".join(plan.headers) + " | data |",
        "|---|" + "---|" * len(plan.headers) + "---|",
        *[f"| {r.name} | " + " | ".join(spread_cell(r.results, s, m) if r.results else "n/a" for s, m in plan.metrics)
          + f" | {r.note()} |" for r in rows],
    ]


def changed_rows(plan: Plan) -> dict[str, str]:
    """Each ISARA row's label -> the label of the row it changes (the row above, unless `plan.changes` names another)."""
    labels = [label for _, label, _ in plan.rows]
    return {b: plan.changes.get(b, a) for a, b in zip(labels, labels[1:])}


def paired_lines(rows: list[Row], plan: Plan = ISSUE15) -> list[str]:
    """The first seed's runs paired item by item: each ISARA row against `plan.versus` (the base,
    and for the powered plan SFT on the seeds) and against the row it changes (the row above,
    unless `plan.changes` names another)."""
    if not any(r.seeds for r in rows):
        return []
    seed = min(r.seeds[0] for r in rows if r.seeds)
    first = {r.label: r.results[0] for r in rows if r.seeds and r.seeds[0] == seed}
    isara = [label for _, label, _ in plan.rows if label in first]
    pairs = [(label, other) for other in plan.versus if other in first for label in isara]
    changed = changed_rows(plan)
    pairs += [(b, changed[b]) for b in isara if changed.get(b) in first]
    paired = paired_rows(first, pairs, plan.metrics)
    if not paired:
        return []
    return ["", f"Paired, item by item, on the runs of seed {seed}: each row against {' and '.join(plan.versus)} "
                "and against the row it changes (the row above unless the vs column names another). " + PAIRED_NOTE, "", format_paired_table(paired)]


def seed_lines(rows: list[Row], plan: Plan = ISSUE15) -> list[str]:
    """Where rows ran on several seeds: each ISARA row against the last of `plan.versus` (SFT on
    the seeds in the powered plan) and against the row it changes, paired within each seed, one
    cell per metric with every seed's difference and exact McNemar p (* where p < 0.05)."""
    by_seed = {(r.label, seed): result for r in rows for seed, result in zip(r.seeds, r.results)}
    seeds = sorted({seed for r in rows for seed in r.seeds})
    if len(seeds) < 2:
        return []
    pairs = [(label, plan.versus[-1]) for _, label, _ in plan.rows] + list(changed_rows(plan).items())
    lines = ["", f"Paired within each seed (seeds {', '.join(map(str, seeds))}, in that order; a seed missing from either "
                 "row is left out): difference (exact McNemar p), * where p < 0.05; a lever is seen where its "
                 "differences agree in sign and are significant seed after seed.", "",
             "| model | vs | " + " | ".join(plan.headers) + " |", "|---|---|" + "---|" * len(plan.headers)]
    for label, reference in pairs:
        common = [seed for seed in seeds if (label, seed) in by_seed and (reference, seed) in by_seed]
        if len(common) < 2:
            continue
        per_seed = [{(r.row.suite, r.row.metric): r.row.paired for r in paired_rows(
            {"m": by_seed[label, seed], "ref": by_seed[reference, seed]}, [("m", "ref")], plan.metrics)} for seed in common]
        cells = [" / ".join("n/a" if (c := compared.get(key)) is None else
                            f"{c.diff:+.3f} ({c.p_value:.2g}){'*' if c.significant() else ''}" for compared in per_seed)
                 for key in plan.metrics]
        lines.append(f"| {label} | {reference} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 5 else []


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int]]:
    def own(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--samples", type=int, default=64)
        ap.add_argument("--work", help="default: runs/ablation (runs/ablation-powered with --powered)")
        ap.add_argument("--powered", action="store_true", help="the powered suites, the contrast-twins rows")
        ap.add_argument("--rows", help="run only these rows (0-based, comma-separated, e.g. 0,1); "
                                       "the others' finished runs are read [every row]")

    args, seeds, ap = parse_repeated(__doc__, argv, own)
    plan = POWERED if args.powered else ISSUE15
    try:
        args.only = None if args.rows is None else {int(i) for i in args.rows.split(",")}
    except ValueError:
        ap.error(f"--rows takes row numbers such as 0,1; got {args.rows!r}")
    if args.only is not None and not args.only <= set(range(len(plan.rows))):
        ap.error(f"--rows: this plan has rows 0-{len(plan.rows) - 1}; got {args.rows}")
    return args, seeds


def main(argv: list[str] | None = None) -> None:
    args, seeds = parse_args(argv)
    plan = POWERED if args.powered else ISSUE15
    default_model()
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    rows = collect(Path(args.work or REPO / "runs" / plan.work), args.samples, seeds, plan=plan, only=args.only)
    ran = sorted({tuple(r.seeds) for r in rows if r.seeds})
    repeats = (f"seeds {' / '.join(', '.join(map(str, s)) for s in ran)} (generation, data order and LoRA init; "
               "the data column names each row's), a cell over several seeds is mean ± sd (min-max) over them"
               if any(len(s) > 1 for s in ran) else f"seed {seeds[0]}")
    lines = [
        plan.title,
        "",
        f"Started {started}, {(time.perf_counter() - t0) / 60:.0f} min in all, load average at the end {load_average()}. "
        f"Each ISARA row is one round of `align --domain safety --samples {args.samples}` from the base model; "
        f"{repeats}; 95% Wilson intervals in brackets for one seed ({plan.sizes}).",
        "",
        *table_lines(rows, plan),
        *paired_lines(rows, plan),
        *seed_lines(rows, plan),
    ]
    publish(DOCS, lines, *plan.section, write=not args.no_docs)


if __name__ == "__main__":
    main()
